"""Analytic peak memory (finetune/planning/memory.py) vs the measured live-tensor peak of real CPU training steps.

The cases of tests/test_finetune_memory.py (``measure.validation_cases``): a random-init 4-layer
LLaMA-shaped litgpt model and the bundled SmolLM2-135M, LoRA and QLoRA nf4, several sequence
lengths, micro-batches, with and without activation checkpointing, fp32 on CPU. Prints the markdown
table of benchmarks/RESULTS.md. The measurement is ``finetune/planning/measure.py``'s (profiler allocation
events of torch's CPU allocator + the bytes resident before the step), not RSS.

    python benchmarks/memory_model.py
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import torch

from onegpu.finetune.planning.measure import compare, validation_cases
from onegpu.model import prepare


def main() -> None:
    torch.set_num_threads(2)
    print("| model | method | LoRA | micro-batch x seq | checkpointing | analytic MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    with contextlib.redirect_stdout(io.StringIO()):  # prepare prints the checkpoint path
        bundled = prepare()
    with tempfile.TemporaryDirectory() as work:
        for checkpoint, w, shapes in validation_cases(Path(work), bundled):
            for r in compare(checkpoint, w, shapes):
                print(f"| {r['model']} | {r['method']} | {r['lora']} | {r['micro_batch_size']} x {r['max_seq_length']}"
                      f"{'' if r['packing'] else ' (padded)'} | {'on' if r['activation_checkpointing'] else 'off'} | "
                      f"{r['analytic_bytes'] / 2**20:.1f} | {r['measured_bytes'] / 2**20:.1f} | {r['error']:+.1%} |",
                      flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
