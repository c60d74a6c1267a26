"""The training state and its atomic checkpoints (LoRA weights + optimizer + TrainState).

``TrainState`` is everything a resumed run needs besides the weights and the optimizer: the step,
the data position, the counters, the RNG states, the budget clock and the LR schedule's anchors
(``finetune/schedule.py``). It is versioned
(``TrainState.VERSION``): ``load_state_dict`` reads every version it knows and refuses newer ones
with a clear message, and ``load`` reads the checkpoints written before the state had a version.

Layout: ``<out>/checkpoints/step-000120/state.pt`` (+ ``meta.json``, human-readable). A checkpoint
is written into a temp dir beside it and renamed into place (``onegpu.contracts.staged_dir``), so
a SIGKILL mid-write leaves either the previous checkpoint or the new one, never half of one;
``latest`` ignores the temp dirs. Only trainable (LoRA) weights are saved: the frozen base comes
from ``--checkpoint_dir`` on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from onegpu.budget import BudgetClock
from onegpu.contracts import staged_dir
from onegpu.finetune.schedule import BudgetSchedule
from onegpu.errors import UserError

STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainState:
    """Where a run is: restored from a checkpoint on ``--resume``, saved with every checkpoint."""

    VERSION: ClassVar[int] = 2  # 2: + the LR schedule's anchors (1: a step-count cosine, resumed as one)

    clock: BudgetClock  # the run's budget clock (time spent by earlier segments carries over)
    schedule: BudgetSchedule | None = None  # set by the trainer once it knows the planned steps
    step: int = 0  # optimizer steps done
    micro_index: int = 0  # micro-batches consumed (across epochs): the data position
    tokens: int = 0  # non-padding tokens trained on
    loss_tokens: int = 0  # tokens that carried a loss
    examples: int = 0
    slots: int = 0  # token slots computed (tokens + padding)
    best_val_loss: float | None = None
    history: list[float] = field(default_factory=list)  # training loss per step
    rng: dict[str, Any] | None = None  # RNG states read from a checkpoint, applied by the trainer

    def record_step(self, batches: list[dict[str, Any]], loss: float) -> None:
        """Count one optimizer step over ``batches`` (collated micro-batches) with mean loss ``loss``."""
        self.step += 1
        self.micro_index += len(batches)
        self.tokens += sum(b["n_tokens"] for b in batches)
        self.loss_tokens += sum(b["n_loss_tokens"] for b in batches)
        self.examples += sum(b["n_examples"] for b in batches)
        self.slots += sum(b["n_slots"] for b in batches)
        self.history.append(loss)

    def state_dict(self) -> dict[str, Any]:
        """The state now, with the RNG states of this moment and the clock's time spent so far."""
        return {"version": self.VERSION, "step": self.step, "micro_index": self.micro_index, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens, "examples": self.examples, "slots": self.slots,
                "best_val_loss": self.best_val_loss, "history": list(self.history), "rng": rng_state(),
                "budget": self.clock.state_dict(), "schedule": self.schedule.state_dict() if self.schedule else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters and the clock (a new segment starts now); keep the RNG states in ``rng``.

        The RNG states are not applied here: building the model draws random numbers, so the trainer
        applies them (``set_rng_state(state.rng)``) as the last thing before the loop.
        """
        version = state.get("version")
        if version not in (1, self.VERSION):
            raise UserError(f"the checkpoint holds training state version {version}; this onegpu reads version "
                            f"{self.VERSION}", fix="resume with the onegpu version that wrote it, or start fresh "
                                                   "(drop --resume / use a new --out_dir)")
        for name in ("step", "micro_index", "tokens", "loss_tokens", "examples", "slots", "best_val_loss"):
            setattr(self, name, state[name])
        self.history = list(state["history"])
        self.rng = state["rng"]
        self.clock.restore(state["budget"])
        if self.schedule is not None:
            if state.get("schedule"):
                self.schedule.load_state_dict(state["schedule"])
            else:  # version 1 decayed over the planned steps: past warm-up, it continues as the step schedule
                self.schedule.resume_from_step_schedule(self.step, self.clock.elapsed_s)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_root: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    """Write ``step-XXXXXX`` atomically, then drop all but the newest ``keep_last``."""
    final = ckpt_root / f"step-{step:06d}"
    with staged_dir(final) as tmp:
        torch_save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    for old in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a file closed here, synced to disk before it is renamed into place.

    A write that fails frees its space at once (no open handle outlives it), and a full disk is
    raised as the ``OSError`` it is (torch reports it as a RuntimeError, the OSError as its context).
    """
    try:
        with open(path, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except RuntimeError as err:
        cause = err.__context__
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, cause.strerror, str(path)) from err
        raise


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.pt``: model, optimizer, ``train_state`` (a TrainState dict), wandb_id."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if "train_state" not in state and "progress" in state:
        # written before TrainState had a version: the counters under "progress", RNG and clock beside them
        state["train_state"] = {"version": 1, **state.pop("progress"), "rng": state.pop("rng"),
                                "budget": state.pop("budget")}
    return state
