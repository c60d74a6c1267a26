"""``onegpu finetune plan --analytic``: does a config fit a track, and how many tokens will 24 h give?

Answers from the model's litgpt config alone (``--model_name Llama-2-13b-hf``, or a checkpoint's
``model_config.yaml``, or a checkpoint dir's name): no weights, no data, no GPU, in seconds. The
memory model is ``finetune/planning/memory.py`` (validated against measured CPU steps in the tests); speed
is the LoRA-correct FLOP count of ``finetune/telemetry.py`` at an MFU that is measured when
``benchmarks/gpu_check.py`` has written its results file, else assumed (and said so).

``onegpu finetune plan`` switches to this mode by itself when there are no weights to measure or no
CUDA GPU (``--analytic false`` forces the measured CPU plan).
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from litgpt.config import Config, name_to_config

from onegpu.budget import BudgetClock
from onegpu.contracts import TRACKS, atomic_write_json, read_json
from onegpu.errors import UserError
from onegpu.finetune.config import requested_max_seq_length
from onegpu.finetune.disk import model_sizes, plan_disk
from onegpu.finetune.options import CheckpointArgs, FinetuneOptions, option_problems as trainer_problems
from onegpu.finetune.planning.memory import (ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, GIB, MODELED_MLPS, OPTIMIZERS,
                                             Workload, count_weights, estimate_memory, flops_per_token,
                                             largest_micro_batch, meta_model, recompute_factor)
from onegpu.finetune.telemetry import PEAK_FLOPS
from onegpu.model import prepare
from onegpu.paths import REPO_ROOT, runs_dir

# The share of a card that shipped presets and the day plan keep free: the analytic model's GPU-only
# terms (CUDA context, allocator slack) are assumptions until a GPU check has measured them.
SAFE_HEADROOM = 0.10
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

    if not torch.cuda.is_available():
        return "no CUDA GPU here (--analytic false measures real steps on this CPU instead)"
    return None


def resolve_model(model_name: str | None, checkpoint_dir: Any, problems: list[Problem]) -> tuple[Any, str]:
    """The litgpt Config to plan for, and where it came from."""

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
    """Every option problem at once: the trainer's checks that need no model (``options.option_problems``,
    the one place of those rules), collected, not raised, plus what only a GPU plan adds."""

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


# ----------------------------------------------------------------------------------- evaluation
RECOMMEND_RANKS = (8, 16, 32, 64, 128)
RECOMMEND_QUANTIZE = (None, "bnb.nf4-dq")
RECOMMEND_RULE = ("every setup at the largest micro-batch that fits the card and divides the global batch; ranked "
                  "by tokens trained in the budget (MFU x the card's bf16 peak / (LoRA-correct FLOPs per token x "
                  "the recompute factor) x the training time), ties by headroom. Rank, quantization and "
                  "checkpointing trade memory for speed here; which rank learns best is the sweep's question")


@dataclass(frozen=True)
class Fit:
    """One setup on one card: the micro-batch it can run, its peak there, and what it trains in the budget."""

    memory_gib: float
    configured_peak_gib: float  # at the configured micro-batch
    fits: bool  # the configured micro-batch fits
    largest_micro_batch: int  # memory alone (0: not even 1 fits)
    suggested_micro_batch: int  # the largest that fits and divides the global batch (0: none)
    peak_gib: float | None  # at the suggested micro-batch
    mfu: float
    mfu_source: str
    tokens_per_s: float | None  # None when nothing fits: no forecast for a setup that cannot run
    tokens_in_budget: float | None

    @property
    def headroom_gib(self) -> float:
        """At the configured micro-batch (negative: it does not fit)."""
        return self.memory_gib - self.configured_peak_gib

    @property
    def suggested_headroom_gib(self) -> float | None:
        return None if self.peak_gib is None else self.memory_gib - self.peak_gib


class Evaluator:
    """Memory and speed of workloads of one model on one card, meta models cached per LoRA layout."""

    def __init__(self, config: Any, track: str, memory_gib: float, train_s: float, global_batch_size: int,
                 mfu: float | None, max_micro_batch_size: int = 64):
        self.config, self.track, self.memory_gib, self.train_s = config, track, memory_gib, train_s
        self.global_batch_size, self.mfu, self.max_mb = global_batch_size, mfu, max_micro_batch_size
        self._models: dict[tuple, Any] = {}

    def weights(self, w: Workload) -> Any:
        key = (w.lora_r, w.lora_query, w.lora_key, w.lora_value, w.lora_projection, w.lora_mlp, w.lora_head)
        if key not in self._models:
            self._models[key] = meta_model(self.config, w)
        return count_weights(self._models[key], w)

    def fit(self, w: Workload) -> Fit:
        weights = self.weights(w)
        memory = self.memory_gib * GIB
        largest = largest_micro_batch(self.config, w, memory, weights, limit=self.max_mb)
        suggested = dividing_micro_batch(self.global_batch_size, largest)
        rate, source = assumed_mfu(w, self.mfu, gpu_check_results_path())
        peak = PEAK_FLOPS[TRACK_PEAK_KEY[self.track]]["bf16"] if self.track in TRACK_PEAK_KEY else 0.0
        recompute = recompute_factor(weights) if w.activation_checkpointing else 1.0
        tokens_s = rate * peak / flops_per_token(weights, w) / recompute if suggested else None
        configured = estimate_memory(self.config, w, weights).device_peak
        return Fit(memory_gib=self.memory_gib, configured_peak_gib=configured / GIB, fits=configured <= memory,
                   largest_micro_batch=largest, suggested_micro_batch=suggested,
                   peak_gib=(estimate_memory(self.config, replace(w, micro_batch_size=suggested), weights).device_peak
                             / GIB if suggested else None),
                   mfu=rate, mfu_source=source, tokens_per_s=tokens_s,
                   tokens_in_budget=tokens_s * self.train_s if tokens_s else None)

    def recommend(self, w: Workload) -> list[dict[str, Any]]:
        """Every fitting setup over rank x quantization x checkpointing (the rest as configured), best first."""
        found = []
        for r, quantize, ac in itertools.product(sorted({*RECOMMEND_RANKS, w.lora_r}),
                                                 dict.fromkeys((*RECOMMEND_QUANTIZE, w.quantize)), (False, True)):
            candidate = replace(w, lora_r=r, quantize=quantize, activation_checkpointing=ac,
                                precision="bf16-true" if quantize and "mixed" in w.precision else w.precision)
            fit = self.fit(candidate)
            if fit.suggested_micro_batch:
                found.append({"lora_r": r, "quantize": quantize, "activation_checkpointing": ac,
                              "precision": candidate.precision, "micro_batch_size": fit.suggested_micro_batch,
                              "peak_gib": fit.peak_gib, "headroom_gib": fit.suggested_headroom_gib, "mfu": fit.mfu,
                              "tokens_per_s": fit.tokens_per_s, "tokens_in_budget": fit.tokens_in_budget})
        return sorted(found, key=lambda c: (-c["tokens_in_budget"], -c["headroom_gib"]))

    def nearest_fix(self, w: Workload) -> str:
        """The fewest changes to ``w`` that fit the card, tried in order of how little they change the run."""
        true = "bf16-true" if "mixed" in w.precision else w.precision
        tries = [({}, "")]
        if not w.activation_checkpointing:
            tries.append(({"activation_checkpointing": True}, "--activation_checkpointing true"))
        if true != w.precision:
            tries += [({"precision": true}, f"--precision {true}"),
                      ({"precision": true, "activation_checkpointing": True},
                       f"--precision {true} --activation_checkpointing true")]
        if w.quantize is None:
            tries += [({"quantize": "bnb.nf4-dq", "precision": true}, "--quantize bnb.nf4-dq"
                       + (f" --precision {true}" if true != w.precision else "")),
                      ({"quantize": "bnb.nf4-dq", "precision": true, "activation_checkpointing": True},
                       "--quantize bnb.nf4-dq --activation_checkpointing true"
                       + (f" --precision {true}" if true != w.precision else ""))]
        for changes, flags in tries:
            fit = self.fit(replace(w, **changes))
            if fit.suggested_micro_batch:
                return (f"{flags} --micro_batch_size {fit.suggested_micro_batch}".strip()
                        + f" (peak {fit.peak_gib:.1f} GiB of {self.memory_gib:.1f}; the largest micro-batch that fits "
                          f"and divides --global_batch_size {self.global_batch_size})")
        return (f"nothing fits {self.memory_gib:.1f} GiB at max_seq_length {w.max_seq_length}, even QLoRA with "
                "checkpointing at micro-batch 1: a smaller model or a shorter --max_seq_length")


def analytic_plan(a: dict[str, Any], *, model_name: str | None = None, mfu: float | None = None,
                  track_memory_gib: float | None = None, max_micro_batch_size: int = 64,
                  reason: str = "asked for") -> dict[str, Any]:
    """The analytic plan of the fine-tuning options ``a`` (``finetune``'s keyword arguments).

    Prints it, writes ``plan.json``, and raises :class:`DoesNotFit` (exit 2) after both when the
    configured micro-batch does not fit the track.
    """

    problems: list[Problem] = []
    config, source, w = planned_workload(a, model_name, problems)
    clock = BudgetClock.from_spec(a["budget"], a["budget_reserve"], a["track"])
    train_s = clock.budget_s - clock.reserve_s
    evaluators = {name: Evaluator(config, name, track_memory_gib if track_memory_gib and name == a["track"]
                                  else spec.memory_gib, train_s, a["global_batch_size"], mfu, max_micro_batch_size)
                  for name, spec in TRACKS.items()}
    chosen = evaluators[a["track"]]
    weights = chosen.weights(w)
    estimate = estimate_memory(config, w, weights)
    fits = {name: ev.fit(w) for name, ev in evaluators.items()}
    fit = fits[a["track"]]
    fit_problem = None
    if not fit.fits:
        fit_problem = Problem(f"needs {fit.configured_peak_gib:.1f} GiB at micro-batch {w.micro_batch_size}, "
                              f"{a['track']} has {fit.memory_gib:.1f} GiB", chosen.nearest_fix(w))
        problems.append(fit_problem)
    data = data_epochs(a.get("data"), fit.tokens_in_budget, None if a["max_steps"] else a["epochs"])
    if data.get("epochs_requested") and data.get("epochs_in_budget") is not None \
            and data["epochs_requested"] > data["epochs_in_budget"]:
        problems.append(Problem(f"--epochs {data['epochs_requested']:g} of this mix is "
                                f"{data['epochs_requested'] * data['tokens_per_epoch'] / 1e6:.0f} M tokens; the budget "
                                f"trains ~{data['epochs_in_budget']:.2f} epochs", "nothing to do if that is intended: the "
                                "budget stops the run and the LR schedule reaches its floor then (finetune/schedule.py)"))
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
        "track": a["track"], "fits": fit.fits, "verdict": verdict(a["track"], fit, w),
        "global_batch_size": a["global_batch_size"],
        "suggested_micro_batch_size": fit.suggested_micro_batch or None,
        "tracks": {name: asdict(f) | {"headroom_gib": f.headroom_gib, "suggested_headroom_gib": f.suggested_headroom_gib}
                   for name, f in fits.items()},
        "flops_per_token": flops_per_token(weights, w), "mfu": fit.mfu, "mfu_source": fit.mfu_source,
        "recompute_factor": recompute_factor(weights) if w.activation_checkpointing else 1.0,
        "budget_s": clock.budget_s, "train_time_s": train_s, "data": data,
        "recommendation": {"rule": RECOMMEND_RULE, "setups": chosen.recommend(w)},
        "disk": disk, "problems": [str(p) for p in problems], "assumptions": assumptions(w),
    }
    out = Path(a["out_dir"]).expanduser() if a.get("out_dir") else None
    if out is None:

        out = runs_dir() / "finetune-plan"
    atomic_write_json(out / "plan.json", report)
    print(format_report(report))
    if fit_problem is not None:
        raise DoesNotFit(report, fit_problem.problem, fit_problem.fix)
    return report


def planned_workload(a: dict[str, Any], model_name: str | None, problems: list[Problem]) -> tuple[Any, str, Workload]:
    """The litgpt config (and where it came from) and the Workload of the options ``a``; raises
    UserError listing every problem when the config cannot be planned. Softer problems land in ``problems``."""
    problems += option_problems(a)
    config, source = resolve_model(model_name, a.get("checkpoint_dir"), problems)
    if any(p.fatal for p in problems):
        raise UserError("the config cannot be planned:\n  - " + "\n  - ".join(str(p) for p in problems),
                        fix="correct the options above (all problems are listed)")
    problems += architecture_problems(config)
    return config, source, workload_from(a, config, problems)


def fit_on_track(a: dict[str, Any], model_name: str | None = None, mfu: float | None = None) -> tuple[Any, Workload, Fit]:
    """The options ``a`` on their own track, without printing: (litgpt config, workload, fit)."""

    config, _source, w = planned_workload(a, model_name, [])
    clock = BudgetClock.from_spec(a["budget"], a["budget_reserve"], a["track"])
    evaluator = Evaluator(config, a["track"], TRACKS[a["track"]].memory_gib, clock.budget_s - clock.reserve_s,
                          a["global_batch_size"], mfu)
    return config, w, evaluator.fit(w)


class DoesNotFit(UserError):
    """The planned config does not fit its track (the CLI exits 2, after the plan was printed and
    written); ``report`` is the whole plan."""

    def __init__(self, report: dict[str, Any], problem: str, fix: str):
        super().__init__(f"the config does NOT fit {report['track']}: {problem}", fix=fix)
        self.report = report


def data_epochs(data: str | None, tokens_in_budget: float | None, epochs: float | None) -> dict[str, Any]:
    """With ``--data``: the mix's training tokens, how many epochs of it the budget trains, and the epochs asked for."""
    if not data or not (Path(data) / "manifest.json").is_file():
        return {}
    manifest = json.loads((Path(data) / "manifest.json").read_text())
    per_epoch = int(manifest.get("tokens", {}).get("train", {}).get("total") or 0)
    return {"dir": str(data), "tokens_per_epoch": per_epoch,
            "tokenizer": (manifest.get("tokenizer") or {}).get("name"),
            "epochs_in_budget": tokens_in_budget / per_epoch if per_epoch and tokens_in_budget else None,
            "epochs_requested": epochs}


def verdict(track: str, fit: Fit, w: Workload) -> str:
    if fit.fits:
        return f"fits {track} at micro-batch {w.micro_batch_size} ({fit.headroom_gib:+.1f} GiB headroom)"
    return (f"does NOT fit {track} at micro-batch {w.micro_batch_size}: needs {fit.configured_peak_gib:.1f} of "
            f"{fit.memory_gib:.1f} GiB")


def assumptions(w: Workload) -> list[str]:
    return [
        "every row full (max_seq_length tokens) and every token carrying a loss: the worst micro-batch",
        f"attention: {'FlexAttention (packed rows on CUDA)' if w.attention == 'flex' else 'SDPA'}",
        f"CUDA context + kernels {CUDA_CONTEXT_BYTES / GIB:.2f} GiB and allocator slack {100 * ALLOCATOR_SLACK:.0f}% of the "
        "tensor peak: assumed, not measured here",
        "paged optimizer states can move to CPU memory and are not counted in the peak",
        "first micro-batch of a step counted with full LoRA gradients (gradient accumulation keeps them)",
        "speed does not depend on the micro-batch (one MFU per method)",
    ]


def _gib(x: float) -> str:
    return f"{x:6.2f}"


def track_line(name: str, t: dict[str, Any], w: dict[str, Any], global_batch: int) -> str:
    """One card's answer: the configured micro-batch's verdict, else the one to use; a forecast only if one fits."""
    head = f"    {name:<13} {t['memory_gib']:5.1f} GiB: "
    if not t["largest_micro_batch"]:
        return head + (f"does NOT fit, not even at micro-batch 1 (micro-batch {w['micro_batch_size']} needs "
                       f"{t['configured_peak_gib']:.1f} GiB)")
    forecast = (f"{t['tokens_per_s']:,.0f} tok/s -> {t['tokens_per_s'] * 86400 / 1e6:,.0f} M tokens / 24 h "
                f"({t['tokens_in_budget'] / 1e6:,.0f} M in the budget)")
    mb = t["suggested_micro_batch"]
    if t["fits"]:
        return head + (f"fits at micro-batch {w['micro_batch_size']} ({t['headroom_gib']:+.1f} GiB); the largest that "
                       f"divides the global batch {global_batch} is {mb} (memory allows {t['largest_micro_batch']}); "
                       + forecast)
    return head + (f"micro-batch {w['micro_batch_size']} does NOT fit (needs {t['configured_peak_gib']:.1f} GiB); "
                   f"micro-batch {mb} does ({t['peak_gib']:.1f} GiB, the largest that divides the global batch "
                   f"{global_batch}); " + forecast)


def setup_text(c: dict[str, Any]) -> str:
    return (f"{c['quantize'] or 'bf16 LoRA'}, checkpointing {'on' if c['activation_checkpointing'] else 'off'}, "
            f"micro-batch {c['micro_batch_size']}: peak {c['peak_gib']:.1f} GiB ({c['headroom_gib']:+.1f}), "
            f"{c['tokens_per_s']:,.0f} tok/s -> {c['tokens_in_budget'] / 1e6:,.0f} M tokens in the budget")


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
    lines += [track_line(name, t, w, r["global_batch_size"]) for name, t in r["tracks"].items()]
    lines.append(f"  speed: {r['flops_per_token'] / 1e9:.2f} GFLOP per token (LoRA-correct)"
                 + (f" x{r['recompute_factor']:.2f} recompute" if r["recompute_factor"] > 1 else "")
                 + f"; MFU {r['mfu']:.0%} {r['mfu_source']}")
    data = r["data"]
    if data.get("epochs_in_budget") is not None:
        lines.append(f"  data: {data['tokens_per_epoch'] / 1e6:,.1f} M training tokens per epoch of {data['dir']} "
                     f"(counted with the {data['tokenizer'] or 'data build'} tokenizer); the budget trains "
                     f"~{data['epochs_in_budget']:.2f} epochs")
    lines.append(f"  disk: {r['disk']['text']}")
    setups, rank = r["recommendation"]["setups"], w["lora_r"]
    at_rank = next((c for c in setups if c["lora_r"] == rank), None)
    lines.append(f"  recommended on {r['track']} at r={rank}: " + (setup_text(at_rank) if at_rank else
                                                                  "nothing fits at this rank and max_seq_length"))
    best_per_rank = {}
    for c in setups:  # sorted best first, so the first of each rank is its fastest
        best_per_rank.setdefault(c["lora_r"], c)
    lines.append("    the fastest fitting setup per rank (plan.json lists all " + f"{len(setups)}):")
    lines += [f"      r={c['lora_r']:<4} {setup_text(c)}" for _, c in sorted(best_per_rank.items())]
    lines.append(f"    rule: {r['recommendation']['rule']}")
    lines.append("  problems: " + ("none" if not r["problems"] else ""))
    lines += [f"    - {p}" for p in r["problems"]]
    lines.append("  assumptions: " + "; ".join(r["assumptions"]))
    return "\n".join(lines)
