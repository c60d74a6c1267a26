"""``onegpu finetune plan``: measure a config before spending the budget on it.

Builds the real model with the real LoRA/QLoRA settings (``LoRATrainer.tracked``), runs a few real
optimizer steps (``LoRATrainer.train_step``) on the fullest packed batches of the data, and
prints: peak memory against the track's GPU memory, non-padding tokens/s, MFU, how many tokens
and epochs fit in the budget, and a suggested micro-batch size.

* CUDA: memory is capped with ``torch.cuda.set_per_process_memory_fraction`` to the track's card
  (e.g. 24 GiB on an 80 GiB H100), and micro-batch sizes are tried upward until one does not fit.
* CPU: peak RSS is measured at two micro-batch sizes and extrapolated linearly (RSS also holds the
  Python/torch runtime, so it over-states what the GPU would need: a conservative verdict).

With ``--analytic`` (the default when there are no weights or no CUDA GPU) the answer comes from the
model's config alone instead (``finetune/planning/analytic.py``).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from onegpu.budget import format_duration
from onegpu.contracts import TRACKS, atomic_write_json
from onegpu.errors import all_problems
from onegpu.finetune import telemetry
from onegpu.finetune.config import collect_problems, resolve
from onegpu.finetune.disk import config_sizes, plan_disk
from onegpu.finetune.lora import LoRATrainer
from onegpu.finetune.options import FinetuneOptions, PlanArgs, option_problems
from onegpu.finetune.packing import plan_micro_batches
from onegpu.finetune.planning.analytic import DoesNotFit, analytic_plan, analytic_reason, dividing_micro_batch
from onegpu.finetune.proxy import describe_items
from onegpu.paths import runs_dir


def plan(plan_args: PlanArgs, options: FinetuneOptions) -> dict[str, Any]:
    """``onegpu finetune plan``: the analytic plan, or a few real steps measured (``measured_plan``)."""

    a = plan_args
    reason = analytic_reason(a.analytic, a.model_name, options.flat())
    if reason:
        return analytic_plan(options.flat(), model_name=a.model_name, mfu=a.mfu, track_memory_gib=a.track_memory_gib,
                             max_micro_batch_size=a.max_micro_batch_size, reason=reason)
    return measured_plan(options, a.steps, a.max_micro_batch_size, a.track_memory_gib)


def measured_plan(options: FinetuneOptions, steps: int, max_micro_batch_size: int,
                  track_memory_gib: float | None) -> dict[str, Any]:
    """Real steps of the trainer (``LoRATrainer.tracked`` + ``train_step``) on the fullest batches of the data."""

    global_batch = options.train.global_batch_size  # suggestions must divide it (plan steps use one micro-batch)
    # the real run's checks, before the model, on the options as given and as plan mode runs them: all at once
    problems = option_problems(options)
    cfg = collect_problems(problems, resolve, plan_options(options, steps))
    if problems:
        raise all_problems(problems)
    track_gib = float(track_memory_gib or TRACKS[cfg.budget.track].memory_gib)
    if cfg.model.device == "cuda":
        cap_cuda_memory(track_gib)
    trainer = LoRATrainer(cfg)
    with trainer.tracked("finetune-plan") as run:
        measure_sizes = measure_on_cuda if trainer.fabric.device.type == "cuda" else measure_on_cpu
        results, suggested, estimate = measure_sizes(trainer, steps, max_micro_batch_size, track_gib, global_batch)
        report = plan_report(trainer, results, suggested, estimate, track_gib, global_batch)
        report["disk"] = plan_disk(options.checkpoints, config_sizes(trainer.cfg), options.train.max_steps)
        report.update(measure_proxy(trainer))
        run.summary(**{k: v for k, v in report.items() if k != "measured"})
        columns = list(results[0].keys()) if not results[0].get("oom") else ["micro_batch_size", "oom"]
        run.log_table("plan", columns, [[r.get(k) for k in results[0].keys()] for r in results])
    atomic_write_json(cfg.checkpoints.out_dir / "plan.json", report)
    print("\n".join(report_lines(trainer, report)), file=sys.stderr)
    if not report["fits"]:

        first = report["measured"][0]
        needs = "runs out of memory" if first.get("oom") else f"peaks at {first['peak_memory_gib']:.1f} GiB"
        fix = (f"--micro_batch_size {report['suggested_micro_batch_size']}" if report["suggested_micro_batch_size"]
               else "--activation_checkpointing true or --quantize bnb.nf4-dq (`onegpu finetune plan --analytic` "
                    "ranks the setups that fit)")
        raise DoesNotFit(report, f"micro-batch {cfg.train.micro_batch_size} {needs}, the track has "
                                 f"{report['track_memory_gib']:.1f} GiB", fix)
    return report


def plan_options(options: FinetuneOptions, steps: int) -> FinetuneOptions:
    """The config as plan mode runs it: one micro-batch per step, no dropout, no resume, its own out dir."""

    return options.replace(global_batch_size=options.train.micro_batch_size, lora_dropout=0.0, max_steps=steps,
                           resume=None, out_dir=options.checkpoints.out_dir or runs_dir() / "finetune-plan")


def cap_cuda_memory(track_gib: float) -> None:
    """Simulate the track's smaller card on a bigger one."""

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total > track_gib:
        torch.cuda.set_per_process_memory_fraction(track_gib / total, 0)


