"""Which parameters each trial of ``onegpu sweep`` runs with: W&B's grid and random search (its own
engine, ``sweeps/schema.py``) here, Bayesian search in ``sweeps/bayes.py`` (optuna, loaded only for it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onegpu.sweeps import schema as S


class Sampler:
    """Which parameters trial ``index`` runs with; ``tell`` hands back how the trial went."""

    total: int  # trials in this sweep
    preview_note: str | None = None  # printed by --dry_run above the previewed trials

    def open(self, out: Path, sweep_id: str) -> None:
        """Attach to the sweep dir (where a sampler keeps what must survive a resume)."""

    def ask(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def tell(self, index: int, trial: dict[str, Any]) -> None:
        """The finished trial record (``state``, ``metric``) of an ``ask``."""

    def preview(self) -> list[dict[str, Any]]:
        """The trials --dry_run prints (no side effects)."""
        return [self.ask(i) for i in range(self.total)]


class GridSampler(Sampler):
    """W&B's grid: the product of the values, parameter names sorted; ``--count`` takes the first N."""

    def __init__(self, config: dict[str, Any], cap: int | None, seed: int):
        self.points = S.grid_points(config)[:cap] if cap else S.grid_points(config)
        self.total = len(self.points)

    def ask(self, index: int) -> dict[str, Any]:
        return self.points[index]


class RandomSampler(Sampler):
    """W&B's random search: trial ``index`` gets the index-th draw of the seeded sequence (resumable)."""

    def __init__(self, config: dict[str, Any], cap: int, seed: int):
        self.total = cap
        self.draws = S.iter_random_points(config, seed)
        self.drawn: list[dict[str, Any]] = []

    def ask(self, index: int) -> dict[str, Any]:
        while len(self.drawn) <= index:
            self.drawn.append(next(self.draws))
        return self.drawn[index]

    def preview(self) -> list[dict[str, Any]]:
        return [self.ask(i) for i in range(min(self.total, 5))]


def sampler_for(config: dict[str, Any], cap: int | None, seed: int) -> Sampler:
    """The sampler of the sweep's ``method``."""
    if config["method"] == "bayes":
        from onegpu.sweeps.bayes import BayesSampler  # optuna loads only for bayes sweeps

        return BayesSampler(config, cap, seed)
    return {"grid": GridSampler, "random": RandomSampler}[config["method"]](config, cap, seed)
