"""Honest throughput numbers: non-padding tokens, LoRA-correct FLOPs, MFU against a real peak, memory.

FLOPs per optimizer step (a multiply-add is 2 FLOPs), counted on *real* tokens only (padding slots
are waste, not work):

* frozen linear weight W (out x in), incl. the LM head and quantized base weights:
  forward ``2*in*out`` + input-gradient ``2*in*out`` per token = ``4*in*out``. A frozen weight
  gets no weight gradient, so the usual ``6*N`` rule over-counts LoRA by ~1.5x.
* trainable LoRA pair A (r x in), B (out x r): ``6*r*(in+out)`` per token (fwd + both grads).
* attention scores and values, per layer and example of length L (causal, so half of L^2):
  forward ``2 * 2 * n_head * head_size * L^2 / 2``, backward twice that -> x3 in total.
  Per example, not per packed row: blocks between packed examples are not useful work.
* the LM head only on the tokens that carry a loss (onegpu computes logits only there);
  embedding lookups, norms and activations are ignored (<1%).

MFU = achieved FLOP/s / peak dense FLOP/s of the device at the training dtype
(:data:`PEAK_FLOPS`; on CPU a fp32 matmul peak measured once per machine and cached,
:func:`cached_cpu_peak`, so MFU compares across the segments of a run and across runs).

``plot_training_curves`` draws the run's ``training_curves.png`` from its ``metrics.jsonl``.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import psutil
import torch
from litgpt.lora import LoRALayer

from onegpu.contracts import atomic_path, atomic_write_json, read_json
from onegpu.paths import cache_dir
from onegpu.tracking import read_metrics

# Dense (no sparsity) tensor-core peaks, FLOP/s, from the vendors' datasheets.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "a100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12},
    "rtx4090": {"bf16": 165.2e12, "fp16": 165.2e12, "fp32": 82.6e12, "tf32": 82.6e12},
    "h100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12},
    "h200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "tf32": 494.7e12},
}
PEAK_CACHE_FILE = "peak_flops.json"  # under onegpu.paths.cache_dir(): one measured peak per machine


def precision_dtype_key(precision: str) -> str:
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return "fp32"


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 10) -> float:
    """Best-of-N fp32 matmul FLOP/s with the current thread count (what 100% MFU means on this CPU)."""
    gen = torch.Generator().manual_seed(0)  # own generator: never shift the training RNG stream
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module knows."""

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cached_cpu_peak(remeasure: bool = False) -> tuple[float, dict[str, Any]]:
    """The CPU's fp32 matmul peak, measured once per machine and cached, so MFU compares across runs.

    Keyed by CPU model, torch version, dtype and thread count; ``remeasure`` measures again and
    replaces the cached value. Returns (FLOP/s, how and when it was measured).
    """

    threads = torch.get_num_threads()
    key = f"{cpu_model()} | torch {torch.__version__} | fp32 | {threads} threads"
    path = cache_dir() / PEAK_CACHE_FILE
    table = read_json(path)
    entry = table.get(key)
    cores, load_now = os.cpu_count() or 1, os.getloadavg()[0]
    # A peak measured while other jobs held the cores reads low (and MFU high): once the machine is
    # quieter than it was then, measure again and keep the higher of the two.
    quieter_now = (isinstance(entry, dict) and entry.get("load_average_1m", 0.0) > cores
                   and load_now < entry["load_average_1m"] - 1)
    measured_now = False
    if remeasure or quieter_now or not isinstance(entry, dict):
        flops = measure_cpu_peak_flops()
        if remeasure or not quieter_now or flops > entry["flops"]:  # else the cached value still stands
            measured_now = True
            entry = {"flops": flops, "method": "best of 10 fp32 1024x1024 matmuls (torch.mm)",
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average_1m": load_now}
            table[key] = entry
            atomic_write_json(path, table)
            if load_now > cores:

                print(f"[onegpu] note: the CPU peak behind MFU was measured under load (1-min load average "
                      f"{load_now:.1f} on {cores} cores), so MFU reads high; it is measured again "
                      "by the first run on a quieter machine (or now: --remeasure_peak true)", file=sys.stderr)
    return float(entry["flops"]), {**entry, "key": key, "cache": str(path), "measured_now": measured_now}


def device_peak_flops(device: torch.device, precision: str, remeasure: bool = False) -> tuple[float, str, dict[str, Any]]:
    """(peak FLOP/s, where it comes from, details for the summary) for the training device and dtype.

    GPUs: the datasheet's dense peak. CPUs: a measured peak, cached per machine (``cached_cpu_peak``).
    """
    key = precision_dtype_key(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for gpu in ("h200", "h100", "a100", "4090"):
            if gpu in name:
                table = PEAK_FLOPS["rtx4090" if gpu == "4090" else gpu]
                if key == "fp32" and torch.backends.cuda.matmul.allow_tf32:
                    key = "tf32"
                return table[key], f"datasheet {gpu} {key} dense", {"method": "datasheet", "device": name, "dtype": key}
        return float("nan"), f"unknown GPU {name!r}: no peak in the table", {"method": "none", "device": name}
    peak, how = cached_cpu_peak(remeasure)
    when = "measured now" if how["measured_now"] else f"cached, measured {how['measured_at']}"
    return peak, f"measured fp32 matmul peak, {torch.get_num_threads()} threads ({when}; {how['cache']})", how


# ------------------------------------------------------------------------------------------ FLOPs
def linear_shapes(model: torch.nn.Module) -> dict[str, Any]:
    """Sizes that the FLOP formula needs, read from a (LoRA) litgpt GPT."""

    frozen_in_out = 0  # sum of in*out over frozen linears in the blocks (per token)
    lora_in_out = 0  # sum of |A| + |B| = r*(in+out) over LoRA pairs (per token)
    for name, module in model.named_modules():
        if name.startswith("lm_head") or ".lm_head" in name:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            in_f, out_f = module.in_features, module.out_features
            frozen_in_out += in_f * out_f
        if isinstance(module, LoRALayer) and getattr(module, "r", 0) > 0 and hasattr(module, "lora_A"):
            # per token, forward FLOPs are 2*(|A| + |B|); also right for the grouped QKV layer
            lora_in_out += module.lora_A.numel() + module.lora_B.numel()
    cfg = model.config
    head = model.lm_head
    head_in_out = (head.in_features * head.out_features) if hasattr(head, "in_features") else cfg.n_embd * cfg.padded_vocab_size
    return {"frozen_in_out": frozen_in_out, "lora_in_out": lora_in_out, "head_in_out": head_in_out,
            "n_layer": cfg.n_layer, "attn_dim": cfg.n_head * cfg.head_size}


def step_flops(shapes: dict[str, Any], n_tokens: int, n_loss_tokens: int, segment_lengths: list[int]) -> float:
    """Useful FLOPs of one forward+backward over the given real tokens (see module docstring)."""
    linear = (4 * shapes["frozen_in_out"] + 6 * shapes["lora_in_out"]) * n_tokens
    head = 4 * shapes["head_in_out"] * n_loss_tokens
    attn_fwd = sum(2 * 2 * shapes["attn_dim"] * L * L / 2 for L in segment_lengths) * shapes["n_layer"]
    return float(linear + head + 3 * attn_fwd)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n = p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# ----------------------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """Lifetime peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_stats(device: torch.device) -> dict[str, float]:
    stats = {"rss_gib": psutil.Process(os.getpid()).memory_info().rss / 2**30,
             "peak_rss_gib": peak_rss_bytes() / 2**30}
    if device.type == "cuda":
        stats["cuda_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
        stats["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        stats["cuda_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return stats


def peak_memory_gib(device: torch.device) -> float:
    """The number to hold against a track's GPU memory: CUDA peak reserved, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return peak_rss_bytes() / 2**30


class Throughput:
    """Counters over a window of steps (since the last log), turned into rates at each log step."""

    def __init__(self, shapes: dict[str, Any], peak_flops: float):
        self.shapes = shapes
        self.peak_flops = peak_flops
        self.reset_window()

    def reset_window(self) -> None:
        self.win_tokens = self.win_examples = self.win_slots = 0
        self.win_flops = 0.0
        self.win_time = 0.0
        self.win_steps = 0

    def add_micro_batch(self, batch: dict[str, Any]) -> None:
        self.win_tokens += batch["n_tokens"]
        self.win_examples += batch["n_examples"]
        self.win_slots += batch["n_slots"]
        self.win_flops += step_flops(self.shapes, batch["n_tokens"], batch["n_loss_tokens"], batch["segment_lengths"])

    def add_step_time(self, seconds: float) -> None:
        self.win_time += seconds
        self.win_steps += 1

    def rates(self) -> dict[str, float]:
        t = max(self.win_time, 1e-9)
        flops_s = self.win_flops / t
        return {
            "tokens_per_s": self.win_tokens / t,  # non-padding tokens only
            "samples_per_s": self.win_examples / t,
            "packing_efficiency": self.win_tokens / max(self.win_slots, 1),  # real tokens / slots computed
            "tflops_per_s": flops_s / 1e12,
            "mfu": flops_s / self.peak_flops if self.peak_flops == self.peak_flops else float("nan"),
            "step_time_s": t / max(self.win_steps, 1),
        }


# ------------------------------------------------------------------------------------------ plot
def plot_training_curves(out_dir: Path) -> Path | None:
    """``training_curves.png``: loss (train and val), non-padding tokens/s and MFU per step."""

    rows = read_metrics(out_dir / "metrics.jsonl")
    train = {r["_step"]: r for r in rows if "loss" in r}  # a resumed run re-logs some steps: last wins
    if not train:
        return None

    matplotlib.use("Agg")

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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
