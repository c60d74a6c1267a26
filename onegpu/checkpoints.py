"""Checkpoint sources every consumer (server, eval, pack) accepts, resolved one way.

A source is a litgpt checkpoint dir (merged: ``lit_model.pth``), a LoRA adapter dir in litgpt's
layout (``lit_model.pth.lora`` + ``hyperparameters.yaml`` whose ``checkpoint_dir`` names the
base), or ``wandb:ENTITY/PROJECT/NAME:ALIAS`` (a ``model`` artifact, online only). Adapters are
merged with litgpt's own ``merge_lora`` once and cached, so a server restart, a second eval or a
HELM run after a validation run reuse the same merged weights.

The prompt format travels with the checkpoint as litgpt's ``prompt_style.yaml``: ``auto`` finds
it (in the dir, else in the adapter's base), ``raw`` ignores it, a name forces one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from onegpu.errors import UserError
from onegpu.paths import cache_dir

WANDB_PREFIX = "wandb:"


@dataclass(frozen=True)
class CheckpointRef:
    path: Path               # the dir as given (after any artifact download)
    base: Path | None = None  # the base model of an adapter-only dir

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
    if (path / "lit_model.pth").is_file():
        _require(path, ("model_config.yaml",))
        if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            raise UserError(f"{path} has no tokenizer.json or tokenizer.model",
                            fix="copy the base model's tokenizer files into the checkpoint dir")
        return CheckpointRef(path)
    if (path / "lit_model.pth.lora").is_file():
        hparams_file = path / "hyperparameters.yaml"
        if not hparams_file.is_file():
            raise UserError(f"adapter dir {path} has no hyperparameters.yaml (it names the base checkpoint)",
                            fix="use the dir litgpt/onegpu finetune wrote, which holds both files")
        import yaml

        named = base_checkpoint is None
        hparams = yaml.safe_load(hparams_file.read_text(encoding="utf-8")) or {}
        base = Path(str(base_checkpoint or hparams.get("checkpoint_dir") or "")).expanduser()
        if not (base / "lit_model.pth").is_file():
            where = "hyperparameters.yaml: checkpoint_dir" if named else "--base_checkpoint"
            raise UserError(f"the adapter's base checkpoint {str(base)!r} ({where}) has no lit_model.pth",
                            fix="prepare the base model (`onegpu model prepare ...`) and name it with "
                                "--base_checkpoint DIR or in hyperparameters.yaml")
        return CheckpointRef(path, base)
    raise UserError(f"{path} holds neither lit_model.pth nor lit_model.pth.lora",
                    fix="pass a litgpt checkpoint dir (merged) or a LoRA adapter dir with hyperparameters.yaml")


def merged_checkpoint(ref: CheckpointRef) -> Path:
    """A loadable (merged) litgpt checkpoint dir for ``ref``: as is, or base + adapter merged once."""
    if not ref.is_adapter:
        return ref.path
    from litgpt.scripts.merge_lora import merge_lora

    adapter_dir, base = ref.path, ref.base
    lora = adapter_dir / "lit_model.pth.lora"
    key = hashlib.sha256(f"{lora.resolve()}|{lora.stat().st_size}|{lora.stat().st_mtime_ns}|{base.resolve()}"
                         .encode()).hexdigest()[:16]
    merged = cache_dir() / "merged" / f"{adapter_dir.name}-{key}"
    if (merged / "lit_model.pth").is_file():
        return merged
    merged.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{merged.name}-", dir=merged.parent))
    for item in base.iterdir():  # tokenizer + configs of the base, never its weights
        if item.is_file() and item.name != "lit_model.pth":
            (work / item.name).symlink_to(item.resolve())
    for item in adapter_dir.iterdir():  # the adapter's own files win (prompt_style.yaml, lineage...)
        if item.is_file() and item.name != "lit_model.pth":
            target = work / item.name
            if target.exists() or target.is_symlink():
                target.unlink()
            shutil.copy2(item, target)
    print(f"[onegpu] merging LoRA adapter {adapter_dir} into base {base} -> {merged}", file=sys.stderr)
    merge_lora(work, pretrained_checkpoint_dir=base)  # precision: the adapter's hyperparameters.yaml
    try:
        work.rename(merged)
    except OSError:  # another process merged it first
        shutil.rmtree(work, ignore_errors=True)
    return merged


def download_wandb_artifact(name: str) -> Path:
    """Download a W&B ``model`` artifact (``entity/project/name:alias``) into the cache; online only."""
    if os.environ.get("WANDB_MODE", "offline") in ("offline", "disabled", "dryrun"):
        raise UserError(f"model source {WANDB_PREFIX}{name} is a W&B artifact, but W&B is offline here",
                        fix="`wandb login` and set WANDB_MODE=online, or pass the local checkpoint dir")
    import wandb

    target = cache_dir() / "artifacts" / name.replace("/", "--").replace(":", "-")
    try:
        return Path(wandb.Api().artifact(name, type="model").download(root=str(target)))
    except Exception as err:  # wandb raises CommError/ValueError variants
        raise UserError(f"could not download W&B artifact {name!r}: {err}",
                        fix="check the name (entity/project/name:alias as on its W&B page), `wandb login`, "
                            "network") from err


def resolve_prompt_style(spec: str, checkpoint: Path, base: Path | None = None, who: str = "onegpu"):
    """``raw`` -> None; ``auto`` -> the checkpoint's (or its base's) prompt_style.yaml, else None
    with a warning; otherwise a litgpt prompt-style name (unknown names list the known ones)."""
    from litgpt.prompts import has_prompt_style, load_prompt_style

    if spec == "raw":
        return None
    if spec == "auto":
        for d in (checkpoint, base):
            if d is not None and has_prompt_style(Path(d)):
                return load_prompt_style(Path(d))
        print(f"[{who}] warning: {checkpoint} has no prompt_style.yaml; prompts go in raw "
              "(pass --prompt_style NAME to wrap them in a template)", file=sys.stderr)
        return None
    from litgpt.prompts import PromptStyle, prompt_styles

    if spec not in prompt_styles:
        raise UserError(f"unknown prompt style {spec!r}",
                        fix=f"use raw, auto, or one of litgpt's: {', '.join(sorted(prompt_styles))}")
    return PromptStyle.from_name(spec)


def _require(path: Path, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise UserError(f"checkpoint dir {path} lacks {', '.join(missing)}",
                        fix="use a complete litgpt checkpoint dir (see `onegpu model prepare`)")
