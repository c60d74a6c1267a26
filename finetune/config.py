"""The options of ``onegpu finetune``, typed and grouped, and ``resolve()``: every default settled once.

Three steps, each with a name that says what it does:

* ``finetune_options(...)``: the flat option names users and sweep YAMLs write (``--lora_r``,
  ``--learning_rate`` ...), documented in one signature that the CLI, ``--config`` files and plan
  mode share, turned into a frozen ``FinetuneOptions`` of option groups (``DataArgs``,
  ``ModelArgs``, ``LoRAArgs``, ``TrainArgs``, ``BudgetArgs``, ``CheckpointArgs``, ``EvalArgs``,
  ``LoggingArgs``; a group's field names are the flat names);
* ``check_options(options)``: every check on the values alone (no files, no GPU), in milliseconds;
* ``resolve(options)``: settles device, precision, checkpoint dir, prompt style, max_seq_length,
  out_dir and the budget clock, and loads the data once (a W&B download when online, the bundled
  model's one-off conversion with no ``--checkpoint_dir``); returns a frozen ``FinetuneConfig``.
  Every problem raises ``UserError`` before any model weights are loaded.

The trainer (``finetune/lora.py``), plan mode (``finetune/planning/plan.py``) and the sweep pre-flight
(``sweeps/runner.py``) all go through ``resolve``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from onegpu.budget import BudgetClock
from onegpu.contracts import Quantize, Track, artifact_name, dataset_digest, read_manifest
from onegpu.errors import UserError, all_problems

Precision = Literal["32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed"]
Optimizer = Literal["adamw", "paged_adamw", "adamw8bit"]
Device = Literal["auto", "cpu", "cuda"]
Select = Literal["last", "best_proxy"]


# ------------------------------------------------------------------------------- option groups
# Field names are the flat option names; finetune_options() documents each one.
@dataclass(frozen=True)
class DataArgs:
    """What to train on and how examples become rows."""

    data: str | None
    prompt_style: str | None  # resolved: the manifest's when not given
    max_seq_length: int | None  # resolved: see settle_max_seq_length
    packing: bool
    train_on_prompt: bool


@dataclass(frozen=True)
class ModelArgs:
    """The base model and the device it trains on."""

    checkpoint_dir: Path | None  # resolved: the bundled model when not given
    precision: Precision | None  # resolved: bf16-true on CUDA, 32-true on CPU
    quantize: Quantize | None
    device: Device  # resolved: cpu or cuda
    num_threads: int | None


@dataclass(frozen=True)
class LoRAArgs:
    """litgpt's LoRA settings (the same names as litgpt's ``Config``)."""

    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_query: bool
    lora_key: bool
    lora_value: bool
    lora_projection: bool
    lora_mlp: bool
    lora_head: bool


@dataclass(frozen=True)
class TrainArgs:
    """Batches, optimizer, schedule, length of training."""

    micro_batch_size: int
    global_batch_size: int
    learning_rate: float
    weight_decay: float
    optimizer: Optimizer
    warmup_steps: int
    min_lr_ratio: float
    max_norm: float
    epochs: float
    max_steps: int | None
    neftune_alpha: float
    activation_checkpointing: bool
    seed: int

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step."""
        return self.global_batch_size // self.micro_batch_size


@dataclass(frozen=True)
class BudgetArgs:
    """The challenge track and the wall-clock budget."""

    track: Track
    budget: str | None
    budget_reserve: str


@dataclass(frozen=True)
class CheckpointArgs:
    """Where the run writes, how often it checkpoints, where it resumes from."""

    out_dir: Path | None  # resolved: runs/finetune (runs/sweep-<id>/<run id> under `wandb agent`)
    save_interval: int
    save_interval_minutes: float | None
    keep_last: int
    final_checkpoint: bool
    resume: str | None
    merge: bool
    export_hf: bool
    select: Select


@dataclass(frozen=True)
class EvalArgs:
    """Validation loss and the HELM-faithful test proxy during training, sample generations at the end."""

    eval_interval: int
    initial_validation: bool
    eval_max_examples: int
    proxy_suite: str | None
    proxy_interval: int
    proxy_items: int
    num_samples: int
    sample_max_new_tokens: int


@dataclass(frozen=True)
class LoggingArgs:
    """Telemetry and the W&B run."""

    log_interval: int
    wandb_project: str | None
    run_name: str | None
    progress: bool
    remeasure_peak: bool


