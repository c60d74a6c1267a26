"""The options of ``onegpu finetune`` (and ``onegpu finetune plan``), each spelled once, and their checks.

An option is one typed field of one group below (``DataArgs``, ``ModelArgs``, ``LoRAArgs``,
``TrainArgs``, ``BudgetArgs``, ``CheckpointArgs``, ``EvalArgs``, ``LoggingArgs``) with its default
and, in the string under it, its doc (litgpt's TrainArgs style). A field's name is the flat name
users and sweep YAMLs write (``--lora_r``, ``--learning_rate`` ...). From the groups come the flat
signature of ``finetune_options`` and of the verbs (``onegpu.cli.takes_options``), so ``--help``,
``--config`` YAML keys and the sweep pre-flight all read the same list; ``check_options`` checks the
values alone (no files, no GPU) in milliseconds; ``resolve`` (``finetune/config.py``) settles every
default ("None = use the default") once. Light to import: no torch here.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from onegpu.budget import BudgetClock
from onegpu.cli import option_parameters, options_from, takes_options
from onegpu.contracts import Quantize, Track
from onegpu.errors import UserError, all_problems

Precision = Literal["32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed"]
Optimizer = Literal["adamw", "paged_adamw", "adamw8bit"]
Device = Literal["auto", "cpu", "cuda"]
Select = Literal["last", "best_proxy"]


# ------------------------------------------------------------------------------- option groups
@dataclass(frozen=True)
class DataArgs:
    """What to train on and how examples become rows."""

    data: str | None = None
    """a data-stage output dir (train.jsonl, val.jsonl, manifest.json) or, with
    WANDB_MODE=online, a W&B ``dataset`` artifact name (``entity/project/name:alias``)."""
    prompt_style: str | None = None
    """litgpt prompt style to render rows with. Default: the manifest's ``prompt_style``."""
    max_seq_length: int | None = None
    """tokens per row; longer examples are truncated (counted in the summary).
    Default: the data manifest's ``max_seq_length`` (else 512), capped at the model's block size."""
    packing: bool = True
    """pack several examples per row (block-diagonal causal attention, positions
    restart per example). ``--packing false`` pads one example per row, like litgpt."""
    train_on_prompt: bool = False
    """also take the loss on prompt tokens (default: responses only)."""


@dataclass(frozen=True)
class ModelArgs:
    """The base model and the device it trains on."""

    checkpoint_dir: Path | None = None
    """the base model, a litgpt checkpoint dir. Default: the bundled SmolLM2-135M."""
    precision: Precision | None = None
    """``32-true`` (default on CPU), ``bf16-true`` (default on CUDA), ``bf16-mixed``,
    ``16-true``, ``16-mixed``. QLoRA needs a ``-true`` precision."""
    quantize: Quantize | None = None
    """QLoRA: quantize the frozen base with bitsandbytes: ``bnb.nf4``, ``bnb.nf4-dq``
    (double quantization), ``bnb.fp4``, ``bnb.fp4-dq``, ``bnb.int8``. Works on CPU."""
    device: Device = "auto"
    """``auto`` (CUDA if available), ``cpu`` or ``cuda``."""
    num_threads: int | None = None
    """CPU threads for torch (default on CPU: ``OMP_NUM_THREADS`` if set, else the cores free at
    start, so a busy machine gets 1 thread instead of threads that wait for each other)."""


@dataclass(frozen=True)
class LoRAArgs:
    """litgpt's LoRA settings (the same names as litgpt's ``Config``)."""

    lora_r: int = 8
    """LoRA rank (> 0)."""
    lora_alpha: int = 16
    """LoRA alpha; the update is scaled by alpha / r."""
    lora_dropout: float = 0.05
    """dropout on the LoRA input."""
    lora_query: bool = True
    """LoRA on the attention query projection."""
    lora_key: bool = False
    """LoRA on the attention key projection."""
    lora_value: bool = True
    """LoRA on the attention value projection."""
    lora_projection: bool = False
    """LoRA on the attention output projection."""
    lora_mlp: bool = False
    """LoRA on the MLP projections."""
    lora_head: bool = False
    """LoRA on the LM head."""


@dataclass(frozen=True)
class TrainArgs:
    """Batches, optimizer, schedule, length of training."""

    micro_batch_size: int = 4
    """rows per forward/backward pass (packed rows when packing)."""
    global_batch_size: int = 8
    """rows per optimizer step; a multiple of micro_batch_size (the ratio is
    the gradient accumulation)."""
    learning_rate: float = 3e-4
    """peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optimizer: Optimizer = "adamw"
    """``adamw`` (torch), ``paged_adamw`` (bitsandbytes, CUDA), ``adamw8bit`` (bitsandbytes)."""
    warmup_steps: int = 10
    """linear warm-up steps, then cosine decay to ``min_lr_ratio * learning_rate``."""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of the peak."""
    max_norm: float = 1.0
    """gradient clipping norm (0 disables clipping; the norm is still logged)."""
    epochs: float = 1.0
    """passes over the training set (fractions allowed) when ``max_steps`` is not set."""
    max_steps: int | None = None
    """optimizer steps to run (overrides ``epochs``)."""
    neftune_alpha: float = 0.0
    """NEFTune embedding-noise alpha (0 = off; 5 is the paper's usual value)."""
    activation_checkpointing: bool = False
    """recompute each block's activations in backward (less memory, ~30% slower)."""
    seed: int = 1337
    """seed for initialisation, data order, dropout and noise."""

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step."""
        return self.global_batch_size // self.micro_batch_size


@dataclass(frozen=True)
class BudgetArgs:
    """The challenge track and the wall-clock budget."""

    track: Track = "rtx4090-24gb"
    """``rtx4090-24gb`` or ``a100-40gb``: the budget preset (24h) and the memory plan mode checks."""
    budget: str | None = None
    """wall-clock budget, like ``24h``, ``90m``, ``30s``. Default: the track's 24h. Time
    spent by earlier segments of a resumed run counts, up to each one's last heartbeat."""
    budget_reserve: str = "auto"
    """time kept back for the final validation + save + merge, e.g. ``15m``;
    ``auto``: 1.25 x this run's measured finalize time, or 1.25 x 2 x its measured load time
    before one was measured (plan mode: 10% of the budget, at most 20m)."""


