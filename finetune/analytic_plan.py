"""``onegpu finetune plan --analytic``: does a config fit a track, and how many tokens will 24 h give?

Answers from the model's litgpt config alone (``--model_name Llama-2-13b-hf``, or a checkpoint's
``model_config.yaml``, or a checkpoint dir's name): no weights, no data, no GPU, in seconds. The
memory model is ``finetune/memory.py`` (validated against measured CPU steps in the tests); speed
is the LoRA-correct FLOP count of ``finetune/telemetry.py`` at an MFU that is measured when
``benchmarks/gpu_check.py`` has written its results file, else assumed (and said so).

``onegpu finetune plan`` switches to this mode by itself when there are no weights to measure or no
CUDA GPU (``--analytic false`` forces the measured CPU plan).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from onegpu.contracts import TRACKS, atomic_write_json
from onegpu.errors import UserError
from onegpu.finetune.config import CheckpointArgs, requested_max_seq_length
from onegpu.finetune.disk import model_sizes, plan_disk
from onegpu.finetune.memory import (ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, GIB, MODELED_MLPS, OPTIMIZERS, Workload,
                                    count_weights, estimate_memory, flops_per_token, largest_micro_batch, meta_model,
                                    recompute_factor)

# MFU assumed when no GPU check results exist: useful (LoRA-correct) FLOPs / bf16 dense peak. LoRA in
# bf16 reaches ~40% on A100-class cards; 4-bit QLoRA dequantizes every weight in every matmul (~0.6x).
ASSUMED_MFU = {"lora": 0.40, "qlora-4bit": 0.25, "qlora-int8": 0.15}
TRACK_PEAK_KEY = {"rtx4090-24gb": "rtx4090", "a100-40gb": "a100"}


@dataclass
class Problem:
    problem: str
    fix: str
    fatal: bool = False  # no estimate is possible (e.g. unknown model)

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})"


def gpu_check_results_path() -> Path:
    """Where ``benchmarks/gpu_check.py`` writes its results (``ONEGPU_GPU_CHECK`` overrides)."""
    from onegpu.paths import REPO_ROOT

    return Path(os.environ.get("ONEGPU_GPU_CHECK", REPO_ROOT / "benchmarks" / "gpu_check_results.json"))


def analytic_reason(analytic: bool | None, model_name: str | None, args: dict[str, Any]) -> str | None:
    """Why ``plan`` answers analytically (None: measure real steps)."""
    if analytic is not None:
        return "asked for (--analytic)" if analytic else None
    if model_name:
        return "--model_name names a config, not weights"
    ckpt = args.get("checkpoint_dir")
    if ckpt is not None and not (Path(ckpt).expanduser() / "lit_model.pth").is_file():
        return f"no weights at {ckpt}"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here (--analytic false measures real steps on this CPU instead)"
    return None


def resolve_model(model_name: str | None, checkpoint_dir: Any, problems: list[Problem]) -> tuple[Any, str]:
    """The litgpt Config to plan for, and where it came from."""
    from litgpt.config import Config, name_to_config

    def by_name(name: str, source: str) -> tuple[Any, str]:
        if name in name_to_config:
            return Config.from_name(name), source
        close = difflib.get_close_matches(name, list(name_to_config), n=3, cutoff=0.5)
        problems.append(Problem(f"{name!r} is not a litgpt config name",
                                f"use one of {', '.join(close)}" if close else "see `litgpt download list`", fatal=True))
        return None, source

    if model_name:
        return by_name(model_name, f"litgpt config {model_name!r}")
    if checkpoint_dir is None:
        from onegpu.model import prepare

        checkpoint_dir = prepare()
    ckpt = Path(checkpoint_dir).expanduser()
    if (ckpt / "model_config.yaml").is_file():
        return Config.from_file(ckpt / "model_config.yaml"), f"{ckpt / 'model_config.yaml'}"
    if ckpt.name in name_to_config:
        return by_name(ckpt.name, f"litgpt config {ckpt.name!r} (named by the checkpoint dir; it has no model_config.yaml)")
    problems.append(Problem(f"{ckpt} has no model_config.yaml and {ckpt.name!r} is not a litgpt config name",
                            "pass --model_name NAME (e.g. Llama-2-7b-hf), or a prepared checkpoint dir", fatal=True))
    return None, str(ckpt)


def option_problems(a: dict[str, Any]) -> list[Problem]:
    """Every option problem at once: the trainer's checks that need no model (``config.option_problems``,
    the one place of those rules), collected, not raised, plus what only a GPU plan adds."""
    from onegpu.finetune.config import FinetuneOptions, option_problems as trainer_problems

    p = [Problem(err.problem, err.fix or "", True) for err in trainer_problems(FinetuneOptions.from_flat(a))]
    if a["optimizer"] not in OPTIMIZERS:
        p.append(Problem(f"unknown optimizer {a['optimizer']!r}", f"use one of {', '.join(OPTIMIZERS)}", True))
    if a["precision"] and a["precision"].startswith("32"):
        p.append(Problem("32-true on a GPU track doubles activations and weights", "use --precision bf16-true"))
    return p


def architecture_problems(config: Any) -> list[Problem]:
    """Block features whose activations the model approximates with the LLaMA block's accounting."""
    unmodeled = [name for name, present in (
        ("mixture of experts", config.n_expert > 0), ("latent attention", bool(config.latent_attention)),
        ("attention logit softcapping", config.attention_logit_softcapping is not None),
        ("q/k norms", config.norm_qk), (f"MLP {config.mlp_class_name}", config.mlp_class_name not in MODELED_MLPS),
    ) if present]
    if not unmodeled:
        return []
    return [Problem(f"{config.name}: {', '.join(unmodeled)} not modeled term by term; activations are approximate",
                    "confirm with the measured plan on a GPU (onegpu finetune plan --analytic false)")]


