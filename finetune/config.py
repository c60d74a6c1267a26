"""``resolve(options)``: the options of ``onegpu finetune`` (``finetune/options.py``), every default settled once.

It checks the values (``option_problems``), settles device, precision, checkpoint dir, prompt style,
max_seq_length, out_dir and the budget clock, and loads the data once (a W&B download when online,
the bundled model's one-off conversion with no ``--checkpoint_dir``); it returns a frozen
``FinetuneConfig``. Every problem raises ``UserError`` before any model weights are loaded.

The trainer (``finetune/lora.py``), plan mode (``finetune/planning/plan.py``) and the sweep pre-flight
(``sweeps/runner.py``) all go through ``resolve``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import wandb
import yaml

from onegpu.budget import BudgetClock
from onegpu.contracts import artifact_name, dataset_digest, read_manifest
from onegpu.errors import UserError, all_problems
from onegpu.finetune.options import CheckpointArgs, DataArgs, FinetuneOptions, ModelArgs, option_problems
from onegpu.finetune.proxy import load_proxy_items
from onegpu.model import prepare
from onegpu.paths import runs_dir
from onegpu.tracking import wandb_online


# ------------------------------------------------------------------------------------- resolve
@dataclass(frozen=True)
class DataBundle:
    """A data-stage dir, loaded: its manifest, all train and val rows, and its identity for lineage."""

    path: Path
    manifest: dict[str, Any]
    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    manifest_sha256: str  # of manifest.json (the model card checks the data dir it is given against it)
    digest: str  # the dataset artifact's digest (contracts.dataset_digest: the manifest's content_hash)
    name: str  # the dataset artifact's name (contracts.artifact_name), as the data stage logged it


@dataclass(frozen=True)
class FinetuneConfig(FinetuneOptions):
    """The options with every default settled (``resolve``), the loaded data and the budget clock."""

    dataset: DataBundle
    clock: BudgetClock
    proxy: tuple = ()  # the test proxy's HelmItems (finetune/proxy.py), none without --proxy_suite


def resolve(options: FinetuneOptions) -> FinetuneConfig:
    """Check the options, settle every default and load the inputs, once, before any model loading.

    Loads all train/val rows (or downloads the W&B dataset artifact when online) and, without
    ``--checkpoint_dir``, converts the bundled model once (``onegpu model prepare``).
    """

    problems = option_problems(options)  # every problem is collected and reported at once
    proxy_items = collect_problems(problems, load_proxy_items, options.eval.proxy_suite, options.eval.proxy_items)
    model = collect_problems(problems, resolve_model, options.model, options.train.optimizer)
    dataset = collect_problems(problems, load_data, options.data.data)
    checkpoints = collect_problems(problems, resolve_checkpoint_args, options.checkpoints)
    if problems:
        raise all_problems(problems)
    # The clock starts once the data is read: everything after it (tokenizing, loading) is charged.
    clock = BudgetClock.from_spec(options.budget.budget, options.budget.budget_reserve, options.budget.track)
    data = resolve_data_args(options.data, dataset.manifest, model_block_size(model.checkpoint_dir))
    return FinetuneConfig(data=data, model=model, lora=options.lora, train=options.train, budget=options.budget,
                          checkpoints=checkpoints, eval=options.eval, logging=options.logging,
                          dataset=dataset, clock=clock, proxy=proxy_items)


def collect_problems(problems: list[UserError], check: Any, *args: Any) -> Any:
    """``check(*args)``, or None with its UserError appended to ``problems``."""
    try:
        return check(*args)
    except UserError as err:
        problems.append(err)
        return None


def resolve_model(model: ModelArgs, optimizer: str) -> ModelArgs:
    """Device (auto -> cuda when visible), precision default per device, the checkpoint dir (bundled by default)."""

    if model.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible", fix="use --device cpu (or auto)")
    device = "cuda" if model.device == "cuda" or (model.device == "auto" and torch.cuda.is_available()) else "cpu"
    precision = model.precision or ("bf16-true" if device == "cuda" else "32-true")
    if device == "cpu" and precision.startswith(("bf16", "16")):
        warnings.warn(f"!!! precision {precision} on CPU: half-precision matmuls on this CPU are emulated and "
                      "can be ~100-500x slower than fp32. Use --precision 32-true on CPU. !!!", stacklevel=3)
        print(f"[onegpu] WARNING: {precision} on CPU is extremely slow here; --precision 32-true is the sane "
              "default on CPU", file=sys.stderr)
    problems = []
    if optimizer == "paged_adamw" and device != "cuda":
        problems.append(UserError("paged_adamw pages optimizer state between GPU and CPU memory and needs CUDA",
                                  fix="use --optimizer adamw (or adamw8bit) on CPU"))
    checkpoint_dir = collect_problems(problems, find_checkpoint_dir, model.checkpoint_dir)
    if problems:
        raise all_problems(problems)
    return dataclasses.replace(model, device=device, precision=precision, checkpoint_dir=checkpoint_dir)


def find_checkpoint_dir(given: Path | None) -> Path:
    """The base litgpt checkpoint (the bundled model, converted once, when none is given), checked."""
    if given is None:

        given = Path(prepare())
    ckpt = Path(given).expanduser()
    missing = [n for n in ("lit_model.pth", "model_config.yaml") if not (ckpt / n).is_file()]
    if missing:
        raise UserError(f"{ckpt} is not a litgpt checkpoint (missing {', '.join(missing)})",
                        fix="pass a dir made by `onegpu model prepare` (it prints the path), or omit "
                            "--checkpoint_dir for the bundled model")
    if not (ckpt / "tokenizer.json").is_file() and not (ckpt / "tokenizer.model").is_file():
        raise UserError(f"{ckpt} has no tokenizer (tokenizer.json / tokenizer.model)",
                        fix="re-run `onegpu model prepare` for this model")
    return ckpt


def model_block_size(checkpoint: Path) -> int:
    return int(yaml.safe_load((checkpoint / "model_config.yaml").read_text()).get("block_size", 2048))


DEFAULT_MAX_SEQ_LENGTH = 512  # with no --max_seq_length and none in the data manifest


def requested_max_seq_length(requested: int | None, manifest: dict[str, Any]) -> int:
    """``--max_seq_length``, else the data manifest's, else 512 (before the model's block size caps it)."""
    return requested or int(manifest.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH)


def settle_max_seq_length(requested: int | None, manifest: dict[str, Any], block_size: int) -> int:
    """The one rule: ``requested_max_seq_length``, at most the model's block size."""
    length = requested_max_seq_length(requested, manifest)
    if length > block_size:
        print(f"[onegpu] max_seq_length {length} > the model's block size {block_size}; using {block_size}",
              file=sys.stderr)
    return min(length, block_size)


