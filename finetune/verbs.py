"""The verbs of the fine-tuning stage as the command line sees them: ``onegpu finetune`` and
``onegpu finetune plan``, and ``onegpu day plan``.

Each is a front: its options (``finetune/options.py``, spelled once) and the hand-off to its engine,
which is imported only when the verb runs, so ``--help`` and a mistyped option never load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onegpu.cli import takes_options
from onegpu.contracts import EngineName, Quantize, Track
from onegpu.finetune.options import FinetuneOptions, PlanArgs


@takes_options(FinetuneOptions)
def finetune(options: FinetuneOptions) -> dict[str, Any]:
    """Fine-tune a litgpt checkpoint with LoRA (or QLoRA) on a data-stage mix; merge at the end.

    Called with the flat option names, e.g. ``finetune("runs/mix", lora_r=16)``.

    Returns:
        The run summary (also in ``out_dir/summary.json``).
    """
    from onegpu.finetune import lora  # the engine: torch, lightning and litgpt load here, not for --help

    return lora.train(options)


@takes_options(PlanArgs, FinetuneOptions)
def plan(plan_args: PlanArgs, options: FinetuneOptions) -> dict[str, Any]:
    """Run a few real steps of a fine-tuning config and say whether and how it fits the track.

    Takes every option of ``onegpu finetune`` (so ``--config`` files are shared); the ones that
    shape memory and speed (model, precision, quantize, optimizer, LoRA layers, max_seq_length,
    packing, micro_batch_size, activation_checkpointing, track, budget) are measured, the rest
    are accepted and ignored.

    Returns:
        The plan (also printed, and written to ``out_dir/plan.json`` and W&B). When the configured
        micro-batch does not fit the track, raises ``DoesNotFit`` (exit 2) after printing and writing it.
    """
    from onegpu.finetune.planning import plan as planner  # the engine: torch and litgpt load here, not for --help

    return planner.plan(plan_args, options)


def day_plan(track: Track = "rtx4090-24gb", model: str = "Mistral-7B-v0.1", data: str | None = None,
             out: Path = Path("runs/day"), final_config: Path | None = None, lora_r: int = 64,
             max_seq_length: int = 2048,
             sweep_share: float = 0.2, trial_minutes: int = 30, setup: str = "30m", memory_check: str = "10m",
             validation: str = "30m", helm: str = "1h", pack: str = "30m", serve_engine: EngineName = "vllm",
             serve_quantize: Quantize | None = None, mfu: float | None = None) -> dict:
    """Lay out the GPU day: set-up, a memory check on the card, a sweep, the final run, validation, HELM and the image.

    Args:
        track: the challenge track: its card's memory and the 24 h clock.
        model: the base model, a litgpt config name (``Mistral-7B-v0.1``, ``Llama-2-7b-hf``,
            ``Llama-2-13b-hf``...): its hub id is litgpt's.
        data: an ``onegpu data build`` dir; the plan then says how many epochs of the mix the final run
            trains. Without it the plan builds ``data/recipes/competition.yaml`` into ``runs/data`` first.
        out: where the plan's files go (the run dirs of the day go under it too).
        final_config: a fine-tuning config for the final run. Default: the shipped preset for this track and
            model, else the planner's recommendation at ``--lora_r`` and ``--max_seq_length``.
        lora_r: LoRA rank of the final run when no config is given (the sweep tries others).
        max_seq_length: tokens per row when no config is given.
        sweep_share: the share of the day the sweep may take (0 skips it).
        trial_minutes: each trial's budget (the model's loading included).
        setup: time for `model prepare` (download + conversion) and `data build`.
        memory_check: time for the measured plan on the card.
        validation: time for `onegpu eval val` on the final model.
        helm: time for `onegpu eval helm` on the final model.
        pack: time for `onegpu submission pack`, the image build and the organizers' probe.
        serve_engine: the engine of the image, which HELM scores too: ``vllm`` (proven on CUDA; the
            set-up makes its env) or ``onegpu``.
        serve_quantize: serve (HELM and the image) with 4-bit/8-bit weights on the onegpu engine, for a
            model whose bf16 weights do not leave room on the card (``eval val`` still loads bf16:
            ``--validation 0m`` skips it).
        mfu: model FLOPs utilization for the forecast (default: measured by benchmarks/gpu_check.py
            when its results exist, else assumed per method).

    Returns:
        The plan (also printed, and written to ``out``). Exits 2 (UserError) after writing it when a
        step does not fit the card with the safe headroom or the steps overrun the day.
    """
    from onegpu.finetune.planning import day  # the engine: litgpt and the analytic planner load here, not for --help

    stage_times = {"set-up": setup, "memory check": memory_check, "validation": validation, "HELM": helm,
                   "pack + image": pack}
    return day.plan_day(track, model, data, Path(out), final_config, lora_r, max_seq_length, sweep_share,
                        trial_minutes, stage_times, serve_engine, serve_quantize, mfu)