def workload_from(a: dict[str, Any], config: Any, problems: list[Problem]) -> Workload:
    manifest = Path(a["data"]) / "manifest.json" if a.get("data") else None
    manifest = json.loads(manifest.read_text()) if manifest is not None and manifest.is_file() else {}
    msl = requested_max_seq_length(a["max_seq_length"], manifest)  # the trainer's rule, before the block-size cap
    if msl > config.block_size:
        problems.append(Problem(f"max_seq_length {msl} > {config.name}'s block size {config.block_size}; "
                                f"the trainer uses {config.block_size}", f"--max_seq_length {config.block_size}"))
        msl = config.block_size
    return Workload(
        precision=a["precision"] or "bf16-true", quantize=a["quantize"], lora_r=a["lora_r"],
        lora_dropout=a["lora_dropout"], lora_query=a["lora_query"], lora_key=a["lora_key"],
        lora_value=a["lora_value"], lora_projection=a["lora_projection"], lora_mlp=a["lora_mlp"],
        lora_head=a["lora_head"], max_seq_length=msl, micro_batch_size=max(1, a["micro_batch_size"]),
        packing=a["packing"], activation_checkpointing=a["activation_checkpointing"], optimizer=a["optimizer"],
        device="cuda",
    )


def method_key(w: Workload) -> str:
    if w.quantize is None:
        return "lora"
    return "qlora-int8" if w.quantize == "bnb.int8" else "qlora-4bit"


def assumed_mfu(w: Workload, mfu: float | None, results_path: Path) -> tuple[float, str]:
    """(MFU, where it comes from): given, measured by the GPU check, or assumed."""
    if mfu is not None:
        return mfu, "given (--mfu)"
    from onegpu.contracts import read_json

    results = read_json(results_path)
    if results and not results.get("cuda"):
        return ASSUMED_MFU[method_key(w)], f"assumed for {method_key(w)} (the GPU check results are from a CPU run)"
    for row in results.get("train", []):
        if row.get("method") == method_key(w) and row.get("mfu"):
            return float(row["mfu"]), (f"measured by benchmarks/gpu_check.py on {results.get('device', '?')} "
                                       f"({results.get('date', '?')}, {row.get('name', method_key(w))})")
    return ASSUMED_MFU[method_key(w)], f"assumed for {method_key(w)} (no GPU check results yet)"


def dividing_micro_batch(global_batch_size: int, limit: int) -> int:
    """The largest micro-batch size up to ``limit`` that divides the global batch (0 if none does).

    The trainer accumulates ``global / micro`` micro-batches per optimizer step, so a suggestion
    that does not divide the global batch could not be used as it is.
    """
    top = min(limit, global_batch_size)
    return max((mb for mb in range(1, top + 1) if global_batch_size % mb == 0), default=0)