@dataclass(frozen=True)
class FinetuneOptions:
    """Every option of ``onegpu finetune``, by group, as given (None = "use the default")."""

    data: DataArgs
    model: ModelArgs
    lora: LoRAArgs
    train: TrainArgs
    budget: BudgetArgs
    checkpoints: CheckpointArgs
    eval: EvalArgs
    logging: LoggingArgs

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> FinetuneOptions:
        """The groups from flat option names (each name is a field of exactly one group)."""
        unknown = sorted(set(flat) - set(option_names()))
        missing = [n for n in option_names() if n not in flat]
        if unknown or missing:
            raise TypeError(f"finetune options: unknown {unknown}, missing {missing}")
        return cls(**{name: group(**{f.name: flat[f.name] for f in fields(group)})
                      for name, group in option_groups().items()})

    def flat(self) -> dict[str, Any]:
        """{flat option name: value}, in the order of ``finetune_options``' signature."""
        return {f.name: getattr(getattr(self, group), f.name)
                for group, cls in option_groups().items() for f in fields(cls)}

    def replace(self, **changes: Any) -> FinetuneOptions:
        """A copy with some options (flat names) changed."""
        return FinetuneOptions.from_flat({**self.flat(), **changes})


@functools.cache
def option_groups() -> dict[str, type]:
    """{FinetuneOptions field: its group class}, in order."""
    hints = typing.get_type_hints(FinetuneOptions)
    return {f.name: hints[f.name] for f in fields(FinetuneOptions)}


def option_names() -> list[str]:
    """Every flat option name, in order."""
    return [f.name for cls in option_groups().values() for f in fields(cls)]