def measure(trainer: Any, micro_batch_size: int, steps: int) -> dict[str, Any]:
    """Peak memory, tokens/s and MFU of ``steps`` optimizer steps (after one warm-up) at a micro-batch size."""

    data, device = trainer.data, trainer.fabric.device
    plans = plan_micro_batches(data.lengths, data.max_seq_length, micro_batch_size, data.packing, seed=0, epoch=0)
    # the fullest micro-batches: the plan must hold for the worst case, not the average
    plans = sorted(plans, key=lambda rows: -sum(data.lengths[i] for r in rows for i in r))[: steps + 1]
    meter = telemetry.Throughput(trainer.shapes, trainer.peak_flops)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for k, rows in enumerate(plans):
        batch = data.collate(rows)
        t0 = time.perf_counter()
        trainer.train_step([batch])
        if k > 0 or len(plans) == 1:  # first step is warm-up
            meter.add_micro_batch(batch)
            meter.add_step_time(time.perf_counter() - t0)
    return {"micro_batch_size": micro_batch_size, "peak_memory_gib": telemetry.peak_memory_gib(device),
            **meter.rates()}


def measure_on_cuda(trainer: Any, steps: int, max_micro_batch_size: int, track_gib: float, global_batch: int):
    """Micro-batch sizes upward (doubling) under the memory cap, until one runs out of memory.

    The suggestion is the fastest measured size that fits and divides the global batch.
    """

    results = []
    mb = trainer.cfg.train.micro_batch_size
    while mb <= max_micro_batch_size:
        try:
            results.append(measure(trainer, mb, steps))
        except torch.cuda.OutOfMemoryError:
            results.append({"micro_batch_size": mb, "oom": True})
            torch.cuda.empty_cache()
            break
        mb *= 2
    fitting = [r for r in results if not r.get("oom") and r["peak_memory_gib"] <= 0.95 * track_gib
               and global_batch % r["micro_batch_size"] == 0]
    suggested = max(fitting, key=lambda r: r["tokens_per_s"]) if fitting else None
    return results, suggested, "measured under a memory cap of the track's size"


def measure_on_cpu(trainer: Any, steps: int, max_micro_batch_size: int, track_gib: float, global_batch: int):
    """Peak RSS at the configured micro-batch size and twice it, extrapolated linearly; the suggestion is
    the largest size under the extrapolated limit that divides the global batch."""

    mb = trainer.cfg.train.micro_batch_size
    base, more = measure(trainer, mb, steps), measure(trainer, 2 * mb, steps)
    per_row = max(0.0, (more["peak_memory_gib"] - base["peak_memory_gib"]) / mb)
    fixed = base["peak_memory_gib"] - per_row * mb
    limit = min(max_micro_batch_size, int((0.95 * track_gib - fixed) / per_row) if per_row > 0 else max_micro_batch_size)
    best = max((base, more), key=lambda r: r["tokens_per_s"])
    size = dividing_micro_batch(global_batch, max(1, limit))
    suggested = dict(best, micro_batch_size=size) if size and base["peak_memory_gib"] <= track_gib else None
    if suggested is not None:
        suggested["peak_memory_gib"] = fixed + per_row * suggested["micro_batch_size"]
    estimate = ("CPU: peak RSS at two micro-batch sizes, extrapolated linearly; RSS includes the Python/torch "
                "runtime, so this over-states GPU memory (conservative)")
    return [base, more], suggested, estimate