def track_rows(config: Any, w: Workload, weights: Any, mfu: float, budget_train_s: float,
               override_gib: float | None, chosen: str, max_mb: int, global_batch_size: int) -> dict[str, dict[str, Any]]:
    """Verdict, largest micro-batch (and the largest that divides the global batch), tokens per 24 h, per track."""
    from onegpu.finetune.telemetry import PEAK_FLOPS

    estimate = estimate_memory(config, w, weights)
    ac = recompute_factor(weights) if w.activation_checkpointing else 1.0
    per_token = flops_per_token(weights, w)
    rows = {}
    for name, spec in TRACKS.items():
        memory = (override_gib if override_gib and name == chosen else spec.memory_gib) * GIB
        peak = PEAK_FLOPS[TRACK_PEAK_KEY[name]]["bf16"]
        tokens_s = mfu * peak / per_token / ac
        largest = largest_micro_batch(config, w, memory, weights, limit=max_mb)
        rows[name] = {
            "memory_gib": memory / GIB, "fits": estimate.device_peak <= memory,
            "headroom_gib": (memory - estimate.device_peak) / GIB, "largest_micro_batch": largest,
            "suggested_micro_batch": dividing_micro_batch(global_batch_size, largest),
            "peak_tflops_bf16": peak / 1e12, "tokens_per_s": tokens_s, "tokens_per_24h": tokens_s * 86400,
            "tokens_in_budget": tokens_s * budget_train_s,
        }
    return rows


def analytic_plan(a: dict[str, Any], *, model_name: str | None = None, mfu: float | None = None,
                  track_memory_gib: float | None = None, max_micro_batch_size: int = 64,
                  reason: str = "asked for") -> dict[str, Any]:
    """The analytic plan of the fine-tuning options ``a`` (``finetune``'s keyword arguments)."""
    from onegpu.budget import BudgetClock

    problems = option_problems(a)
    config, source = resolve_model(model_name, a.get("checkpoint_dir"), problems)
    if any(p.fatal for p in problems):
        raise UserError("the config cannot be planned:\n  - " + "\n  - ".join(str(p) for p in problems),
                        fix="correct the options above (all problems are listed)")
    problems += architecture_problems(config)
    w = workload_from(a, config, problems)
    weights = count_weights(meta_model(config, w), w)
    estimate = estimate_memory(config, w, weights)
    clock = BudgetClock.from_spec(a["budget"], a["budget_reserve"], a["track"])
    rate, rate_source = assumed_mfu(w, mfu, gpu_check_results_path())
    tracks = track_rows(config, w, weights, rate, clock.budget_s - clock.reserve_s, track_memory_gib, a["track"],
                        max_micro_batch_size, a["global_batch_size"])
    chosen = tracks[a["track"]]
    problems += fit_problems(a["track"], chosen, w, estimate, a["global_batch_size"])
    checkpoints = CheckpointArgs(**{f.name: a[f.name] for f in fields(CheckpointArgs)})
    disk = plan_disk(checkpoints, model_sizes(config, w, a.get("checkpoint_dir")), a.get("max_steps"))
    if not disk["fits"]:
        problems.append(Problem(f"disk: {disk['text']}", "free space, or a smaller --keep_last, --export_hf false, "
                                "--merge false, or --out_dir on a larger disk"))
    report = {
        "mode": "analytic", "reason": reason, "model": config.name, "model_source": source,
        "workload": asdict(w), "total_params": weights.total_params, "trainable_params": weights.trainable_params,
        "base_linear_params": weights.base_linear_params,
        "memory_gib": {label: v / GIB for label, v in estimate.rows()},
        "paged_optimizer_states_gib": estimate.paged_optimizer_states / GIB,
        "tensor_peak_gib": estimate.tensor_peak / GIB, "device_peak_gib": estimate.device_peak / GIB,
        "peak_moment": estimate.peak_moment, "activation_bytes_per_token_layer": estimate.per_token_layer,
        "track": a["track"], "fits": chosen["fits"], "verdict": verdict(a["track"], chosen, w),
        "global_batch_size": a["global_batch_size"],
        "suggested_micro_batch_size": chosen["suggested_micro_batch"] or None, "tracks": tracks,
        "flops_per_token": flops_per_token(weights, w), "mfu": rate, "mfu_source": rate_source,
        "recompute_factor": recompute_factor(weights) if w.activation_checkpointing else 1.0,
        "budget_s": clock.budget_s, "train_time_s": clock.budget_s - clock.reserve_s,
        "disk": disk, "problems": [str(p) for p in problems], "assumptions": assumptions(w),
    }
    out = Path(a["out_dir"]).expanduser() if a.get("out_dir") else None
    if out is None:
        from onegpu.paths import runs_dir

        out = runs_dir() / "finetune-plan"
    atomic_write_json(out / "plan.json", report)
    print(format_report(report))
    return report


def fit_problems(track: str, row: dict[str, Any], w: Workload, estimate: Any, global_batch_size: int) -> list[Problem]:
    if row["fits"]:
        return []
    if row["suggested_micro_batch"]:
        fix = (f"--micro_batch_size {row['suggested_micro_batch']} (the largest that fits and divides "
               f"--global_batch_size {global_batch_size})")
    elif not w.activation_checkpointing:
        fix = "--activation_checkpointing true, then a smaller micro-batch"
    elif w.quantize is None:
        fix = "--quantize bnb.nf4-dq (QLoRA), or the a100-40gb track"
    else:
        fix = "a smaller model, a shorter --max_seq_length, or the a100-40gb track"
    return [Problem(f"needs {estimate.device_peak / GIB:.1f} GiB at micro-batch {w.micro_batch_size}, "
                    f"{track} has {row['memory_gib']:.1f} GiB", fix)]


