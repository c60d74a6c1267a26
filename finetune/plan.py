"""``onegpu finetune plan``: measure a config before spending the budget on it.

Builds the real model with the real LoRA/QLoRA settings, runs a few real optimizer steps on real
packed batches of the data, and prints: peak memory against the track's GPU memory, non-padding
tokens/s, MFU, how many tokens and epochs fit in the budget, and a suggested micro-batch size.

* CUDA: memory is capped with ``torch.cuda.set_per_process_memory_fraction`` to the track's card
  (e.g. 24 GiB on an 80 GiB H100), and micro-batch sizes are tried upward until one does not fit.
* CPU: peak RSS is measured at two micro-batch sizes and extrapolated linearly (RSS also holds the
  Python/torch runtime, so it over-states what the GPU would need: a conservative verdict).
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import Any


def plan(steps: int = 2, max_micro_batch_size: int = 64, track_memory_gib: float | None = None,
         analytic: bool | None = None, model_name: str | None = None, mfu: float | None = None,
         **options: Any) -> dict[str, Any]:
    """Run a few real steps of a fine-tuning config and say whether and how it fits the track.

    Takes every option of ``onegpu finetune`` (so ``--config`` files are shared); the ones that
    shape memory and speed (model, precision, quantize, LoRA layers, max_seq_length, packing,
    micro_batch_size, activation_checkpointing, track, budget) are measured, the rest are accepted
    and ignored.

    Args:
        steps: measured optimizer steps per micro-batch size (after one warm-up step).
        max_micro_batch_size: the largest micro-batch size to try or suggest.
        track_memory_gib: override the track's GPU memory (GiB), e.g. to plan for another card.
        analytic: estimate from the model's config alone (``finetune/analytic_plan.py``): no weights,
            data or GPU. Default: analytic when there are no weights or no CUDA GPU; ``false`` measures.
        model_name: plan for a litgpt config name (e.g. ``Llama-2-13b-hf``) instead of a checkpoint (analytic).
        mfu: model FLOPs utilization for the analytic tokens/24 h (default: measured by
            ``benchmarks/gpu_check.py`` when its results exist, else assumed).

    Returns:
        The plan (also printed, and written to ``out_dir/plan.json`` and W&B).
    """
    import inspect

    from onegpu.finetune.lora import finetune

    args = {p.name: p.default for p in inspect.signature(finetune).parameters.values()}
    args.update(options)
    from onegpu.finetune.analytic_plan import analytic_plan, analytic_reason

    reason = analytic_reason(analytic, model_name, args)
    if reason:
        return analytic_plan(args, model_name=model_name, mfu=mfu, track_memory_gib=track_memory_gib,
                             max_micro_batch_size=max_micro_batch_size, reason=reason)
    return _plan(steps, max_micro_batch_size, track_memory_gib, args)


def _finetune_signature_and_doc() -> None:
    """Give ``plan`` the options of ``finetune`` (signature + docstring Args) for jsonargparse's --help."""
    from onegpu.finetune.lora import finetune

    import typing

    # real annotation objects (both modules use postponed annotations, i.e. strings)
    hints = {**typing.get_type_hints(finetune), **typing.get_type_hints(plan)}
    own = [p.replace(annotation=hints[n]) for n, p in inspect.signature(plan).parameters.items() if n != "options"]
    shared = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
              for p in inspect.signature(finetune).parameters.values()]
    plan.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared,
                                           return_annotation=dict)
    ft_doc = finetune.__doc__
    ft_args = ft_doc[ft_doc.index("    Args:\n") + len("    Args:\n"): ft_doc.index("\n    Returns:")]
    head, tail = plan.__doc__.split("\n    Returns:")
    plan.__doc__ = head.rstrip() + "\n" + ft_args + "\n\n    Returns:" + tail


