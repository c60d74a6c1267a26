"""The budget clock: how much of the competition's wall-clock budget a run has spent.

The NeurIPS LLM Efficiency Challenge gives one GPU for 24 hours. A run that is killed at 23:59
with no merged checkpoint scores nothing, so the clock (1) survives resumes (``elapsed`` is
saved in every checkpoint and restored), (2) keeps a reserve for the final save + merge + export,
and (3) predicts, from the recent step time, whether one more step still fits.

    clock = BudgetClock.from_spec("24h", reserve="auto")
    while training:
        if clock.should_stop(next_step_s=ema_step_time): break   # says why in clock.stop_reason
        ...
    state = clock.state_dict()          # goes into the checkpoint
    clock = BudgetClock.from_state(state)  # on resume: elapsed carries over

Used by ``onegpu finetune`` and by the sweep runner (each trial gets a slice of the budget).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from onegpu.contracts import TRACKS
from onegpu.errors import UserError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(spec: str | int | float | None) -> float:
    """``"24h"``, ``"90m"``, ``"30s"``, ``"1h30m"``, ``"1.5h"`` or plain seconds -> seconds."""
    if spec is None:
        raise UserError("no budget given", fix="pass a duration such as --budget 24h, 90m or 30s")
    if isinstance(spec, (int, float)):
        seconds = float(spec)
    else:
        text = str(spec).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise UserError(f"cannot read the duration {spec!r}",
                                fix="write it like 24h, 90m, 30s or 1h30m")
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"the duration {spec!r} is not positive", fix="use a budget > 0, e.g. 24h")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 120:
        return f"{seconds:.0f}s"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def default_reserve(budget_s: float) -> float:
    """Time kept back for the final save + merge + export: 10% of the budget, capped at 20 minutes.

    20 minutes covers merging and writing a 7B checkpoint (~14 GB in bf16) on a slow disk; small
    budgets (tests, sweeps' short trials) keep 10%.
    """
    return min(0.10 * budget_s, 20 * 60.0)


@dataclass
class BudgetClock:
    """Wall-clock budget with time carried over from earlier (resumed) segments of the same run."""

    budget_s: float
    reserve_s: float
    elapsed_before_s: float = 0.0  # spent by earlier segments (restored from a checkpoint)
    segments: int = 1
    _started: float = field(default_factory=time.monotonic, repr=False)
    stop_reason: str | None = None

    @classmethod
    def from_spec(cls, budget: str | float | None, reserve: str | float | None = "auto",
                  track: str | None = None) -> "BudgetClock":
        """``budget`` None -> the track preset's budget (24h)."""
        if budget is None:
            if track is not None and track in TRACKS:
                budget = TRACKS[track].budget
            else:
                budget = "24h"
        budget_s = parse_duration(budget)
        reserve_s = default_reserve(budget_s) if reserve in (None, "auto") else parse_duration(reserve)
        if reserve_s >= budget_s:
            raise UserError(f"the reserve ({format_duration(reserve_s)}) is not smaller than the budget "
                            f"({format_duration(budget_s)})", fix="use a smaller --budget_reserve or a larger --budget")
        return cls(budget_s=budget_s, reserve_s=reserve_s)

    # ---------------------------------------------------------------------------------- reading
    @property
    def segment_elapsed_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before_s + self.segment_elapsed_s

    @property
    def remaining_s(self) -> float:
        return self.budget_s - self.elapsed_s

    @property
    def used_fraction(self) -> float:
        return self.elapsed_s / self.budget_s

    @property
    def train_deadline_s(self) -> float:
        """Elapsed time at which training must stop so the reserve is left for save + merge."""
        return self.budget_s - self.reserve_s

    def should_stop(self, next_step_s: float = 0.0) -> bool:
        """True when one more step (of ``next_step_s``) would eat into the reserve."""
        if self.elapsed_s + max(0.0, next_step_s) >= self.train_deadline_s:
            if self.remaining_s > 0:
                keep = f"stopping to keep {format_duration(self.remaining_s)} for the final save and merge"
            else:  # a single step (or the model load) outlasted the budget: nothing could predict it
                keep = f"already {format_duration(-self.remaining_s)} over; stopping now to save and merge"
            self.stop_reason = (f"budget clock: {format_duration(self.elapsed_s)} of {format_duration(self.budget_s)} "
                                f"used; {keep} (reserve {format_duration(self.reserve_s)})")
            return True
        return False

    def eta_s(self, steps_done_this_segment: int, steps_left: int) -> float | None:
        if steps_done_this_segment <= 0:
            return None
        return self.segment_elapsed_s / steps_done_this_segment * steps_left

    # ------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "reserve_s": self.reserve_s, "elapsed_s": self.elapsed_s,
                "segments": self.segments}

    def restore(self, state: dict[str, Any]) -> None:
        """Carry over the time spent by the run being resumed (budget and reserve stay as configured)."""
        self.elapsed_before_s = float(state.get("elapsed_s", 0.0))
        self.segments = int(state.get("segments", 1)) + 1
        self._started = time.monotonic()

    def summary(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "budget_elapsed_s": round(self.elapsed_s, 3),
                "budget_used_pct": round(100 * self.used_fraction, 3), "budget_segments": self.segments,
                "budget_stop_reason": self.stop_reason}