def finetune_options(
    data: str | None = None,
    prompt_style: str | None = None,
    max_seq_length: int | None = None,
    packing: bool = True,
    train_on_prompt: bool = False,
    checkpoint_dir: Path | None = None,
    precision: Precision | None = None,
    quantize: Quantize | None = None,
    device: Device = "auto",
    num_threads: int | None = None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    micro_batch_size: int = 4,
    global_batch_size: int = 8,
    learning_rate: float = 3e-4,
    weight_decay: float = 0.0,
    optimizer: Optimizer = "adamw",
    warmup_steps: int = 10,
    min_lr_ratio: float = 0.1,
    max_norm: float = 1.0,
    epochs: float = 1.0,
    max_steps: int | None = None,
    neftune_alpha: float = 0.0,
    activation_checkpointing: bool = False,
    seed: int = 1337,
    track: Track = "rtx4090-24gb",
    budget: str | None = None,
    budget_reserve: str = "auto",
    out_dir: Path | None = None,
    save_interval: int = 50,
    save_interval_minutes: float | None = 30.0,
    keep_last: int = 2,
    final_checkpoint: bool = True,
    resume: str | None = None,
    merge: bool = True,
    export_hf: bool = False,
    select: Select = "last",
    eval_interval: int = 50,
    initial_validation: bool = False,
    eval_max_examples: int = 64,
    proxy_suite: str | None = None,
    proxy_interval: int = 0,
    proxy_items: int = 4,
    num_samples: int = 3,
    sample_max_new_tokens: int = 48,
    log_interval: int = 1,
    wandb_project: str | None = None,
    run_name: str | None = None,
    progress: bool = True,
    remeasure_peak: bool = False,
) -> FinetuneOptions:
    """The options of ``onegpu finetune`` (and ``onegpu finetune plan``), by their flat names.

    Args:
        data: a data-stage output dir (train.jsonl, val.jsonl, manifest.json) or, with
            WANDB_MODE=online, a W&B ``dataset`` artifact name (``entity/project/name:alias``).
        prompt_style: litgpt prompt style to render rows with. Default: the manifest's ``prompt_style``.
        max_seq_length: tokens per row; longer examples are truncated (counted in the summary).
            Default: the data manifest's ``max_seq_length`` (else 512), capped at the model's block size.
        packing: pack several examples per row (block-diagonal causal attention, positions
            restart per example). ``--packing false`` pads one example per row, like litgpt.
        train_on_prompt: also take the loss on prompt tokens (default: responses only).
        checkpoint_dir: the base model, a litgpt checkpoint dir. Default: the bundled SmolLM2-135M.
        precision: ``32-true`` (default on CPU), ``bf16-true`` (default on CUDA), ``bf16-mixed``,
            ``16-true``, ``16-mixed``. QLoRA needs a ``-true`` precision.
        quantize: QLoRA: quantize the frozen base with bitsandbytes: ``bnb.nf4``, ``bnb.nf4-dq``
            (double quantization), ``bnb.fp4``, ``bnb.fp4-dq``, ``bnb.int8``. Works on CPU.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        num_threads: CPU threads for torch (default on CPU: the cores free at start, so a busy machine
            gets 1 thread instead of threads that wait for each other).
        lora_r: LoRA rank (> 0).
        lora_alpha: LoRA alpha; the update is scaled by alpha / r.
        lora_dropout: dropout on the LoRA input.
        lora_query: LoRA on the attention query projection.
        lora_key: LoRA on the attention key projection.
        lora_value: LoRA on the attention value projection.
        lora_projection: LoRA on the attention output projection.
        lora_mlp: LoRA on the MLP projections.
        lora_head: LoRA on the LM head.
        micro_batch_size: rows per forward/backward pass (packed rows when packing).
        global_batch_size: rows per optimizer step; a multiple of micro_batch_size (the ratio is
            the gradient accumulation).
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay.
        optimizer: ``adamw`` (torch), ``paged_adamw`` (bitsandbytes, CUDA), ``adamw8bit`` (bitsandbytes).
        warmup_steps: linear warm-up steps, then cosine decay to ``min_lr_ratio * learning_rate``.
        min_lr_ratio: final learning rate as a fraction of the peak.
        max_norm: gradient clipping norm (0 disables clipping; the norm is still logged).
        epochs: passes over the training set (fractions allowed) when ``max_steps`` is not set.
        max_steps: optimizer steps to run (overrides ``epochs``).
        neftune_alpha: NEFTune embedding-noise alpha (0 = off; 5 is the paper's usual value).
        activation_checkpointing: recompute each block's activations in backward (less memory, ~30% slower).
        seed: seed for initialisation, data order, dropout and noise.
        track: ``rtx4090-24gb`` or ``a100-40gb``: the budget preset (24h) and the memory plan mode checks.
        budget: wall-clock budget, like ``24h``, ``90m``, ``30s``. Default: the track's 24h. Time
            spent by earlier segments of a resumed run counts, up to each one's last heartbeat.
        budget_reserve: time kept back for the final validation + save + merge, e.g. ``15m``;
            ``auto``: 1.25 x this run's measured finalize time, or 1.25 x 2 x its measured load time
            before one was measured (plan mode: 10% of the budget, at most 20m).
        out_dir: where metrics, checkpoints and ``final/`` go. Default: ``$ONEGPU_RUNS/finetune`` (./runs), or
            ``$ONEGPU_RUNS/sweep-<id>/<run id>`` under ``wandb agent``.
        save_interval: checkpoint every N optimizer steps (0 = off).
        save_interval_minutes: also checkpoint when this many minutes passed since the last one (0 or None = off).
        keep_last: how many checkpoints to keep.
        final_checkpoint: also checkpoint after the last step (LoRA + optimizer state), so
            ``--resume auto`` can continue a finished run. ``false`` for throw-away runs (sweep trials).
        resume: ``auto`` = continue from the newest checkpoint in ``out_dir`` if there is one; or a
            ``checkpoints/step-XXXXXX`` dir. Default: start fresh.
        merge: write the merged model (~0.5 GB for the bundled model) to ``final/``; ``false`` keeps
            only the LoRA adapter there (``final/lit_model.pth.lora`` + configs, ~1 MB), enough for
            the report (``onegpu eval``/``serve`` load an adapter dir as it is).
        export_hf: also write a Hugging Face format copy to ``final/hf/``.
        select: which weights ``final/`` gets: ``last`` (the last step's) or ``best_proxy`` (the
            best test-proxy evaluation's; needs ``--proxy_suite``). Recorded in summary.json.
        eval_interval: validation loss every N optimizer steps (0 = only at the end).
        initial_validation: also validate before the first step (logged as step 0), so the
            validation curve starts at the base model.
        eval_max_examples: validation examples per evaluation.
        proxy_suite: an eval suite (``eval/suites/NAME.yaml``, e.g. ``offline``) whose HELM-faithful
            ``onegpu_helm_*`` tasks are the test proxy: generated answers scored by HELM's exact
            match on the live LoRA weights (``finetune/proxy.py``), logged as ``proxy/*``.
        proxy_interval: score the test proxy every N optimizer steps (0 = only at the end).
        proxy_items: items per task of the proxy (a fixed, seeded sample; the same in every run).
        num_samples: how many fixed prompts to generate for at the end (0 = skip).
        sample_max_new_tokens: tokens generated per fixed prompt for the sample table.
        log_interval: log telemetry every N optimizer steps.
        wandb_project: W&B project (default ``$WANDB_PROJECT`` or ``onegpu``).
        run_name: W&B run name.
        progress: show a tqdm progress bar.
        remeasure_peak: on CPU, measure the peak FLOP/s behind MFU again and replace the value cached
            for this machine (``~/.cache/onegpu/peak_flops.json``), e.g. after the machine's load changed.
    """
    return FinetuneOptions.from_flat(locals())