def _plan(steps: int, max_micro_batch_size: int, track_memory_gib: float | None, args: dict[str, Any]) -> dict[str, Any]:
    import json

    import lightning as L
    import torch
    from litgpt.tokenizer import Tokenizer

    from onegpu.finetune import telemetry
    from onegpu.finetune.lora import _Trainer, _validate, build_model
    from onegpu.finetune.packing import batch_to, forward_hidden, loss_sum, use_flex_attention
    from onegpu.budget import format_duration
    from onegpu.contracts import TRACKS
    from onegpu.tracking import Run

    args.update(global_batch_size=args["micro_batch_size"], lora_dropout=0.0, max_steps=steps)
    if args.get("out_dir") is None:
        from onegpu.paths import runs_dir

        args["out_dir"] = runs_dir() / "finetune-plan"
    else:
        args["out_dir"] = Path(args["out_dir"]).expanduser()
    out_dir = args["out_dir"]
    track, packing, micro_batch_size = args["track"], args["packing"], args["micro_batch_size"]
    lora_r, activation_checkpointing = args["lora_r"], args["activation_checkpointing"]
    cfg = _validate(args)  # same checks as the real run, before loading the model
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    clock = cfg["_clock"]
    track_gib = float(track_memory_gib or TRACKS[track].memory_gib)

    trainer = _Trainer(cfg)
    import yaml

    trainer.model_block_size = int(yaml.safe_load((cfg["checkpoint_dir"] / "model_config.yaml").read_text())
                                   .get("block_size", 2048))
    tokenizer = Tokenizer(cfg["checkpoint_dir"])
    trainer.pad_id = 0
    trainer._prepare_examples(tokenizer)

    fabric = L.Fabric(accelerator=cfg["device"], devices=1, precision=cfg["precision"])
    trainer.device = fabric.device
    fabric.seed_everything(0, verbose=False)
    if fabric.device.type == "cuda":
        total = torch.cuda.get_device_properties(fabric.device).total_memory / 2**30
        if total > track_gib:  # simulate the smaller card
            torch.cuda.set_per_process_memory_fraction(track_gib / total, fabric.device)
    lora = {k: cfg[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_query", "lora_key", "lora_value",
                                "lora_projection", "lora_mlp", "lora_head")}
    model = build_model(fabric, cfg["checkpoint_dir"], lora, cfg["quantize"], trainer.max_seq_length, cfg["precision"])
    trainable, total_params = telemetry.count_parameters(model)
    shapes = telemetry.linear_shapes(model)
    model = fabric.setup_module(model)
    inner = model.module
    flex = packing and use_flex_attention(inner)
    params = [p for p in inner.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(params, lr=1e-4))
    peak_flops, peak_src = telemetry.device_peak_flops(fabric.device, cfg["precision"])

    from onegpu.finetune.packing import collate, plan_micro_batches

    def measure(mb: int) -> dict[str, Any]:
        plans = plan_micro_batches(trainer.lengths, trainer.max_seq_length, mb, packing, seed=0, epoch=0)
        # the fullest micro-batches: the plan must hold for the worst case, not the average
        plans = sorted(plans, key=lambda rows: -sum(trainer.lengths[i] for r in rows for i in r))[: steps + 1]
        meter = telemetry.Throughput(shapes, peak_flops)
        if fabric.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(fabric.device)
        for k, rows in enumerate(plans):
            b = collate(trainer.train_examples, rows, 0, pad_multiple=8 if fabric.device.type == "cuda" else 1)
            t0 = time.perf_counter()
            tb = batch_to(b, fabric.device)
            with fabric.autocast():
                hidden = forward_hidden(inner, tb, flex=flex, activation_checkpointing=activation_checkpointing)
                loss, n = loss_sum(inner, hidden, tb["labels"])
            fabric.backward(loss / max(1, n))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if fabric.device.type == "cuda":
                torch.cuda.synchronize()
            if k > 0 or len(plans) == 1:  # first step is warm-up
                meter.add_micro_batch(b)
                meter.add_step_time(time.perf_counter() - t0)
        return {"micro_batch_size": mb, "peak_memory_gib": telemetry.peak_memory_gib(fabric.device), **meter.rates()}

    results = []
    if fabric.device.type == "cuda":
        mb = micro_batch_size
        while mb <= max_micro_batch_size:
            try:
                results.append(measure(mb))
            except torch.cuda.OutOfMemoryError:
                results.append({"micro_batch_size": mb, "oom": True})
                torch.cuda.empty_cache()
                break
            mb *= 2
        fitting = [r for r in results if not r.get("oom") and r["peak_memory_gib"] <= 0.95 * track_gib]
        suggested = max(fitting, key=lambda r: r["tokens_per_s"]) if fitting else None
        estimate = "measured under a memory cap of the track's size"
    else:
        results.append(measure(micro_batch_size))
        results.append(measure(2 * micro_batch_size))
        base, more = results
        per_row = max(0.0, (more["peak_memory_gib"] - base["peak_memory_gib"]) / micro_batch_size)
        fixed = base["peak_memory_gib"] - per_row * micro_batch_size
        limit = min(max_micro_batch_size, int((0.95 * track_gib - fixed) / per_row) if per_row > 0 else max_micro_batch_size)
        best = max(results, key=lambda r: r["tokens_per_s"])
        suggested = dict(best, micro_batch_size=max(1, limit)) if base["peak_memory_gib"] <= track_gib else None
        if suggested is not None:
            suggested["peak_memory_gib"] = fixed + per_row * suggested["micro_batch_size"]
        estimate = ("CPU: peak RSS at two micro-batch sizes, extrapolated linearly; RSS includes the Python/torch "
                    "runtime, so this over-states GPU memory (conservative)")
    first = results[0]
    fits = not first.get("oom") and first["peak_memory_gib"] <= track_gib
    train_s = clock.budget_s - clock.reserve_s
    speed = (suggested or first).get("tokens_per_s", 0.0)
    tokens_per_epoch = sum(trainer.lengths)
    report = {
        "track": track, "track_memory_gib": track_gib, "device": str(fabric.device),
        "precision": cfg["precision"], "quantize": cfg["quantize"], "lora_r": lora_r,
        "max_seq_length": trainer.max_seq_length, "packing": packing,
        "trainable_params": trainable, "total_params": total_params,
        "measured": results, "fits": fits,
        "verdict": (f"fits {track}" if fits else f"does NOT fit {track}") + f" at micro-batch {micro_batch_size}",
        "suggested_micro_batch_size": suggested["micro_batch_size"] if suggested else None,
        "tokens_per_s": speed, "mfu": (suggested or first).get("mfu"), "peak_flops_source": peak_src,
        "budget_s": clock.budget_s, "train_time_s": train_s, "tokens_in_budget": speed * train_s,
        "tokens_per_epoch": tokens_per_epoch, "epochs_in_budget": speed * train_s / max(1, tokens_per_epoch),
        "memory_estimate": estimate,
    }
    out = Path(out_dir)
    with Run("finetune-plan", out, {k: v for k, v in cfg.items() if not k.startswith("_")}) as run:
        run.summary(**{k: v for k, v in report.items() if k != "measured"})
        run.log_table("plan", list(results[0].keys()) if not results[0].get("oom") else ["micro_batch_size", "oom"],
                      [[r.get(k) for k in (results[0].keys())] for r in results])
    (out / "plan.json").write_text(json.dumps(report, indent=2), encoding="utf-8")

    lines = [
        f"plan for {cfg['checkpoint_dir'].name} on {track} ({track_gib:.0f} GiB), {cfg['precision']}"
        + (f", {cfg['quantize']}" if cfg["quantize"] else "") + f", LoRA r={lora_r}, seq {trainer.max_seq_length}",
        *(f"  micro-batch {r['micro_batch_size']:>3}: " + ("OOM" if r.get("oom") else
          f"peak {r['peak_memory_gib']:.2f} GiB, {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%}") for r in results),
        f"  verdict: {report['verdict']} (peak {first.get('peak_memory_gib', float('nan')):.2f} GiB vs {track_gib:.0f} GiB)",
        f"  suggested micro-batch: {report['suggested_micro_batch_size']}",
        f"  in the budget ({format_duration(clock.budget_s)}, {format_duration(train_s)} of training): "
        f"{report['tokens_in_budget']:.3g} tokens = {report['epochs_in_budget']:.2f} epochs of this mix "
        f"({tokens_per_epoch} tokens)",
        f"  memory: {estimate}",
    ]
    print("\n".join(lines), file=sys.stderr)
    return report


_finetune_signature_and_doc()
