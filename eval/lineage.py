"""What an evaluation records about the model it scored, and where its scores go besides its own run.

``eval val`` and ``eval helm`` both record the model artifact they read (the name and digest its
fine-tune logged it under) and copy their scores into the summary of the fine-tune run that made the
checkpoint, so a sweep's table and the W&B dashboard show them per trial.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from onegpu.contracts import model_input
from onegpu.checkpoints import checkpoint_lineage
from onegpu.tracking import Run, training_run_dir, write_back_summary


def record_checkpoint_lineage(run: Run, checkpoint: Path) -> dict:
    """Record the model artifact an eval reads: the name and digest its fine-tune logged it under."""
    model = model_input(checkpoint)
    run.use_input(name=model["artifact"], type="model", digest=model["digest"], path=checkpoint)
    return checkpoint_lineage(checkpoint)


def write_scores_to_training_run(checkpoint: Path, lineage: dict, scores: dict[str, Any]) -> Path | None:
    """Copy an eval's scores (``val/...``, ``test/...``) into the summary of the fine-tune run that made
    the checkpoint, so a sweep's table and the W&B dashboard show them per trial."""
    run_dir = training_run_dir(checkpoint, lineage)
    if run_dir is None:
        return None
    write_back_summary(run_dir, {k: v for k, v in scores.items() if v is not None})
    print(f"[onegpu] scores written to the fine-tune run {run_dir} (summary: {', '.join(sorted(scores))})",
          file=sys.stderr)
    return run_dir