# ------------------------------------------------------------------------------- checks (no I/O)
def check_options(options: FinetuneOptions) -> None:
    """Every check on the option values alone (no files, no GPU): raises all problems found, at once."""
    problems = option_problems(options)
    if problems:
        raise all_problems(problems)


def option_problems(options: FinetuneOptions) -> list[UserError]:
    """All problems of the option values, in the order they are reported."""
    lora, train, data = options.lora, options.train, options.data
    found = []

    def need(ok: bool, problem: str, fix: str) -> None:
        if not ok:
            found.append(UserError(problem, fix=fix))

    need(lora.lora_r > 0, f"lora_r must be > 0 (got {lora.lora_r})", "use a LoRA rank such as --lora_r 8")
    need(lora.lora_alpha > 0, f"lora_alpha must be > 0 (got {lora.lora_alpha})", "use e.g. --lora_alpha 16 (2x the rank)")
    ckpt = options.checkpoints
    need(ckpt.merge or not ckpt.export_hf, "--export_hf needs the merged model but --merge is false",
         "drop --export_hf, or drop --merge false")
    need(any(getattr(lora, f"lora_{k}") for k in ("query", "key", "value", "projection", "mlp", "head")),
         "LoRA is applied to no layer", "enable at least one of --lora_query/--lora_value/--lora_mlp ...")
    need(0 <= lora.lora_dropout < 1, f"lora_dropout must be in [0, 1) (got {lora.lora_dropout})",
         "use e.g. --lora_dropout 0.05")
    need(train.micro_batch_size > 0 and train.global_batch_size > 0
         and train.global_batch_size % train.micro_batch_size == 0,
         f"global_batch_size ({train.global_batch_size}) must be a positive multiple of micro_batch_size "
         f"({train.micro_batch_size})", "e.g. --micro_batch_size 4 --global_batch_size 16 (4 accumulation steps)")
    need(train.learning_rate > 0, f"learning_rate must be > 0 (got {train.learning_rate})",
         "use e.g. --learning_rate 3e-4")
    need(train.max_steps is None or train.max_steps > 0, f"max_steps must be > 0 (got {train.max_steps})",
         "drop --max_steps to train for --epochs")
    need(train.max_steps is not None or train.epochs > 0, f"epochs must be > 0 (got {train.epochs})",
         "use e.g. --epochs 1 or set --max_steps")
    need(data.max_seq_length is None or data.max_seq_length >= 16,
         f"max_seq_length {data.max_seq_length} is too small", "use at least 16, e.g. 512 or 2048")
    model = options.model
    need(model.quantize is None or "mixed" not in (model.precision or ""),
         f"--quantize {model.quantize} cannot be combined with the mixed precision {model.precision}",
         "use a -true precision with QLoRA: --precision bf16-true (GPU) or 32-true (CPU)")
    ev = options.eval
    need(ev.proxy_interval >= 0, f"proxy_interval must be >= 0 (got {ev.proxy_interval})",
         "use e.g. --proxy_interval 50 (0 = only at the end)")
    need(ev.proxy_items > 0, f"proxy_items must be > 0 (got {ev.proxy_items})", "use e.g. --proxy_items 4")
    need(ev.proxy_suite is not None or (options.checkpoints.select == "last" and not ev.proxy_interval),
         "--select best_proxy and --proxy_interval need a test proxy",
         "add --proxy_suite offline (or another eval suite with onegpu_helm_* tasks)")
    budget = options.budget
    try:  # the durations parse (the clock itself starts in resolve)
        BudgetClock.from_spec(budget.budget, budget.budget_reserve, budget.track)
    except UserError as err:
        found.append(err)
    return found


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
    from onegpu.finetune.proxy import load_proxy_items

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
    import torch

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
        from onegpu.model import prepare

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
    import yaml

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
        from onegpu.paths import runs_dir

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
    from onegpu.tracking import wandb_online

    if not path.exists() and wandb_online():
        import wandb

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