def measure_proxy(trainer: Any) -> dict[str, Any]:
    """The cost of one test-proxy evaluation (``--proxy_suite``), timed on the real model; {} without one."""

    if not trainer.cfg.proxy:
        return {}
    t0 = time.perf_counter()
    trainer.proxy.complete_all()
    seconds = time.perf_counter() - t0
    every = trainer.cfg.eval.proxy_interval
    return {"proxy_items": describe_items(trainer.cfg.proxy), "proxy_s_per_evaluation": seconds,
            "proxy_s_per_step": seconds / every if every else None}


def plan_report(trainer: Any, results: list[dict[str, Any]], suggested: dict[str, Any] | None, estimate: str,
                track_gib: float, global_batch: int) -> dict[str, Any]:
    cfg, clock = trainer.cfg, trainer.cfg.clock
    track, micro_batch_size = cfg.budget.track, cfg.train.micro_batch_size
    first = results[0]
    fits = not first.get("oom") and first["peak_memory_gib"] <= track_gib
    train_s = clock.budget_s - clock.reserve_s
    speed = (suggested or first).get("tokens_per_s", 0.0)
    tokens_per_epoch = sum(trainer.data.lengths)
    return {
        "track": track, "track_memory_gib": track_gib, "device": str(trainer.fabric.device),
        "precision": cfg.model.precision, "quantize": cfg.model.quantize, "lora_r": cfg.lora.lora_r,
        "max_seq_length": cfg.data.max_seq_length, "packing": cfg.data.packing,
        "trainable_params": trainer.trainable_params, "total_params": trainer.total_params,
        "measured": results, "fits": fits,
        "verdict": (f"fits {track}" if fits else f"does NOT fit {track}") + f" at micro-batch {micro_batch_size}",
        "global_batch_size": global_batch,
        "suggested_micro_batch_size": suggested["micro_batch_size"] if suggested else None,
        "tokens_per_s": speed, "mfu": (suggested or first).get("mfu"), "peak_flops_source": trainer.peak_flops_source,
        "budget_s": clock.budget_s, "train_time_s": train_s, "tokens_in_budget": speed * train_s,
        "tokens_per_epoch": tokens_per_epoch, "epochs_in_budget": speed * train_s / max(1, tokens_per_epoch),
        "memory_estimate": estimate,
    }


def report_lines(trainer: Any, report: dict[str, Any]) -> list[str]:
    cfg = trainer.cfg
    first = report["measured"][0]
    return [
        f"plan for {cfg.model.checkpoint_dir.name} on {report['track']} ({report['track_memory_gib']:.0f} GiB), "
        f"{cfg.model.precision}" + (f", {cfg.model.quantize}" if cfg.model.quantize else "")
        + f", LoRA r={cfg.lora.lora_r}, seq {cfg.data.max_seq_length}",
        *(f"  micro-batch {r['micro_batch_size']:>3}: " + ("OOM" if r.get("oom") else
          f"peak {r['peak_memory_gib']:.2f} GiB, {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%}")
          for r in report["measured"]),
        f"  verdict: {report['verdict']} (peak {first.get('peak_memory_gib', float('nan')):.2f} GiB vs "
        f"{report['track_memory_gib']:.0f} GiB)",
        f"  suggested micro-batch: {report['suggested_micro_batch_size']} (divides the global batch "
        f"{report['global_batch_size']})",
        f"  in the budget ({format_duration(report['budget_s'])}, {format_duration(report['train_time_s'])} of "
        f"training): {report['tokens_in_budget']:.3g} tokens = {report['epochs_in_budget']:.2f} epochs of this mix "
        f"({report['tokens_per_epoch']} tokens)",
        f"  memory: {report['memory_estimate']}",
        f"  disk: {report['disk']['text']}",
        *([f"  test proxy: {format_duration(report['proxy_s_per_evaluation'])} per evaluation of "
           f"{report['proxy_items']}" + (f"; every {cfg.eval.proxy_interval} steps = "
                                        f"{report['proxy_s_per_step']:.2f} s per step on the budget clock"
                                        if report["proxy_s_per_step"] else "; once, at the end")]
          if "proxy_s_per_evaluation" in report else []),
    ]