def resolve_data_args(data: DataArgs, manifest: dict[str, Any], block_size: int) -> DataArgs:
    """The prompt style (given, else the manifest's) and max_seq_length. The style's name is checked
    against litgpt's when the trainer renders the rows: importing litgpt here would slow every
    sweep pre-flight by the seconds it takes to import lightning."""
    style = data.prompt_style or manifest.get("prompt_style")
    if not style:
        raise UserError("no prompt style: the manifest has no prompt_style and none was given",
                        fix="pass --prompt_style NAME (a litgpt prompt style, e.g. alpaca or chatml)")
    return dataclasses.replace(data, prompt_style=style,
                   max_seq_length=settle_max_seq_length(data.max_seq_length, manifest, block_size))


def resolve_checkpoint_args(checkpoints: CheckpointArgs) -> CheckpointArgs:
    out_dir = checkpoints.out_dir
    if out_dir is None:

        # Under `wandb agent`, trials on one machine must not share (and resume!) one dir.
        sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
        out_dir = runs_dir() / (f"sweep-{sweep_id}/{run_id}" if sweep_id and run_id else "finetune")
    if checkpoints.resume not in (None, "auto") and not (Path(checkpoints.resume).expanduser() / "state.pt").is_file():
        raise UserError(f"--resume {checkpoints.resume}: no state.pt there",
                        fix="use --resume auto, or a dir like OUT/checkpoints/step-000100")
    return dataclasses.replace(checkpoints, out_dir=Path(out_dir).expanduser())


# ---------------------------------------------------------------------------------------- data
def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a data-stage JSONL file ([] when missing); a broken line is an error, not skipped."""
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n} is not valid JSON ({err})",
                                fix="rebuild the data dir with `onegpu data build`") from err
    return rows


def find_data_dir(data: str | None) -> Path:
    """The data dir: a local path, or a W&B dataset artifact downloaded when online."""
    if data is None:
        raise UserError("no training data given", fix="pass --data DIR (the output dir of `onegpu data build`)")
    path = Path(data).expanduser()
    if path.is_dir():
        return path

    if not path.exists() and wandb_online():

        try:
            return Path(wandb.Api().artifact(data, type="dataset").download())
        except Exception as err:
            raise UserError(f"could not fetch the W&B dataset artifact {data!r}: {err}",
                            fix="check the artifact name (entity/project/name:alias) and `wandb login`") from err
    raise UserError(f"data dir {str(path)!r} does not exist",
                    fix="pass the output dir of `onegpu data build` (with train.jsonl and manifest.json), "
                        "or a W&B dataset artifact with WANDB_MODE=online")


def check_files_match_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """train.jsonl and val.jsonl are the files the manifest describes (its sha256s), not others'."""
    for name, recorded in (manifest.get("files") or {}).items():
        if name == "rejects.jsonl":
            continue  # not read for training
        actual = hashlib.sha256((path / name).read_bytes()).hexdigest() if (path / name).is_file() else None
        if actual != recorded:
            raise UserError(f"{path / name} is not the file its manifest.json describes (sha256 {actual} vs {recorded})",
                            fix="its build was interrupted or the file was edited: rebuild the dir with "
                                "`onegpu data build RECIPE --out DIR`")


def load_data(data: str | None) -> DataBundle:
    """Read a data dir once: manifest, every train and val row, and the dataset artifact's name and digest."""
    path = find_data_dir(data)
    manifest = read_manifest(path)
    train_rows = read_rows(path / "train.jsonl")
    if not train_rows:
        raise UserError(f"the training set {path / 'train.jsonl'} is empty or missing",
                        fix="rebuild the mix with `onegpu data build` (check its rejects.jsonl for why rows were dropped)")
    val_rows = read_rows(path / "val.jsonl")
    check_files_match_manifest(path, manifest)
    manifest_sha256 = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    name = artifact_name("dataset", manifest.get("name") or path.name)
    return DataBundle(path, manifest, train_rows, val_rows, manifest_sha256, dataset_digest(path, manifest), name)
