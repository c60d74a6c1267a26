"""Disk before work: what a fine-tune will write, checked against the free space before it starts.

A 24-hour run that fills its disk while merging at hour 23 loses the day. ``onegpu finetune``
checks this before loading the model, and again before the merge; ``onegpu finetune plan`` shows
it. The one formula, from the model config (litgpt's model on the meta device, as the memory
model counts it: ``finetune/planning/memory.py``), in bytes:

    checkpoint   = LoRA weights (trainable params x weight bytes)
                   + optimizer states (``memory.optimizer_state_bytes``, all of them: on disk even
                   paged ones) + the training state (counters, RNG, loss history: ~1 MiB)
    checkpoints  = checkpoint x (keep_last + 1): a new one is written before the oldest is pruned
                   (keep_last 0 keeps every one: one per save_interval steps, and the final one)
    final/       = merged weights ((total - trainable) params x the merge dtype's bytes; none with
                   --merge false) + the LoRA adapter + the base's tokenizer/config files + 64 KiB
                   (final/'s own small files) (+ the weights again as ``final/hf`` with --export_hf)
    W&B's copy   = final/ again: W&B copies every file of the logged model artifact into its
                   staging dir (``$WANDB_DATA_DIR``, default ~/.local/share/wandb) and keeps it
                   until it is uploaded (offline: until ``wandb sync``); none with W&B disabled
    margin       = 2% + 32 MiB (logs, metrics, plots, the W&B run's own files)

Each part is charged to the filesystem it lands on; a run fits when every filesystem has room for
its parts. Checkpoints already on disk (a resumed run) count towards the ones it keeps.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from litgpt import Config
from wandb import env

from onegpu.errors import UserError
from onegpu.finetune.checkpoint import list_checkpoints
from onegpu.finetune.planning.memory import Workload, count_weights, meta_model, optimizer_state_bytes
from onegpu.paths import runs_dir
from onegpu.tracking import wandb_mode

TRAIN_STATE_BYTES = 1 << 20  # counters, RNG states and the loss history of a checkpoint (generous)
FINAL_FILES_BYTES = 64 << 10  # final/'s own small files (hyperparameters, prompt style, lineage) + file headers
MARGIN_FRACTION = 0.02
MARGIN_BYTES = 32 << 20
MERGE_DTYPE_BYTES = {"32-true": 4, "bf16-true": 2, "bf16-mixed": 2, "16-true": 2, "16-mixed": 2}


@dataclass
class DiskNeed:
    """What a run writes: (what, where it lands, bytes) per part."""

    parts: list[tuple[str, Path, int]] = field(default_factory=list)

    def add(self, what: str, where: Path, nbytes: int) -> None:
        if nbytes > 0:
            self.parts.append((what, Path(where), int(nbytes)))

    @property
    def total(self) -> int:
        return sum(n for _what, _where, n in self.parts)

    def shortfalls(self) -> list[dict[str, Any]]:
        """Per filesystem that lacks room: its mount, need (with margin), free bytes and the parts."""
        by_fs: dict[int, list[tuple[str, Path, int]]] = {}
        for part in self.parts:
            by_fs.setdefault(_existing(part[1]).stat().st_dev, []).append(part)
        short = []
        for parts in by_fs.values():
            place = _existing(parts[0][1])
            need = sum(n for _w, _p, n in parts)
            need += int(MARGIN_FRACTION * need) + MARGIN_BYTES
            free = shutil.disk_usage(place).free
            if need > free:
                short.append({"mount": _mount_point(place), "need": need, "free": free, "parts": parts})
        return short

    def describe(self) -> str:
        """``step checkpoints (3 x 2.1 MiB): 6.3 MiB, merged model: 514.0 MiB, ...; total 1.0 GiB``."""
        return ", ".join(f"{what}: {human(n)}" for what, _where, n in self.parts) + f"; total {human(self.total)}"


def human(nbytes: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where it will be created)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = _existing(path)
    while not os.path.ismount(path):
        path = path.parent
    return path


# ------------------------------------------------------------------------------------ the sizes
@dataclass(frozen=True)
class ModelSizes:
    """Bytes of what a fine-tune of this config writes, from the model config alone."""

    checkpoint: int  # one step checkpoint: LoRA weights + optimizer states + training state
    adapter: int  # final/lit_model.pth.lora
    merged: int  # final/lit_model.pth (and the same again for final/hf)
    small_files: int  # tokenizer and config files copied into final/


def model_sizes(config: Any, workload: Any, checkpoint_dir: Path | None) -> ModelSizes:
    """Sizes for a litgpt ``Config`` and a ``memory.Workload`` (precision, quantize, LoRA layers, optimizer)."""

    workload = replace(workload, device="cpu")  # on disk, every optimizer state counts (none is paged out)
    weights = count_weights(meta_model(config, workload), workload)
    optimizer, _paged = optimizer_state_bytes(weights.lora_numels, workload.optimizer, workload.weight_bytes, "cpu")
    base = Path(checkpoint_dir).expanduser() if checkpoint_dir else None  # absent when planning by name
    small = FINAL_FILES_BYTES + (sum(p.stat().st_size for p in base.iterdir()
                                     if p.is_file() and not p.name.startswith("lit_model.pth"))
                                 if base is not None and base.is_dir() else 0)
    merged = (weights.total_params - weights.trainable_params) * MERGE_DTYPE_BYTES[workload.precision]
    return ModelSizes(checkpoint=weights.lora_bytes + optimizer + TRAIN_STATE_BYTES, adapter=weights.lora_bytes,
                      merged=merged, small_files=small)


def config_sizes(cfg: Any) -> ModelSizes:
    """Sizes for a resolved ``FinetuneConfig`` (``finetune/config.py``)."""

    workload = Workload(precision=cfg.model.precision, quantize=cfg.model.quantize, optimizer=cfg.train.optimizer,
                        **{k: v for k, v in asdict(cfg.lora).items() if k != "lora_alpha"})
    config = Config.from_file(cfg.model.checkpoint_dir / "model_config.yaml")
    return model_sizes(config, workload, cfg.model.checkpoint_dir)


def final_need(ckpt: Any, sizes: ModelSizes) -> DiskNeed:
    """final/ (merged weights, adapter, files; HF export) and W&B's copy of it, for ``CheckpointArgs``."""

    need = DiskNeed()
    final = Path(ckpt.out_dir) / "final"
    if ckpt.merge:
        need.add("merged model", final, sizes.merged)
    need.add("LoRA adapter + tokenizer/config files", final, sizes.adapter + sizes.small_files)
    need.add("HF export", final, sizes.merged + sizes.small_files if ckpt.export_hf else 0)
    if wandb_mode()[0] != "disabled":
        need.add("W&B's copy of final/", wandb_staging_dir(), need.total)
    return need


