"""The budget clock: how much of the competition's wall-clock budget a run has spent.

The NeurIPS LLM Efficiency Challenge gives one GPU for 24 hours. A run that is killed at 23:59
with no merged checkpoint scores nothing, so the clock (1) survives crashes and resumes: a
heartbeat file (``<out_dir>/budget_clock.json``, one entry per segment = one process) is rewritten
atomically every ``HEARTBEAT_INTERVAL_S`` from a background thread, and a resumed run charges every
earlier segment up to its last heartbeat, killed or not, checkpointed or not; (2) keeps a reserve
for the end (validation, last checkpoint, merge), sized from this run's measured load time (and
its measured finalize time once a segment has finalized); (3) predicts, from the recent step time,
whether one more step still fits.

    clock = BudgetClock.from_spec("24h", reserve="auto")
    clock.start_heartbeat(out_dir / "budget_clock.json", continue_run=resuming)
    clock.size_reserve()                # after loading: reserve from the measured load time
    while training:
        if clock.should_stop(next_step_s=ema_step_time): break   # says why in clock.stop_reason
        ...
    clock.stop_heartbeat(ended="finished")

Used by ``onegpu finetune`` and by the sweep runner (each trial gets a slice of the budget).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from onegpu.contracts import HEARTBEAT_FILE  # noqa: F401 - the trainer names its heartbeat file from here
from onegpu.contracts import HEARTBEAT_INTERVAL_S, TRACKS, atomic_write_json, read_json
from onegpu.errors import UserError

# Auto reserve = RESERVE_MARGIN x the expected finalize time. Before any segment of the run has
# finalized, finalize is expected to take FINALIZE_PER_LOAD x the measured load time: the merge
# loads the base again and writes it back, and the last validation + checkpoint come on top.
RESERVE_MARGIN = 1.25
FINALIZE_PER_LOAD = 2.0
_process_start: float | None = None  # monotonic time of the process start, set by the CLI entry point
# (a CLI process runs one verb, so every clock it makes starts there; in-process callers start at from_spec)

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
    """The planners' estimate of the reserve before anything is measured: 10% of the budget, at most 20 m.

    A training run replaces it with the measured rule (``BudgetClock.size_reserve``).
    """
    return min(0.10 * budget_s, 20 * 60.0)


def charge_from_process_start() -> None:
    """Make this process's clocks start at the process start (the CLI calls it), so imports are charged too."""
    global _process_start
    try:
        age = max(0.0, time.time() - psutil.Process().create_time())
    except (psutil.Error, OSError):
        return
    _process_start = time.monotonic() - age


def _clock_origin() -> float:
    return time.monotonic() if _process_start is None else _process_start


