"""Bayesian search for ``onegpu sweep`` (``method: bayes``): optuna's TPE sampler, the maintained engine
W&B's own Launch scheduler also offers; the study lives in ``OUT/optuna.journal`` so a resumed sweep
continues it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import optuna.distributions as od
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from onegpu.errors import UserError
from onegpu.sweeps import schema as S
from onegpu.sweeps.samplers import Sampler

OPTUNA_JOURNAL = "optuna.journal"


class BayesSampler(Sampler):
    """Bayesian search through optuna's TPE sampler; the study lives in ``OUT/optuna.journal``."""

    preview_note = "(bayes: later trials depend on earlier results; these are sample draws)"

    def __init__(self, config: dict[str, Any], cap: int, seed: int):
        self.config, self.total, self.seed = config, cap, seed
        self.space = optuna_space(config)  # an unsupported distribution fails here, before any trial
        self.study = None
        self.asked: dict[int, Any] = {}

    def preview(self) -> list[dict[str, Any]]:  # TPE starts from random draws too
        draws = S.iter_random_points(self.config, self.seed)
        return [next(draws) for _ in range(min(self.total, 5))]

    def open(self, out: Path, sweep_id: str) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        goal = (self.config.get("metric") or {}).get("goal", "minimize")
        self.study = optuna.create_study(
            study_name=sweep_id, storage=JournalStorage(JournalFileBackend(str(out / OPTUNA_JOURNAL))),
            load_if_exists=True, direction="maximize" if goal == "maximize" else "minimize",
            sampler=optuna.samplers.TPESampler(seed=self.seed))
        for stale in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(stale.number, state=TrialState.FAIL)  # asked by an interrupted invocation

    def ask(self, index: int) -> dict[str, Any]:
        self.asked[index] = self.study.ask(self.space)
        return from_optuna(self.config, self.space, self.asked[index].params)

    def tell(self, index: int, trial: dict[str, Any]) -> None:
        asked = self.asked.pop(index)
        if trial["state"] == "finished" and trial["metric"] is not None:
            self.study.tell(asked, trial["metric"])
        else:
            self.study.tell(asked, state=TrialState.FAIL if trial["state"] == "failed" else TrialState.PRUNED)


def optuna_space(config: dict[str, Any]) -> dict[str, Any]:
    """W&B parameters -> optuna distributions (constants stay out of the search space)."""
    space: dict[str, Any] = {}
    for name, (kind, spec) in S.flat_parameters(config["parameters"]).items():
        lo, hi, q = spec.get("min"), spec.get("max"), spec.get("q")
        if kind == "param_single_value":
            continue
        if kind in ("param_categorical", "param_categorical_w_probabilities"):
            # optuna stores only plain scalars as choices; others are chosen by index
            plain = all(v is None or isinstance(v, (bool, int, float, str)) for v in spec["values"])
            space[name] = od.CategoricalDistribution(spec["values"] if plain else list(range(len(spec["values"]))))
        elif kind == "param_int_uniform":
            space[name] = od.IntDistribution(lo, hi)
        elif kind == "param_uniform":
            space[name] = od.FloatDistribution(lo, hi)
        elif kind == "param_quniform":
            if all(isinstance(x, int) for x in (lo, hi, q)):
                space[name] = od.IntDistribution(lo, hi - (hi - lo) % q, step=q)
            else:
                space[name] = od.FloatDistribution(lo, lo + ((hi - lo) // q) * q, step=q)
        elif kind == "param_loguniform_v2":
            space[name] = od.FloatDistribution(lo, hi, log=True)
        elif kind == "param_loguniform":
            space[name] = od.FloatDistribution(math.exp(lo), math.exp(hi), log=True)
        elif kind == "param_qloguniform_v2" and isinstance(q, int) and q == 1:
            space[name] = od.IntDistribution(max(1, int(lo)), int(hi), log=True)
        else:
            raise UserError(f"parameters.{name}: distribution {spec.get('distribution')!r} has no bounded equivalent "
                            "in optuna's Bayesian (TPE) search",
                            fix="use values, int/float min-max, q_uniform, log_uniform_values or log_uniform "
                                "for method: bayes, or switch to method: random")
    return space


def from_optuna(config: dict[str, Any], space: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, (kind, spec) in S.flat_parameters(config["parameters"]).items():
        if kind == "param_single_value":
            out[name] = spec["value"]
            continue
        value = chosen[name]
        values = spec.get("values")
        if values is not None and list(space[name].choices) != values:
            value = values[value]
        out[name] = value
    return out
