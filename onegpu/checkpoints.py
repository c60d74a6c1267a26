"""Checkpoint sources, checked without loading anything: what ``onegpu serve``, ``eval``, ``submission
pack`` and ``model push`` accept as a model, and what a checkpoint says about itself.

* a litgpt checkpoint dir (merged: ``lit_model.pth``);
* a LoRA adapter dir in litgpt's layout (``lit_model.pth.lora`` + ``hyperparameters.yaml`` whose
  ``checkpoint_dir`` names the base), which ``onegpu.inference.merged_checkpoint`` merges;
* ``wandb:ENTITY/PROJECT/NAME:ALIAS`` (a W&B ``model`` artifact, online only).

Light on purpose (no torch, no litgpt): a verb checks its source here before its engine loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from onegpu.contracts import read_json
from onegpu.errors import UserError
from onegpu.tracking import WANDB_PREFIX, download_wandb_artifact


@dataclass(frozen=True)
class CheckpointRef:
    """A validated checkpoint source; nothing loaded or merged yet."""

    path: Path                        # the dir as given (after any artifact download)
    base: Path | None = None          # adapter-only dirs: the base checkpoint to merge into
    trained_from: Path | None = None  # the base it was fine-tuned from (--base_checkpoint, else
                                      # hyperparameters.yaml); may not exist on this machine

    @property
    def is_adapter(self) -> bool:
        return self.base is not None


def locate_checkpoint(checkpoint: str | Path, base_checkpoint: str | Path | None = None) -> CheckpointRef:
    """Validate a checkpoint source without loading or merging anything (cheap: call it first)."""
    if str(checkpoint).startswith(WANDB_PREFIX):
        checkpoint = download_wandb_artifact(str(checkpoint)[len(WANDB_PREFIX):])
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise UserError(f"checkpoint dir {path} does not exist",
                        fix="pass the dir that `onegpu model prepare` printed, a fine-tune's out/final, "
                            "or wandb:ENTITY/PROJECT/NAME:ALIAS")
    named = Path(str(base_checkpoint)).expanduser() if base_checkpoint else _named_base(path)
    if (path / "lit_model.pth").is_file():
        _require(path, ("model_config.yaml",))
        if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            raise UserError(f"{path} has no tokenizer.json or tokenizer.model",
                            fix="copy the base model's tokenizer files into the checkpoint dir")
        return CheckpointRef(path, trained_from=named)
    if (path / "lit_model.pth.lora").is_file():
        if not (path / "hyperparameters.yaml").is_file():
            raise UserError(f"adapter dir {path} has no hyperparameters.yaml (it names the base checkpoint)",
                            fix="use the dir litgpt/onegpu finetune wrote, which holds both files")
        if named is None or not (named / "lit_model.pth").is_file():
            where = "--base_checkpoint" if base_checkpoint else "hyperparameters.yaml: checkpoint_dir"
            raise UserError(f"the adapter's base checkpoint {str(named or '')!r} ({where}) has no lit_model.pth",
                            fix="prepare the base model (`onegpu model prepare ...`) and name it with "
                                "--base_checkpoint DIR or in hyperparameters.yaml")
        return CheckpointRef(path, base=named, trained_from=named)
    raise UserError(f"{path} holds neither lit_model.pth nor lit_model.pth.lora",
                    fix="pass a litgpt checkpoint dir (merged) or a LoRA adapter dir with hyperparameters.yaml")


def _named_base(path: Path) -> Path | None:
    """The base model a fine-tune's ``hyperparameters.yaml`` names (``checkpoint_dir``), if any."""
    hparams_file = path / "hyperparameters.yaml"
    if not hparams_file.is_file():
        return None
    named = (yaml.safe_load(hparams_file.read_text(encoding="utf-8")) or {}).get("checkpoint_dir")
    return Path(str(named)).expanduser() if named else None


def _require(path: Path, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise UserError(f"checkpoint dir {path} lacks {', '.join(missing)}",
                        fix="use a complete litgpt checkpoint dir (see `onegpu model prepare`)")


def checkpoint_lineage(checkpoint: Path) -> dict[str, Any]:
    """What the checkpoint says about itself (``onegpu_model.json``), for run lineage; {} if nothing."""
    return read_json(Path(checkpoint) / "onegpu_model.json")