@dataclass(frozen=True)
class CheckpointArgs:
    """Where the run writes, how often it checkpoints, where it resumes from."""

    out_dir: Path | None = None
    """where metrics, checkpoints and ``final/`` go. Default: ``$ONEGPU_RUNS/finetune`` (./runs), or
    ``$ONEGPU_RUNS/sweep-<id>/<run id>`` under ``wandb agent``."""
    save_interval: int = 50
    """checkpoint every N optimizer steps (0 = off)."""
    save_interval_minutes: float | None = 30.0
    """also checkpoint when this many minutes passed since the last one (0 or None = off)."""
    keep_last: int = 2
    """how many checkpoints to keep."""
    final_checkpoint: bool = True
    """also checkpoint after the last step (LoRA + optimizer state), so
    ``--resume auto`` can continue a finished run. ``false`` for throw-away runs (sweep trials)."""
    resume: str | None = None
    """``auto`` = continue from the newest checkpoint in ``out_dir`` if there is one; or a
    ``checkpoints/step-XXXXXX`` dir. Default: start fresh."""
    merge: bool = True
    """write the merged model (~0.5 GB for the bundled model) to ``final/``; ``false`` keeps
    only the LoRA adapter there (``final/lit_model.pth.lora`` + configs, ~1 MB), enough for
    the report (``onegpu eval``/``serve`` load an adapter dir as it is)."""
    export_hf: bool = False
    """also write a Hugging Face format copy to ``final/hf/``."""
    select: Select = "last"
    """which weights ``final/`` gets: ``last`` (the last step's) or ``best_proxy`` (the
    best test-proxy evaluation's; needs ``--proxy_suite``). Recorded in summary.json."""


@dataclass(frozen=True)
class EvalArgs:
    """Validation loss and the HELM-faithful test proxy during training, sample generations at the end."""

    eval_interval: int = 50
    """validation loss every N optimizer steps (0 = only at the end)."""
    initial_validation: bool = False
    """also validate before the first step (logged as step 0), so the
    validation curve starts at the base model."""
    eval_max_examples: int = 64
    """validation examples per evaluation."""
    proxy_suite: str | None = None
    """an eval suite (``eval/suites/NAME.yaml``, e.g. ``offline``) whose HELM-faithful
    ``onegpu_helm_*`` tasks are the test proxy: generated answers scored by HELM's exact
    match on the live LoRA weights (``finetune/proxy.py``), logged as ``proxy/*``."""
    proxy_interval: int = 0
    """score the test proxy every N optimizer steps (0 = only at the end)."""
    proxy_items: int = 4
    """items per task of the proxy (a fixed, seeded sample; the same in every run)."""
    num_samples: int = 3
    """how many fixed prompts to generate for at the end (0 = skip)."""
    sample_max_new_tokens: int = 48
    """tokens generated per fixed prompt for the sample table."""


@dataclass(frozen=True)
class LoggingArgs:
    """Telemetry and the W&B run."""

    log_interval: int = 1
    """log telemetry every N optimizer steps."""
    wandb_project: str | None = None
    """W&B project (default ``$WANDB_PROJECT`` or ``onegpu``)."""
    run_name: str | None = None
    """W&B run name."""
    progress: bool = True
    """show a tqdm progress bar."""
    remeasure_peak: bool = False
    """on CPU, measure the peak FLOP/s behind MFU again and replace the value cached
    for this machine (``~/.cache/onegpu/peak_flops.json``), e.g. after the machine's load changed."""


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
        return options_from(cls, flat)

    def flat(self) -> dict[str, Any]:
        """{flat option name: value}, in the order of the flat signature."""
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
    return [p.name for p in option_parameters(FinetuneOptions)]


@dataclass(frozen=True)
class PlanArgs:
    """What ``onegpu finetune plan`` measures, besides the fine-tuning options it plans for."""

    steps: int = 2
    """measured optimizer steps per micro-batch size (after one warm-up step)."""
    max_micro_batch_size: int = 64
    """the largest micro-batch size to try or suggest."""
    track_memory_gib: float | None = None
    """override the track's GPU memory (GiB), e.g. to plan for another card."""
    analytic: bool | None = None
    """estimate from the model's config alone (``finetune/planning/analytic.py``): no weights,
    data or GPU. Default: analytic when there are no weights or no CUDA GPU; ``false`` measures."""
    model_name: str | None = None
    """plan for a litgpt config name (e.g. ``Llama-2-13b-hf``) instead of a checkpoint (analytic)."""
    mfu: float | None = None
    """model FLOPs utilization for the analytic tokens/24 h (default: measured by
    ``benchmarks/gpu_check.py`` when its results exist, else assumed)."""


@takes_options(FinetuneOptions)
def finetune_options(options: FinetuneOptions) -> FinetuneOptions:
    """The options of ``onegpu finetune`` (and ``onegpu finetune plan``), by their flat names."""
    return options


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
