"""The learning-rate schedule, anchored to the time budget: warm-up, then cosine decay to the floor.

litgpt and torchtune decay over a step count fixed before training. Under a wall-clock budget that
count is a guess: when the budget stops the run first, it stops part-way down the curve (at ~31% of
the peak for a 24 h run that planned 3 epochs), and a short trial may never leave its warm-up. Here
each phase advances by whichever is further along, the steps or the budget:

* **warm-up**: linear, ``factor = max((s + 1) / (W + 1), t / (WARMUP_TIME_SHARE x T))`` where ``s`` is
  the step, ``W`` ``--warmup_steps``, ``t`` the budget clock's time since training started and ``T``
  the training time the budget leaves (budget - reserve - load). So warm-up ends after ``W`` steps or
  a tenth of the training time, whichever comes first;
* **decay**: cosine from the peak to ``min_lr_ratio`` over ``p = max(p_steps, p_time)``, with
  ``p_steps = (s - W_end) / (S - W_end)`` (``S`` the planned steps, ``W_end`` the step warm-up ended
  at) and ``p_time`` the share of the training time left at warm-up's end that has since been used.

A run the budget stops therefore reaches the floor as the budget (minus the reserve) runs out,
whatever its step time; a run that finishes its planned steps first follows the plain step
schedule exactly (its time share never leads). The clock is the budget clock, so validation, the
test proxy and checkpoints count, and a resumed run continues the same curve: the anchors are in
the checkpoint (:meth:`BudgetSchedule.state_dict`). ``expected_steps`` (steps so far + the time
left at the recent step time, at most ``S``) is logged with the progress each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

WARMUP_TIME_SHARE = 0.1  # warm-up never takes more than this share of the training time


@dataclass
class BudgetSchedule:
    """The learning-rate multiplier per step; ``planned_steps`` from max_steps or epochs."""

    warmup_steps: int
    planned_steps: int
    min_ratio: float
    start_s: float | None = None  # clock time at the first training step
    warmup_end_step: int | None = None
    warmup_end_s: float | None = None
    progress: float = 0.0  # decay progress of the last step (0 in warm-up)
    bound: str = "steps"  # which of steps / budget set the last step's progress

    def factor(self, step: int, elapsed_s: float, deadline_s: float) -> float:
        """The multiplier of the peak LR for optimizer step ``step`` (0-based), at clock time ``elapsed_s``;
        ``deadline_s``: the clock time training must stop at (budget - reserve)."""
        if self.start_s is None:
            self.start_s = elapsed_s
        if self.warmup_end_step is None:
            by_steps = (step + 1) / (self.warmup_steps + 1)
            by_time = (elapsed_s - self.start_s) / max(1e-9, WARMUP_TIME_SHARE * (deadline_s - self.start_s))
            if max(by_steps, by_time) < 1.0:
                self.bound = "steps" if by_steps >= by_time else "budget"
                return max(by_steps, by_time)
            self.warmup_end_step, self.warmup_end_s = step, elapsed_s
        decay_steps = max(1, self.planned_steps - self.warmup_end_step)
        p_steps = (step - self.warmup_end_step) / decay_steps
        p_time = (elapsed_s - self.warmup_end_s) / max(1e-9, deadline_s - self.warmup_end_s)
        self.bound = "steps" if p_steps >= p_time else "budget"
        self.progress = min(1.0, max(p_steps, p_time, 0.0))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * self.progress))

    def expected_steps(self, step: int, elapsed_s: float, deadline_s: float, step_s: float | None) -> int:
        """Steps the run will reach: the planned ones, or fewer where the time left at ``step_s`` a step runs out."""
        if not step_s:
            return self.planned_steps
        return min(self.planned_steps, step + int(max(0.0, deadline_s - elapsed_s) / step_s))

    def state_dict(self) -> dict[str, Any]:
        return {"start_s": self.start_s, "warmup_end_step": self.warmup_end_step, "warmup_end_s": self.warmup_end_s,
                "progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_s, self.warmup_end_step = state["start_s"], state["warmup_end_step"]
        self.warmup_end_s, self.progress = state["warmup_end_s"], state["progress"]

    def resume_from_step_schedule(self, step: int, elapsed_s: float) -> None:
        """Anchors for a checkpoint written before the schedule had any (its warm-up was by steps alone)."""
        self.start_s = elapsed_s
        if step > self.warmup_steps:
            self.warmup_end_step, self.warmup_end_s = self.warmup_steps, elapsed_s
