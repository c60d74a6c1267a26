"""``onegpu finetune``: LoRA / QLoRA fine-tuning of a litgpt checkpoint on a data-stage mix.

The recipe, top to bottom (one readable file, like litgpt's ``finetune/lora.py``):

1. validate every option and the inputs before loading anything heavy (``UserError``);
2. render rows with the data's prompt style (``data.schema.render``), tokenize, and plan
   micro-batches: packed rows (several examples per row, block-diagonal causal attention,
   positions restarting per example) or padded rows; loss on responses only by default;
3. build litgpt's LoRA GPT on Lightning Fabric, load the base weights, quantize the frozen base
   with bitsandbytes for QLoRA (CPU too), AdamW + warmup/cosine;
4. train with gradient accumulation and clipping, logging honest telemetry (non-padding tokens/s,
   LoRA-correct MFU, memory, budget used / ETA) to W&B and CSV; stop on the budget clock with a
   reserve for the end; checkpoint atomically (``--resume auto`` continues exactly);
5. at the end: ``out/final/`` = merged litgpt checkpoint + ``lit_model.pth.lora`` +
   ``hyperparameters.yaml`` + ``prompt_style.yaml`` + ``onegpu_model.json``; sample generations;
   a W&B ``model`` artifact with lineage to the dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from onegpu.errors import UserError

Precision = Literal["32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed"]
Quantize = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"]
Optimizer = Literal["adamw", "paged_adamw", "adamw8bit"]
Track = Literal["rtx4090-24gb", "a100-40gb"]

# Fixed prompts for the sample-generation table: same prompts in every run, so runs compare.
SAMPLE_PROMPTS = (
    "Give three tips for staying healthy.",
    "What is the capital of France? Answer in one sentence.",
    "Explain what a neural network is to a ten-year-old.",
)


def finetune(
    data: str | None = None,
    checkpoint_dir: Path | None = None,
    out_dir: Path | None = None,
    precision: Precision | None = None,
    quantize: Quantize | None = None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    max_seq_length: int | None = None,
    packing: bool = True,
    train_on_prompt: bool = False,
    prompt_style: str | None = None,
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
    track: Track = "rtx4090-24gb",
    budget: str | None = None,
    budget_reserve: str = "auto",
    save_interval: int = 50,
    save_interval_minutes: float | None = 30.0,
    keep_last: int = 2,
    resume: str | None = None,
    log_interval: int = 1,
    eval_interval: int = 50,
    eval_max_examples: int = 64,
    sample_max_new_tokens: int = 48,
    num_samples: int = 3,
    export_hf: bool = False,
    seed: int = 1337,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    num_threads: int | None = None,
    wandb_project: str | None = None,
    run_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune a litgpt checkpoint with LoRA (or QLoRA) on a data-stage mix; merge at the end.

    Args:
        data: a data-stage output dir (train.jsonl, val.jsonl, manifest.json) or, with
            WANDB_MODE=online, a W&B ``dataset`` artifact name (``entity/project/name:alias``).
        checkpoint_dir: the base model, a litgpt checkpoint dir. Default: the bundled SmolLM2-135M.
        out_dir: where metrics, checkpoints and ``final/`` go. Default: ``$ONEGPU_RUNS/finetune`` (./runs), or
            ``$ONEGPU_RUNS/sweep-<id>/<run id>`` under ``wandb agent``.
        precision: ``32-true`` (default on CPU), ``bf16-true`` (default on CUDA), ``bf16-mixed``,
            ``16-true``, ``16-mixed``. QLoRA needs a ``-true`` precision.
        quantize: QLoRA: quantize the frozen base with bitsandbytes: ``bnb.nf4``, ``bnb.nf4-dq``
            (double quantization), ``bnb.fp4``, ``bnb.fp4-dq``, ``bnb.int8``. Works on CPU.
        lora_r: LoRA rank (> 0).
        lora_alpha: LoRA alpha; the update is scaled by alpha / r.
        lora_dropout: dropout on the LoRA input.
        lora_query: LoRA on the attention query projection.
        lora_key: LoRA on the attention key projection.
        lora_value: LoRA on the attention value projection.
        lora_projection: LoRA on the attention output projection.
        lora_mlp: LoRA on the MLP projections.
        lora_head: LoRA on the LM head.
        max_seq_length: tokens per row; longer examples are truncated (counted in the summary).
            Default: the data manifest's ``max_seq_length`` (else 512), capped at the model's block size.
        packing: pack several examples per row (block-diagonal causal attention, positions
            restart per example). ``--packing false`` pads one example per row, like litgpt.
        train_on_prompt: also take the loss on prompt tokens (default: responses only).
        prompt_style: litgpt prompt style to render rows with. Default: the manifest's ``prompt_style``.
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
        track: ``rtx4090-24gb`` or ``a100-40gb``: the budget preset (24h) and the memory plan mode checks.
        budget: wall-clock budget, like ``24h``, ``90m``, ``30s``. Default: the track's 24h. Time
            spent by earlier segments of a resumed run counts.
        budget_reserve: time kept back for the final save + merge (``auto`` = 10% of the
            budget, at most 20m), e.g. ``15m``.
        save_interval: checkpoint every N optimizer steps (0 = off).
        save_interval_minutes: also checkpoint when this many minutes passed since the last one.
        keep_last: how many checkpoints to keep.
        resume: ``auto`` = continue from the newest checkpoint in ``out_dir`` if there is one; or a
            ``checkpoints/step-XXXXXX`` dir. Default: start fresh.
        log_interval: log telemetry every N optimizer steps.
        eval_interval: validation loss every N optimizer steps (0 = only at the end).
        eval_max_examples: validation examples per evaluation.
        sample_max_new_tokens: tokens generated per fixed prompt for the sample table.
        num_samples: how many fixed prompts to generate for at the end (0 = skip).
        export_hf: also write a Hugging Face format copy to ``final/hf/``.
        seed: seed for initialisation, data order, dropout and noise.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        num_threads: CPU threads for torch (default: torch's choice).
        wandb_project: W&B project (default ``$WANDB_PROJECT`` or ``onegpu``).
        run_name: W&B run name.
        progress: show a tqdm progress bar.

    Returns:
        The run summary (also in ``out_dir/summary.json``).
    """
    args = {k: v for k, v in locals().items()}
    cfg = _validate(args)
    return _Trainer(cfg).run()