def verdict(track: str, row: dict[str, Any], w: Workload) -> str:
    head = f"fits {track}" if row["fits"] else f"does NOT fit {track}"
    return f"{head} at micro-batch {w.micro_batch_size} ({row['headroom_gib']:+.1f} GiB headroom)"


def assumptions(w: Workload) -> list[str]:
    return [
        "every row full (max_seq_length tokens) and every token carrying a loss: the worst micro-batch",
        f"attention: {'FlexAttention (packed rows on CUDA)' if w.attention == 'flex' else 'SDPA'}",
        f"CUDA context + kernels {CUDA_CONTEXT_BYTES / GIB:.2f} GiB and allocator slack {100 * ALLOCATOR_SLACK:.0f}% of the "
        "tensor peak: assumed, not measured here",
        "paged optimizer states can move to CPU memory and are not counted in the peak",
        "first micro-batch of a step counted with full LoRA gradients (gradient accumulation keeps them)",
    ]


def _gib(x: float) -> str:
    return f"{x:6.2f}"


def format_report(r: dict[str, Any]) -> str:
    """The plan as a person reads it (``plan.json`` holds the same numbers)."""
    w = r["workload"]
    layers = ",".join(k for k in ("query", "key", "value", "projection", "mlp", "head") if w[f"lora_{k}"])
    method = f"QLoRA {w['quantize']}" if w["quantize"] else "LoRA"
    lines = [
        f"analytic plan: {r['model']} ({r['model_source']}); {r['reason']}",
        f"  {method}, {w['precision']}, r={w['lora_r']} on {layers}; micro-batch {w['micro_batch_size']} x "
        f"{w['max_seq_length']} tokens ({'packed' if w['packing'] else 'padded'}), activation checkpointing "
        f"{'on' if w['activation_checkpointing'] else 'off'}, {w['optimizer']}",
        f"  parameters: {r['total_params'] / 1e9:.2f} B ({r['base_linear_params'] / 1e9:.2f} B in the blocks' "
        f"linears), trainable LoRA {r['trainable_params'] / 1e6:.1f} M ({r['trainable_params'] / r['total_params']:.2%})",
        "  memory (GiB):",
        *(f"    {label:<40} {_gib(v)}" for label, v in r["memory_gib"].items()),
        f"    {'= peak on the card':<40} {_gib(r['device_peak_gib'])}   (tensors alone {r['tensor_peak_gib']:.2f}; "
        f"peak at the {r['peak_moment']})",
    ]
    if r["paged_optimizer_states_gib"]:
        lines.append(f"    {'(paged optimizer states, evictable)':<40} {_gib(r['paged_optimizer_states_gib'])}")
    per = r["activation_bytes_per_token_layer"]
    lines.append(f"  activations per token and layer: {per['without checkpointing'] / 1024:.1f} KiB without "
                 f"checkpointing, {per['with checkpointing'] / 1024:.1f} KiB with")
    lines.append(f"  verdict: {r['verdict']}")
    for name, t in r["tracks"].items():
        lines.append(f"    {name:<13} {t['memory_gib']:5.1f} GiB: {'fits' if t['fits'] else 'does NOT fit':<12} "
                     f"micro-batch {t['suggested_micro_batch']:>3} (memory allows {t['largest_micro_batch']:>3}, "
                     f"global batch {r['global_batch_size']}); {t['tokens_per_s']:,.0f} tok/s -> "
                     f"{t['tokens_per_24h'] / 1e6:,.0f} M tokens / 24 h ({t['tokens_in_budget'] / 1e6:,.0f} M in the "
                     f"{r['train_time_s'] / 3600:.1f} h of training)")
    lines.append(f"  speed: {r['flops_per_token'] / 1e9:.2f} GFLOP per token (LoRA-correct)"
                 + (f" x{r['recompute_factor']:.2f} recompute" if r["recompute_factor"] > 1 else "")
                 + f"; MFU {r['mfu']:.0%} {r['mfu_source']}")
    lines.append(f"  disk: {r['disk']['text']}")
    lines.append("  problems: " + ("none" if not r["problems"] else ""))
    lines += [f"    - {p}" for p in r["problems"]]
    lines.append("  assumptions: " + "; ".join(r["assumptions"]))
    return "\n".join(lines)

