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
from typing import Any, Literal

from finetune.lora import Precision, Quantize, Track


def plan(
    data: str | None = None,
    checkpoint_dir: Path | None = None,
    track: Track = "rtx4090-24gb",
    budget: str | None = None,
    precision: Precision | None = None,
    quantize: Quantize | None = None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    max_seq_length: int | None = None,
    packing: bool = True,
    micro_batch_size: int = 1,
    activation_checkpointing: bool = False,
    steps: int = 2,
    max_micro_batch_size: int = 64,
    track_memory_gib: float | None = None,
    out_dir: Path | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Run a few real steps of a fine-tuning config and say whether and how it fits the track.

    Args:
        data: data-stage output dir (or W&B dataset artifact when online), as for ``onegpu finetune``.
        checkpoint_dir: base litgpt checkpoint. Default: the bundled SmolLM2-135M.
        track: ``rtx4090-24gb`` or ``a100-40gb``: the GPU memory to fit in and the default budget (24h).
        budget: wall-clock budget like ``24h`` (default: the track's).
        precision: as for ``onegpu finetune`` (default 32-true on CPU, bf16-true on CUDA).
        quantize: QLoRA mode, e.g. ``bnb.nf4``.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_query: LoRA on the query projection.
        lora_key: LoRA on the key projection.
        lora_value: LoRA on the value projection.
        lora_projection: LoRA on the attention output projection.
        lora_mlp: LoRA on the MLP.
        lora_head: LoRA on the LM head.
        max_seq_length: tokens per row (default: the manifest's).
        packing: pack examples into rows (as in training).
        micro_batch_size: the micro-batch size to measure first (rows per step).
        activation_checkpointing: recompute activations in backward.
        steps: measured optimizer steps per micro-batch size (after one warm-up step).
        max_micro_batch_size: the largest micro-batch size to try.
        track_memory_gib: override the track's GPU memory (GiB), e.g. to plan for another card.
        out_dir: where the plan's run (W&B + plan.json) goes. Default: ``$ONEGPU_RUNS/finetune-plan``.
        device: ``auto``, ``cpu`` or ``cuda``.
        num_threads: CPU threads for torch.

    Returns:
        The plan (also printed, and written to ``out_dir/plan.json`` and W&B).
    """
    import json

    import lightning as L
    import torch
    from litgpt.tokenizer import Tokenizer

    from finetune import telemetry
    from finetune.lora import _Trainer, _validate, build_model, finetune
    from finetune.packing import batch_to, forward_hidden, loss_sum, use_flex_attention
    from onegpu.budget import TRACKS, format_duration
    from onegpu.tracking import Run

    args = {p.name: p.default for p in inspect.signature(finetune).parameters.values()}
    given = {k: v for k, v in locals().items() if k in args}
    args.update(given)
    args.pop("track_memory_gib", None)
    args.update(global_batch_size=micro_batch_size, lora_dropout=0.0, max_steps=steps)
    if out_dir is None:
        from onegpu.paths import runs_dir

        out_dir = runs_dir() / "finetune-plan"
    args["out_dir"] = out_dir
    cfg = _validate(args)  # same checks as the real run, before loading the model
    if num_threads:
        torch.set_num_threads(num_threads)
    clock = cfg["_clock"]
    track_gib = float(track_memory_gib or TRACKS[track]["memory_gib"])

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

    from finetune.packing import collate, plan_micro_batches

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