# --------------------------------------------------------------------------------------- validation
@dataclass
class DataBundle:
    path: Path
    manifest: dict[str, Any]
    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    digest: str
    name: str


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
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


def resolve_data(data: str | None) -> Path:
    if data is None:
        raise UserError("no training data given", fix="pass --data DIR (the output dir of `onegpu data build`)")
    path = Path(data).expanduser()
    if path.is_dir():
        return path
    if os.environ.get("WANDB_MODE") == "online" and not path.exists():
        import wandb

        try:
            return Path(wandb.Api().artifact(data, type="dataset").download())
        except Exception as err:
            raise UserError(f"could not fetch the W&B dataset artifact {data!r}: {err}",
                            fix="check the artifact name (entity/project/name:alias) and `wandb login`") from err
    raise UserError(f"data dir {str(path)!r} does not exist",
                    fix="pass the output dir of `onegpu data build` (with train.jsonl and manifest.json), "
                        "or a W&B dataset artifact with WANDB_MODE=online")


def load_data(data: str | None) -> DataBundle:
    path = resolve_data(data)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{path} has no manifest.json", fix="pass the output dir of `onegpu data build`")
    manifest_bytes = manifest_path.read_bytes()
    manifest = json.loads(manifest_bytes)
    train_rows = _read_jsonl(path / "train.jsonl")
    if not train_rows:
        raise UserError(f"the training set {path / 'train.jsonl'} is empty or missing",
                        fix="rebuild the mix with `onegpu data build` (check its rejects.jsonl for why rows were dropped)")
    val_rows = _read_jsonl(path / "val.jsonl")
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    name = manifest.get("artifact") or manifest.get("name") or f"dataset-{str(manifest.get('recipe_hash', digest))[:12]}"
    return DataBundle(path, manifest, train_rows, val_rows, digest, name)


