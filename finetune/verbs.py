"""The verbs of the fine-tuning stage as the command line sees them: ``onegpu finetune`` and
``onegpu finetune plan``.

Each is a front: its options (``finetune/options.py``, spelled once) and the hand-off to its engine,
which is imported only when the verb runs, so ``--help`` and a mistyped option never load torch.
"""

from __future__ import annotations

from typing import Any

from onegpu.cli import takes_options
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