def run_need(ckpt: Any, sizes: ModelSizes, total_steps: int | None, steps_done: int = 0) -> DiskNeed:
    """Everything a run writes from ``steps_done`` to the end: step checkpoints, then ``final_need``.

    ``ckpt``: the ``CheckpointArgs`` (out_dir, save_interval, keep_last, final_checkpoint, merge,
    export_hf). ``total_steps`` None (not known before the data is read): as many checkpoints as kept.
    """

    root = Path(ckpt.out_dir) / "checkpoints"
    saves = ckpt.keep_last + 1 if total_steps is None else (
        (total_steps - steps_done) // ckpt.save_interval if ckpt.save_interval else 0)
    saves += 1 if ckpt.final_checkpoint else 0
    kept = ckpt.keep_last + 1 if ckpt.keep_last > 0 else saves
    new = max(min(saves, 1), min(saves, kept) - len(list_checkpoints(root)))
    need = DiskNeed()
    need.add(f"step checkpoints ({new} x {human(sizes.checkpoint)})", root, new * sizes.checkpoint)
    need.parts += final_need(ckpt, sizes).parts
    return need


def wandb_staging_dir() -> Path:
    """Where W&B copies the files of a logged artifact (``wandb.sdk.artifacts.staging``)."""

    return Path(env.get_data_dir()) / "artifacts" / "staging"


def plan_disk(ckpt: Any, sizes: ModelSizes, total_steps: int | None) -> dict[str, Any]:
    """The disk part of a plan (``finetune plan``): what the run would write and whether it fits.

    ``ckpt``: the run's ``CheckpointArgs`` as given (no ``--out_dir``: the default, runs/finetune).
    """

    ckpt = replace(ckpt, out_dir=Path(ckpt.out_dir or runs_dir() / "finetune").expanduser())
    need = run_need(ckpt, sizes, total_steps)
    short = need.shortfalls()
    text = (f"writes up to {need.describe()}: " + ("fits the free space" if not short else "does NOT fit: " + "; ".join(
        f"{s['mount']} needs {human(s['need'])} with the margin, {human(s['free'])} free" for s in short)))
    return {"need_bytes": need.total, "fits": not short, "text": text,
            "short": [{**s, "mount": str(s["mount"]), "parts": [(w, str(p), n) for w, p, n in s["parts"]]}
                      for s in short]}


def check(need: DiskNeed, what: str, fix: str) -> None:
    """UserError naming each filesystem without room: need vs free, and the parts."""
    short = need.shortfalls()
    if not short:
        return
    lines = [f"{s['mount']}: needs {human(s['need'])} (with a {MARGIN_FRACTION:.0%} + {human(MARGIN_BYTES)} margin; "
             + ", ".join(f"{w}: {human(n)}" for w, _p, n in s["parts"]) + f"), {human(s['free'])} free" for s in short]
    raise UserError(f"not enough free disk for {what}: " + "; ".join(lines), fix=fix)