def _validate(a: dict[str, Any]) -> dict[str, Any]:
    """Every check that needs no model: fail in seconds, not after loading 7B weights."""
    import torch

    from onegpu.budget import BudgetClock

    a = dict(a)
    if a["lora_r"] <= 0:
        raise UserError(f"lora_r must be > 0 (got {a['lora_r']})", fix="use a LoRA rank such as --lora_r 8")
    if a["lora_alpha"] <= 0:
        raise UserError(f"lora_alpha must be > 0 (got {a['lora_alpha']})", fix="use e.g. --lora_alpha 16 (2x the rank)")
    if not any(a[k] for k in ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp", "lora_head")):
        raise UserError("LoRA is applied to no layer", fix="enable at least one of --lora_query/--lora_value/--lora_mlp ...")
    if not 0 <= a["lora_dropout"] < 1:
        raise UserError(f"lora_dropout must be in [0, 1) (got {a['lora_dropout']})", fix="use e.g. --lora_dropout 0.05")
    if a["micro_batch_size"] <= 0 or a["global_batch_size"] <= 0 or a["global_batch_size"] % a["micro_batch_size"]:
        raise UserError(f"global_batch_size ({a['global_batch_size']}) must be a positive multiple of "
                        f"micro_batch_size ({a['micro_batch_size']})",
                        fix="e.g. --micro_batch_size 4 --global_batch_size 16 (4 accumulation steps)")
    if a["learning_rate"] <= 0:
        raise UserError(f"learning_rate must be > 0 (got {a['learning_rate']})", fix="use e.g. --learning_rate 3e-4")
    if a["max_steps"] is not None and a["max_steps"] <= 0:
        raise UserError(f"max_steps must be > 0 (got {a['max_steps']})", fix="drop --max_steps to train for --epochs")
    if a["max_steps"] is None and a["epochs"] <= 0:
        raise UserError(f"epochs must be > 0 (got {a['epochs']})", fix="use e.g. --epochs 1 or set --max_steps")
    if a["max_seq_length"] is not None and a["max_seq_length"] < 16:
        raise UserError(f"max_seq_length {a['max_seq_length']} is too small", fix="use at least 16, e.g. 512 or 2048")

    # device and precision
    if a["device"] == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible", fix="use --device cpu (or auto)")
    dev = "cuda" if a["device"] == "cuda" or (a["device"] == "auto" and torch.cuda.is_available()) else "cpu"
    a["device"] = dev
    if a["precision"] is None:
        a["precision"] = "bf16-true" if dev == "cuda" else "32-true"
    if a["quantize"] is not None and "mixed" in a["precision"]:
        raise UserError(f"--quantize {a['quantize']} cannot be combined with the mixed precision {a['precision']}",
                        fix="use a -true precision with QLoRA: --precision bf16-true (GPU) or 32-true (CPU)")
    if dev == "cpu" and a["precision"].startswith(("bf16", "16")):
        warnings.warn(f"!!! precision {a['precision']} on CPU: half-precision matmuls on this CPU are emulated and "
                      "can be ~100-500x slower than fp32. Use --precision 32-true on CPU. !!!", stacklevel=2)
        print(f"[onegpu] WARNING: {a['precision']} on CPU is extremely slow here; --precision 32-true is the sane "
              "default on CPU", file=sys.stderr)
    if a["optimizer"] == "paged_adamw" and dev != "cuda":
        raise UserError("paged_adamw pages optimizer state between GPU and CPU memory and needs CUDA",
                        fix="use --optimizer adamw (or adamw8bit) on CPU")

    # inputs
    if a["checkpoint_dir"] is None:
        from onegpu.model import prepare

        a["checkpoint_dir"] = Path(prepare())
    ckpt = Path(a["checkpoint_dir"]).expanduser()
    missing = [n for n in ("lit_model.pth", "model_config.yaml") if not (ckpt / n).is_file()]
    if missing:
        raise UserError(f"{ckpt} is not a litgpt checkpoint (missing {', '.join(missing)})",
                        fix="pass a dir made by `onegpu model prepare` (it prints the path), or omit "
                            "--checkpoint_dir for the bundled model")
    if not (ckpt / "tokenizer.json").is_file() and not (ckpt / "tokenizer.model").is_file():
        raise UserError(f"{ckpt} has no tokenizer (tokenizer.json / tokenizer.model)",
                        fix="re-run `onegpu model prepare` for this model")
    a["checkpoint_dir"] = ckpt
    a["_data"] = load_data(a["data"])

    # budget
    clock = BudgetClock.from_spec(a["budget"], a["budget_reserve"], a["track"])
    a["_clock"] = clock
    if a["out_dir"] is None:
        from onegpu.paths import runs_dir

        # Under `wandb agent`, trials on one machine must not share (and resume!) one dir.
        sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
        a["out_dir"] = runs_dir() / (f"sweep-{sweep_id}/{run_id}" if sweep_id and run_id else "finetune")
    a["out_dir"] = Path(a["out_dir"]).expanduser()
    if a["resume"] not in (None, "auto"):
        rp = Path(a["resume"]).expanduser()
        if not (rp / "state.pt").is_file():
            raise UserError(f"--resume {a['resume']}: no state.pt there",
                            fix="use --resume auto, or a dir like OUT/checkpoints/step-000100")
    return a


# ------------------------------------------------------------------------------------------ model
def build_model(fabric: Any, checkpoint_dir: Path, lora: dict[str, Any], quantize: str | None,
                max_seq_length: int, precision: str) -> Any:
    """litgpt LoRA GPT with the base weights loaded, LoRA-only trainable, QLoRA-quantized if asked."""
    import torch
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable

    from onegpu.finetune.quantize import quantize_frozen_linears

    config = Config.from_file(checkpoint_dir / "model_config.yaml", **lora)
    dtype = getattr(torch, PRECISION_DTYPES[precision])
    if quantize:
        # Build and load on CPU; quantizing moves each base linear to the device as it goes, so the
        # full-precision base never has to fit in GPU memory.
        with torch.device("cpu"), _default_dtype(dtype if fabric.device.type == "cuda" else torch.float32):
            model = GPT(config)
    else:
        with fabric.init_module(empty_init=False):
            model = GPT(config)
    state = torch.load(checkpoint_dir / "lit_model.pth", map_location="cpu", mmap=True, weights_only=True)
    model.load_state_dict(state.get("model", state), strict=False)
    del state
    mark_only_lora_as_trainable(model)
    model.max_seq_length = max_seq_length
    if quantize:
        quantize_frozen_linears(model, quantize, compute_dtype=dtype, device=fabric.device)
    return model


PRECISION_DTYPES = {"32-true": "float32", "bf16-true": "bfloat16", "bf16-mixed": "float32",
                    "16-true": "float16", "16-mixed": "float32"}


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        import torch

        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        import torch

        torch.set_default_dtype(self.old)


def make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> Any:
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW if name == "paged_adamw" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio`` (multiplier of the peak LR)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------- trainer
@dataclass
class _State:
    step: int = 0  # optimizer steps done
    micro_index: int = 0  # micro-batches consumed (across epochs): the data position
    tokens: int = 0
    loss_tokens: int = 0
    examples: int = 0
    slots: int = 0
    best_val_loss: float | None = None
    history: list[float] = field(default_factory=list)


class _Trainer:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg

    # -------------------------------------------------------------------------------- data
    def _prepare_examples(self, tokenizer: Any) -> None:
        from onegpu.data.schema import get_prompt_style, render
        from onegpu.finetune.packing import tokenize_example

        cfg, bundle = self.cfg, self.cfg["_data"]
        style_name = cfg["prompt_style"] or bundle.manifest.get("prompt_style")
        if not style_name:
            raise UserError("no prompt style: the manifest has no prompt_style and none was given",
                            fix="pass --prompt_style NAME (a litgpt prompt style, e.g. alpaca or chatml)")
        self.style_name = style_name
        self.style = get_prompt_style(style_name)
        msl = cfg["max_seq_length"] or int(bundle.manifest.get("max_seq_length") or 512)
        if msl > self.model_block_size:
            print(f"[onegpu] max_seq_length {msl} > the model's block size {self.model_block_size}; using "
                  f"{self.model_block_size}", file=sys.stderr)
            msl = self.model_block_size
        self.max_seq_length = msl

        def build(rows):
            out = []
            for row in rows:
                prompt, response = render(row, self.style)
                out.append(tokenize_example(tokenizer, prompt, response, msl, cfg["train_on_prompt"]))
            return out

        self.train_examples = build(bundle.train_rows)
        self.val_examples = build(bundle.val_rows[: cfg["eval_max_examples"]])
        usable = [e for e in self.train_examples if e.n_loss_tokens > 0]
        if not usable:
            raise UserError("no training example has a response token left after truncation",
                            fix=f"raise --max_seq_length (now {msl}) or shorten the prompts")
        self.n_truncated = sum(e.truncated for e in self.train_examples)
        self.n_no_loss = len(self.train_examples) - len(usable)
        if self.n_no_loss:
            print(f"[onegpu] {self.n_no_loss} training examples lost every response token to truncation at "
                  f"{msl} tokens; they are skipped (counted in summary.json as examples_no_loss_tokens)",
                  file=sys.stderr)
        self.train_examples = usable
        self.lengths = [len(e) for e in self.train_examples]
        self._plans: dict[int, list] = {}

    def _epoch_plan(self, epoch: int) -> list:
        from onegpu.finetune.packing import plan_micro_batches

        if epoch not in self._plans:
            self._plans = {epoch: plan_micro_batches(self.lengths, self.max_seq_length, self.cfg["micro_batch_size"],
                                                     self.cfg["packing"], self.cfg["seed"], epoch)}
        return self._plans[epoch]

    def micro_batch(self, index: int) -> dict[str, Any]:
        from onegpu.finetune.packing import collate

        epoch, i = divmod(index, self.micro_per_epoch)
        rows = self._epoch_plan(epoch)[i]
        return collate(self.train_examples, rows, pad_id=self.pad_id, pad_multiple=8 if self.device.type == "cuda" else 1)

    # ------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        import lightning as L
        import torch
        from litgpt.tokenizer import Tokenizer

        from onegpu.finetune import checkpoint as ckpt_io
        from onegpu.finetune import telemetry
        from onegpu.finetune.packing import use_flex_attention
        from onegpu.tracking import Run

        cfg = self.cfg
        if cfg["num_threads"]:
            torch.set_num_threads(cfg["num_threads"])
        out_dir: Path = cfg["out_dir"]
        ckpt_root = out_dir / "checkpoints"
        resume_path = None
        if cfg["resume"] == "auto":
            resume_path = ckpt_io.latest(ckpt_root)
        elif cfg["resume"]:
            resume_path = Path(cfg["resume"]).expanduser()
        resume_state = ckpt_io.load(resume_path) if resume_path else None

        tokenizer = Tokenizer(cfg["checkpoint_dir"])
        self.pad_id = 0
        import yaml

        model_cfg = yaml.safe_load((cfg["checkpoint_dir"] / "model_config.yaml").read_text())
        self.model_block_size = int(model_cfg.get("block_size", 2048))
        self._prepare_examples(tokenizer)
        accum = cfg["global_batch_size"] // cfg["micro_batch_size"]
        self.accum = accum
        self.micro_per_epoch = len(self._epoch_plan(0))
        steps_per_epoch = max(1, self.micro_per_epoch // accum)
        total_steps = cfg["max_steps"] or max(1, int(cfg["epochs"] * steps_per_epoch))
        self.total_steps = total_steps

        clock = cfg["_clock"]
        public_cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        public_cfg.update(max_seq_length=self.max_seq_length, prompt_style=self.style_name,
                          gradient_accumulation=accum, total_steps=total_steps, budget_s=clock.budget_s,
                          budget_reserve_s=clock.reserve_s)
        previous_id = (resume_state or {}).get("wandb_id")
        if previous_id:
            public_cfg["resumed_from_wandb_id"] = previous_id
        # Online, a resumed segment continues the same W&B run. Offline, a SIGKILLed run's id can
        # still be held by its orphaned W&B service ("run ID is in use"), so a new offline run is
        # started and linked through `resumed_from_wandb_id`; metrics.jsonl stays one file.
        online = os.environ.get("WANDB_MODE", "offline") == "online"
        run = Run("finetune", out_dir, public_cfg, project=cfg["wandb_project"], name=cfg["run_name"],
                  resume_id=previous_id if online else None)
        bundle = cfg["_data"]
        run.use_input(bundle.name, "dataset", bundle.digest, bundle.path)
        exit_code = 1
        try:
            summary = self._train(run, resume_state, resume_path, tokenizer, total_steps, steps_per_epoch, L, torch,
                                  ckpt_io, telemetry, use_flex_attention, ckpt_root)
            exit_code = 0
            return summary
        finally:
            run.finish(exit_code=exit_code)

    def _train(self, run, resume_state, resume_path, tokenizer, total_steps, steps_per_epoch, L, torch, ckpt_io,
               telemetry, use_flex_attention, ckpt_root) -> dict[str, Any]:
        from tqdm import tqdm

        from onegpu.finetune.packing import batch_to, forward_hidden, loss_sum
        from onegpu.budget import format_duration

        cfg = self.cfg
        clock = cfg["_clock"]
        if resume_state is not None:
            clock.restore(resume_state["budget"])
        fabric = L.Fabric(accelerator=cfg["device"], devices=1, precision=cfg["precision"])
        self.device = fabric.device
        fabric.seed_everything(cfg["seed"], verbose=False)
        lora = {k: cfg[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_query", "lora_key", "lora_value",
                                    "lora_projection", "lora_mlp", "lora_head")}
        model = build_model(fabric, cfg["checkpoint_dir"], lora, cfg["quantize"], self.max_seq_length,
                            cfg["precision"])
        trainable, total = telemetry.count_parameters(model)
        shapes = telemetry.linear_shapes(model)
        model = fabric.setup_module(model)
        inner = model.module if hasattr(model, "module") else model
        self.flex = cfg["packing"] and use_flex_attention(inner)
        params = [p for p in inner.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg["optimizer"], params, cfg["learning_rate"], cfg["weight_decay"])
        optimizer = fabric.setup_optimizers(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg["warmup_steps"], total_steps, cfg["min_lr_ratio"]))
        st = _State()
        if resume_state is not None:
            inner.load_state_dict(resume_state["model"], strict=False)
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            for k, v in resume_state["progress"].items():
                setattr(st, k, v)
            print(f"[onegpu] resumed from {resume_path} at step {st.step}/{total_steps} "
                  f"({format_duration(clock.elapsed_before_s)} of the budget already used)", file=sys.stderr)

        peak, peak_src = telemetry.device_peak_flops(fabric.device, cfg["precision"])
        meter = telemetry.Throughput(shapes, peak)
        run.summary(trainable_params=trainable, total_params=total, peak_flops=peak, peak_flops_source=peak_src,
                    train_examples=len(self.train_examples), train_tokens_per_epoch=sum(self.lengths),
                    examples_truncated=self.n_truncated, examples_no_loss_tokens=self.n_no_loss,
                    steps_per_epoch=steps_per_epoch, attention="flex" if self.flex else "sdpa")
        print(f"[onegpu] {trainable:,} trainable / {total:,} parameters; {len(self.train_examples)} examples, "
              f"{self.micro_per_epoch} micro-batches per epoch, {total_steps} steps; MFU peak: {peak / 1e12:.2f} "
              f"TFLOP/s ({peak_src})", file=sys.stderr)

        def save_checkpoint() -> Path:
            state = {
                "model": ckpt_io.trainable_state_dict(inner), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "progress": st.__dict__.copy(), "rng": ckpt_io.rng_state(),
                "budget": clock.state_dict(), "wandb_id": run.meta.get("wandb_id"),
            }
            meta = {"step": st.step, "total_steps": total_steps, "micro_index": st.micro_index,
                    "budget": clock.state_dict(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            return ckpt_io.save(ckpt_root, st.step, state, meta, cfg["keep_last"])

        bar = tqdm(total=total_steps, initial=st.step, desc="finetune", disable=not cfg["progress"], unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        last_save = time.monotonic()
        ema_step = None
        steps_this_segment = 0
        stopped_by = "max_steps" if cfg["max_steps"] else "epochs"
        model.train()
        if resume_state is not None:  # last thing before the loop: nothing may draw from the RNG after it
            ckpt_io.set_rng_state(resume_state["rng"])
        while st.step < total_steps:
            if clock.should_stop(next_step_s=ema_step or 0.0):
                stopped_by = "budget"
                print(f"\n[onegpu] {clock.stop_reason}", file=sys.stderr)
                break
            t0 = time.perf_counter()
            batches = [self.micro_batch(st.micro_index + j) for j in range(self.accum)]
            denom = max(1, sum(b["n_loss_tokens"] for b in batches))
            step_loss = 0.0
            for j, b in enumerate(batches):
                meter.add_micro_batch(b)
                tb = batch_to(b, fabric.device)
                with fabric.no_backward_sync(model, enabled=j < self.accum - 1), fabric.autocast():
                    hidden = forward_hidden(inner, tb, flex=self.flex, neftune_alpha=cfg["neftune_alpha"],
                                            activation_checkpointing=cfg["activation_checkpointing"])
                    loss, _ = loss_sum(inner, hidden, tb["labels"])
                fabric.backward(loss / denom)
                step_loss += loss.item()
            if cfg["max_norm"] > 0:
                grad_norm = float(fabric.clip_gradients(model, optimizer, max_norm=cfg["max_norm"]))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in params if p.grad is not None])))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if fabric.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            meter.add_step_time(dt)
            ema_step = dt if ema_step is None else 0.8 * ema_step + 0.2 * dt
            st.step += 1
            steps_this_segment += 1
            st.micro_index += self.accum
            st.tokens += sum(b["n_tokens"] for b in batches)
            st.loss_tokens += sum(b["n_loss_tokens"] for b in batches)
            st.examples += sum(b["n_examples"] for b in batches)
            st.slots += sum(b["n_slots"] for b in batches)
            step_loss /= denom
            st.history.append(step_loss)

            if st.step % cfg["log_interval"] == 0 or st.step == total_steps:
                rates = meter.rates()
                remaining_train_s = max(0.0, clock.train_deadline_s - clock.elapsed_s)
                eta = clock.eta_s(steps_this_segment, total_steps - st.step)
                metrics = {
                    "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "epoch": st.micro_index / self.micro_per_epoch,
                    **rates, "tokens_seen": st.tokens, "loss_tokens_seen": st.loss_tokens, "examples_seen": st.examples,
                    "padding_slots_seen": st.slots - st.tokens,
                    "wall_clock_s": clock.elapsed_s, "budget_used_pct": 100 * clock.used_fraction,
                    "eta_s": eta, "projected_tokens_by_deadline": st.tokens + rates["tokens_per_s"] * remaining_train_s,
                    **{f"mem/{k}": v for k, v in telemetry.memory_stats(fabric.device).items()},
                }
                run.log(metrics, step=st.step)
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{rates['tokens_per_s']:.0f}",
                                mfu=f"{rates['mfu']:.1%}", budget=f"{100 * clock.used_fraction:.1f}%")
                meter.reset_window()
            bar.update(1)

            if cfg["eval_interval"] and st.step % cfg["eval_interval"] == 0 and st.step < total_steps:
                self._log_val(run, inner, fabric, st)
            due_steps = cfg["save_interval"] and st.step % cfg["save_interval"] == 0
            due_time = cfg["save_interval_minutes"] and time.monotonic() - last_save >= 60 * cfg["save_interval_minutes"]
            if (due_steps or due_time) and st.step < total_steps:
                save_checkpoint()
                last_save = time.monotonic()
        bar.close()

        # ------------------------------------------------------------------------- the end
        t_end = time.perf_counter()
        val_loss = self._log_val(run, inner, fabric, st)
        save_checkpoint()  # `--resume auto` after the end (or after a budget stop) starts from here
        final_dir = self._write_final(run, inner, tokenizer, fabric)
        samples = self._samples(run, inner, tokenizer, fabric) if self.cfg["num_samples"] else []
        plot = plot_training_curves(cfg["out_dir"])
        if plot is not None:
            run.log_image("training_curves", plot)
        summary = {
            "steps": st.step, "total_steps": total_steps, "stopped_by": stopped_by, "final_loss": st.history[-1] if st.history else None,
            "first_loss": st.history[0] if st.history else None, "val_loss": val_loss,
            "tokens_seen": st.tokens, "loss_tokens_seen": st.loss_tokens, "examples_seen": st.examples,
            "packing_efficiency_overall": st.tokens / max(1, st.slots), "final_dir": str(final_dir),
            "finalize_s": round(time.perf_counter() - t_end, 3), "peak_memory_gib": telemetry.peak_memory_gib(fabric.device),
            "n_samples": len(samples), **clock.summary(),
        }
        run.summary(**summary)
        print(f"[onegpu] done: {st.step} steps ({stopped_by}), loss {summary['first_loss']} -> {summary['final_loss']}, "
              f"val_loss {val_loss}; merged checkpoint: {final_dir}", file=sys.stderr)
        if stopped_by == "budget":
            print(f"[onegpu] stopped by the budget clock after {st.step}/{total_steps} steps, "
                  f"{format_duration(max(0.0, clock.remaining_s))} of the budget left after the merge. "
                  f"Continue with --resume auto and a larger --budget.", file=sys.stderr)
        return summary

    # -------------------------------------------------------------------------- helpers
    def _log_val(self, run, inner, fabric, st) -> float | None:
        import torch

        from onegpu.finetune.packing import batch_to, collate, forward_hidden, loss_sum, plan_micro_batches

        if not self.val_examples:
            return None
        examples = [e for e in self.val_examples if e.n_loss_tokens > 0]
        lengths = [len(e) for e in examples]
        total, count = 0.0, 0
        inner.eval()
        with torch.no_grad(), fabric.autocast():
            for rows in plan_micro_batches(lengths, self.max_seq_length, self.cfg["micro_batch_size"], self.cfg["packing"],
                                           seed=0, epoch=0):
                b = batch_to(collate(examples, rows, self.pad_id), fabric.device)
                s, n = loss_sum(inner, forward_hidden(inner, b, flex=self.flex), b["labels"])
                total += s.item()
                count += n
        inner.train()
        val = total / max(1, count)
        st.best_val_loss = val if st.best_val_loss is None else min(st.best_val_loss, val)
        run.log({"val_loss": val, "val_ppl": math.exp(min(val, 50))}, step=st.step)
        return val

    def _write_final(self, run, inner, tokenizer, fabric) -> Path:
        """out/final: LoRA weights + litgpt's hyperparameters/prompt style, merged by litgpt's merge_lora."""
        import torch
        import yaml
        from litgpt.prompts import save_prompt_style
        from litgpt.scripts.merge_lora import merge_lora
        from litgpt.utils import copy_config_files

        from onegpu.finetune.checkpoint import trainable_state_dict

        cfg = self.cfg
        final = cfg["out_dir"] / "final"
        staging = cfg["out_dir"] / ".final.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        lora_sd = {k: v for k, v in trainable_state_dict(inner).items() if "lora_" in k}
        torch.save({"model": lora_sd}, staging / "lit_model.pth.lora")
        copy_config_files(cfg["checkpoint_dir"], staging)
        hparams = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items() if not k.startswith("_")}
        hparams.update(checkpoint_dir=str(cfg["checkpoint_dir"].resolve()), max_seq_length=self.max_seq_length,
                       prompt_style=self.style_name,
                       # the merge rebuilds the model in this precision; merge in full precision on CPU
                       precision="32-true" if cfg["precision"].startswith("32") else cfg["precision"].replace("-mixed", "-true"))
        (staging / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False), encoding="utf-8")
        save_prompt_style(self.style, staging)
        bundle = cfg["_data"]
        lineage = {
            "base_checkpoint": str(cfg["checkpoint_dir"].resolve()),
            "base_model": json.loads((cfg["checkpoint_dir"] / "onegpu_model.json").read_text())
            if (cfg["checkpoint_dir"] / "onegpu_model.json").is_file() else None,
            "data_dir": str(bundle.path), "data_manifest_sha256": bundle.digest,
            "data_recipe_hash": bundle.manifest.get("recipe_hash"), "dataset_artifact": bundle.name,
            "prompt_style": self.style_name, "wandb_run_id": run.meta.get("wandb_id"),
            "git_sha": run.meta.get("git_sha"), "method": "qlora" if cfg["quantize"] else "lora",
            "quantize": cfg["quantize"], "lora_r": cfg["lora_r"], "lora_alpha": cfg["lora_alpha"],
        }
        (staging / "onegpu_model.json").write_text(json.dumps(lineage, indent=2), encoding="utf-8")
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # merge_lora pprints its locals
            merge_lora(checkpoint_dir=staging, pretrained_checkpoint_dir=cfg["checkpoint_dir"])
        if cfg["export_hf"]:
            from onegpu.inference import export_hf

            export_hf(staging, staging / "hf")
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        run.log_artifact(final, name=f"model-{run.meta.get('wandb_id') or 'local'}", type="model", metadata=lineage)
        return final

    def _samples(self, run, inner, tokenizer, fabric) -> list[list[str]]:
        import torch
        from litgpt.generate.base import generate

        rows = []
        inner.eval()
        with torch.no_grad():
            for instruction in SAMPLE_PROMPTS[: self.cfg["num_samples"]]:
                prompt = self.style.apply(instruction)
                ids = tokenizer.encode(prompt, device=fabric.device)
                max_ret = min(len(ids) + self.cfg["sample_max_new_tokens"], inner.max_seq_length)
                inner.set_kv_cache(batch_size=1, max_seq_length=max_ret, device=fabric.device)
                with fabric.autocast():
                    out = generate(inner, ids, max_ret, temperature=0.0, eos_id=tokenizer.eos_id, include_prompt=False)
                inner.clear_kv_cache()
                rows.append([instruction, tokenizer.decode(out).strip()])
        inner.train()
        run.log_table("samples", ["prompt", "generation"], rows)
        return rows


def plot_training_curves(out_dir: Path) -> Path | None:
    """``training_curves.png``: loss (train and val), non-padding tokens/s and MFU per step."""
    from onegpu.tracking import read_metrics

    rows = read_metrics(out_dir / "metrics.jsonl")
    train = {r["_step"]: r for r in rows if "loss" in r}  # a resumed run re-logs some steps: last wins
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(train)
    val = sorted((r["_step"], r["val_loss"]) for r in rows if "val_loss" in r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [train[s]["loss"] for s in steps], label="train loss")
    if val:
        ax1.plot(*zip(*val), "o-", label="val loss")
    ax1.set_xlabel("optimizer step")
    ax1.legend()
    ax2.plot(steps, [train[s]["tokens_per_s"] for s in steps], color="tab:green")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("non-padding tokens/s", color="tab:green")
    ax3 = ax2.twinx()
    ax3.plot(steps, [100 * train[s]["mfu"] for s in steps], color="tab:red", alpha=0.6)
    ax3.set_ylabel("MFU %", color="tab:red")
    fig.tight_layout()
    path = out_dir / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