@dataclass
class BudgetClock:
    """Wall-clock budget with the time of earlier segments (killed or finished) of the same run."""

    budget_s: float
    reserve_s: float
    reserve_auto: bool = False  # size the reserve from measured times (``size_reserve``)
    elapsed_before_s: float = 0.0  # spent by earlier segments (from the heartbeat file or a checkpoint)
    segments: int = 1
    _started: float = field(default_factory=_clock_origin, repr=False)
    stop_reason: str | None = None
    earlier: list[dict[str, Any]] = field(default_factory=list)  # earlier segments' heartbeat entries
    segment: dict[str, Any] = field(default_factory=dict)  # this segment's entry (wandb id, step, ...)
    heartbeat_path: Path | None = None
    _beating: threading.Event | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
        auto = reserve in (None, "auto")
        reserve_s = default_reserve(budget_s) if auto else parse_duration(reserve)
        if reserve_s >= budget_s:
            raise UserError(f"the reserve ({format_duration(reserve_s)}) is not smaller than the budget "
                            f"({format_duration(budget_s)})", fix="use a smaller --budget_reserve or a larger --budget")
        return cls(budget_s=budget_s, reserve_s=reserve_s, reserve_auto=auto)

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

    # --------------------------------------------------------------------------------- reserve
    def size_reserve(self) -> float:
        """Auto reserve, called once loading is done: RESERVE_MARGIN x the expected finalize time.

        Expected finalize = the last measured ``finalize_s`` of an earlier segment of this run, else
        FINALIZE_PER_LOAD x this segment's load time (process start to now). An explicit
        ``--budget_reserve`` is kept as given.
        """
        load_s = self.segment_elapsed_s
        self.note(load_s=round(load_s, 3))
        if self.reserve_auto:
            measured = [s["finalize_s"] for s in self.earlier if s.get("finalize_s")]
            expected = measured[-1] if measured else FINALIZE_PER_LOAD * load_s
            self.reserve_s = RESERVE_MARGIN * expected
            self.note(reserve_s=round(self.reserve_s, 3),
                      reserve_rule=f"{RESERVE_MARGIN} x " + ("the last measured finalize" if measured
                                                            else f"{FINALIZE_PER_LOAD} x this segment's load time"))
        return self.reserve_s

    # ------------------------------------------------------------------------------- heartbeat
    def start_heartbeat(self, path: Path, continue_run: bool) -> None:
        """Charge the earlier segments recorded in ``path`` (when continuing the run) and start beating.

        A new run (``continue_run`` False) starts a new file. The file, not the checkpoints, is the
        record of the run's segments: a segment killed before its first checkpoint still counts.
        """
        self.heartbeat_path = Path(path)
        previous = read_json(self.heartbeat_path) if continue_run and self.heartbeat_path.is_file() else None
        if previous and previous.get("segments"):
            self.earlier = list(previous["segments"])
            self.elapsed_before_s = sum(float(s.get("elapsed_s", 0.0)) for s in self.earlier)
            self.segments = len(self.earlier) + 1
        self.segment = {"started_at": _utc(time.time() - self.segment_elapsed_s), "elapsed_s": 0.0, "ended": None}
        self._beating = threading.Event()
        self.beat()
        threading.Thread(target=self._beat_until_stopped, args=(self._beating,), name="budget-heartbeat",
                         daemon=True).start()

    def previous_segment(self) -> dict[str, Any]:
        return self.earlier[-1] if self.earlier else {}

    def note(self, **fields: Any) -> None:
        """Record facts about this segment (W&B id, step, load/finalize time) in the next heartbeat."""
        with self._lock:
            self.segment.update(fields)

    def beat(self) -> None:
        if self.heartbeat_path is None:
            return
        with self._lock:
            self.segment.update(elapsed_s=round(self.segment_elapsed_s, 3), beat_at=_utc(time.time()))
            doc = {"budget_s": self.budget_s, "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
                   "elapsed_s": round(self.elapsed_s, 3), "segments": [*self.earlier, dict(self.segment)]}
        atomic_write_json(self.heartbeat_path, doc)

    def _beat_until_stopped(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.beat()
            except OSError:  # a full or vanished disk must not kill training; the next beat retries
                continue

    def stop_heartbeat(self, ended: str) -> None:
        """The last beat: this segment ended (``finished``, ``failed``, ``preempted``, ...)."""
        if self._beating is None:
            return
        self._beating.set()
        self._beating = None
        self.note(ended=ended)
        self.beat()

    # ------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "reserve_s": self.reserve_s, "elapsed_s": self.elapsed_s,
                "segments": self.segments}

    def restore(self, state: dict[str, Any]) -> None:
        """Carry over a checkpoint's time spent, unless the heartbeat file already recorded the segments.

        The checkpoint's record stops at its save; it is used only for a run without a heartbeat file
        (resumed into a new ``--out_dir``, or written by an older onegpu).
        """
        if self.earlier:
            return
        self.elapsed_before_s = float(state.get("elapsed_s", 0.0))
        self.segments = int(state.get("segments", 1)) + 1

    def summary(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "budget_elapsed_s": round(self.elapsed_s, 3),
                "budget_used_pct": round(100 * self.used_fraction, 3), "budget_segments": self.segments,
                "budget_reserve_s": round(self.reserve_s, 3), "budget_stop_reason": self.stop_reason}


def _utc(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))
