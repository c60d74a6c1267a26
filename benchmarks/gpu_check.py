"""One prepared GPU check of every GPU path of the kit, in one command (<= 8 minutes on one H200).

Sections (each one's failure is recorded and the next one still runs):

1. **attention**: packed FlexAttention vs SDPA (boolean block-diagonal mask) vs each example alone:
   per-example mean losses on the same packed rows, bf16 on CUDA; the max abs differences.
2. **train**: a Llama-2-7B-shaped model (litgpt ``Config.from_name``, random init), LoRA bf16 and
   QLoRA nf4-dq, r=64 on every projection, seq 2048: onegpu's packed step (non-padding tok/s, MFU,
   peak memory) beside litgpt's own LoRA fine-tune step (``model(input_ids, lm_head_chunk_size=128)``
   + ``chunked_cross_entropy``, one padded example per row) on the same examples; and the analytic
   peak of ``finetune/planning/memory.py`` for the same step.
3. **tracks**: each method's config shape run under ``torch.cuda.set_per_process_memory_fraction``
   set to each track's card (less the measured CUDA context): fits or OOM, beside the analytic verdict.
4. **server**: ``submission/engine.py``'s ``Engine`` on the 7B shape (random weights, the bundled
   tokenizer), HELM-shaped requests (the open-eval adapters' mix of max_new_tokens) at concurrency
   1 and 16: req/s, p50/p95 latency, batching speed-up.

It writes a results JSON (``--out``) that ``onegpu finetune plan --analytic`` reads for its MFU when
it was a CUDA run (``benchmarks/gpu_check_results.json``). ``--tiny`` runs the same code on a
2-layer model on the CPU in a minute (CI runs it): FlexAttention and the memory cap are then
skipped, and the planner ignores such results.

On the GPU machine (torch, lightning, transformers there; litgpt, bitsandbytes, jsonargparse,
datasketch not, and no network): ``make gpu-wheels`` here puts the wheels and the bundled tokenizer
in ``.whl/``, and ``benchmarks/gpu_check.sh`` installs them offline and runs this script:

    bash benchmarks/gpu_check.sh --out "$OUT/gpu_check_results.json"      # carry: .whl
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from onegpu.contracts import TRACKS, atomic_write_json
from onegpu.finetune.planning.memory import GIB, Workload, estimate_memory

# (kind, share, prompt tokens, max_new_tokens) of the open-eval adapters (benchmarks/server_throughput.py's MIX)
HELM_MIX = [("mmlu", 0.625, 600, 5), ("gsm8k", 0.125, 900, 400), ("cnn_dm", 0.125, 1000, 128),
            ("big_bench", 0.125, 300, 64)]
FULL = {"model": "Llama-2-7b-hf", "seq": 2048, "lora_r": 64, "train_steps": 4, "requests": 32, "token_scale": 0.25,
        "concurrency": (1, 16)}
TINY = {"model": None, "seq": 128, "lora_r": 8, "train_steps": 2, "requests": 8, "token_scale": 0.05,
        "concurrency": (1, 4)}
METHODS = {  # the finetune/configs/*7b* settings: LoRA bf16 (A100 config), QLoRA nf4-dq (4090 config)
    "lora": {"quantize": None, "optimizer": "adamw", "micro_batch_size": 1, "activation_checkpointing": False,
             "track": "a100-40gb", "config_micro_batch": 4},
    "qlora-4bit": {"quantize": "bnb.nf4-dq", "optimizer": "paged_adamw", "micro_batch_size": 2,
                   "activation_checkpointing": True, "track": "rtx4090-24gb", "config_micro_batch": 2},
}


def model_config(tiny: bool, vocab: int | None = None) -> Any:
    from litgpt import Config

    if not tiny:
        config = Config.from_name(FULL["model"])
        if vocab:
            config.vocab_size = config.padded_vocab_size = vocab
        return config
    vocab = vocab or 512
    return Config(name="tiny-llama", block_size=1024, vocab_size=vocab, padded_vocab_size=vocab, n_layer=2, n_head=4,
                  n_query_groups=2, n_embd=64, head_size=16, rotary_percentage=1.0, parallel_residual=False, bias=False,
                  norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128, rope_base=10000)


def random_checkpoint(out: Path, config: Any, weights: bool, dtype: torch.dtype) -> Path:
    """A checkpoint dir for ``lora.build_model``: with ``weights=False`` an empty state dict (random init stays)."""
    from litgpt import GPT
    from litgpt.utils import save_config

    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out)
    state = {}
    if weights:
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            state = {k: v.cpu() for k, v in GPT(config).state_dict().items()}
            torch.set_default_dtype(previous)
    torch.save(state, out / "lit_model.pth")
    return out


def example_lengths(n: int, seq: int, seed: int = 0) -> list[int]:
    """Instruction-data-like lengths: log-normal around seq/6, between 16 and seq."""
    rng = random.Random(seed)
    return [max(16, min(seq, int(rng.lognormvariate(math.log(seq / 6), 0.8)))) for _ in range(n)]


def make_examples(lengths: list[int], vocab: int, seed: int = 0) -> list[Any]:
    from onegpu.finetune.packing import IGNORE_INDEX, Example

    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(vocab) for _ in range(n)]
        prompt = n // 3
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


# ------------------------------------------------------------------------------------ 1. attention
def attention_check(tiny: bool, device: torch.device) -> dict[str, Any]:
    """Per-example loss: FlexAttention (CUDA) and SDPA with the block mask vs each example alone."""
    from litgpt import GPT

    from onegpu.finetune.packing import (IGNORE_INDEX, collate, forward_hidden, per_token_losses,
                                         use_flex_attention)

    config = model_config(True) if tiny else replace(model_config(False), n_layer=2)  # 7B-wide, 2 layers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config).to(dtype).eval()
    seq = 256 if tiny else 2048
    examples = make_examples(example_lengths(12, seq // 3, seed=1), config.vocab_size, seed=1)
    rows, row, used = [], [], 0
    for i, ex in enumerate(examples):
        if used + len(ex) > seq:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += len(ex)
    rows.append(row)

    def per_example(batch: dict[str, Any], flex: bool) -> list[float]:
        b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        with torch.no_grad():
            losses = per_token_losses(model, forward_hidden(model, b, flex=flex), b["labels"]).float()
        out = []
        for r in range(losses.size(0)):
            for s in range(int(b["segment_ids"][r].max()) + 1):
                keep = (b["segment_ids"][r] == s) & (b["labels"][r] != IGNORE_INDEX)
                out.append(float(losses[r][keep].sum() / keep.sum().clamp(min=1)))
        return out

    packed = collate(examples, rows)
    alone = [per_example(collate(examples, [[i]]), False)[0] for r in rows for i in r]
    sdpa = per_example(packed, False)
    result = {"dtype": str(dtype), "examples": len(examples), "rows": len(rows),
              "sdpa_vs_alone_max_abs": max(abs(a - b) for a, b in zip(sdpa, alone))}
    if device.type == "cuda" and use_flex_attention(model):
        flex = per_example(packed, True)
        result["flex_vs_sdpa_max_abs"] = max(abs(a - b) for a, b in zip(flex, sdpa))
        result["flex_vs_alone_max_abs"] = max(abs(a - b) for a, b in zip(flex, alone))
    else:
        result["flex"] = "skipped: FlexAttention runs on CUDA only"
    return result


# ----------------------------------------------------------------------------------------- 2. train
def workload(method: str, tiny: bool, device: torch.device) -> Workload:
    m = METHODS[method]
    setup = TINY if tiny else FULL
    return Workload(precision="bf16-true" if device.type == "cuda" else "32-true", quantize=m["quantize"],
                    lora_r=setup["lora_r"], lora_dropout=0.05, lora_key=True, lora_projection=True, lora_mlp=True,
                    max_seq_length=setup["seq"], micro_batch_size=m["micro_batch_size"],
                    activation_checkpointing=m["activation_checkpointing"],
                    optimizer=m["optimizer"] if device.type == "cuda" else "adamw",  # paged states need CUDA
                    device=device.type)


def litgpt_step(harness: Any, batch: dict[str, Any]) -> None:
    """litgpt finetune/lora.py's step: full forward with chunked LM head, chunked cross-entropy."""
    from litgpt.utils import chunked_cross_entropy

    input_ids = batch["input_ids"].to(harness.fabric.device)
    targets = batch["labels"].to(harness.fabric.device)  # collate already shifted: labels[t] = target of t
    logits = harness.model(input_ids, lm_head_chunk_size=128)
    loss = chunked_cross_entropy(logits, targets)
    harness.fabric.backward(loss)
    harness.optimizer.step()
    harness.optimizer.zero_grad()


def timed(harness: Any, batches: list[dict[str, Any]], step: Any) -> dict[str, float]:
    from onegpu.finetune import telemetry

    peak_flops, _, _ = telemetry.device_peak_flops(harness.fabric.device, harness.w.precision)
    meter = telemetry.Throughput(telemetry.linear_shapes(harness.inner), peak_flops)
    step(batches[0])  # warm-up (compiles FlexAttention on CUDA)
    for b in batches[1:]:
        if harness.fabric.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(b)
        if harness.fabric.device.type == "cuda":
            torch.cuda.synchronize()
        meter.add_micro_batch(b)
        meter.add_step_time(time.perf_counter() - t0)
    return meter.rates()


def train_check(method: str, tiny: bool, device: torch.device, work: Path) -> tuple[dict[str, Any], Any]:
    from onegpu.finetune.planning.measure import StepHarness
    from onegpu.finetune.packing import collate, plan_rows

    w = workload(method, tiny, device)
    config = model_config(tiny)
    ckpt = random_checkpoint(work / f"ckpt-{method}", config, weights=False, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    harness = StepHarness(ckpt, w)
    build_s = time.perf_counter() - t0
    setup = TINY if tiny else FULL
    mb, steps = w.micro_batch_size, setup["train_steps"] + 1
    examples = make_examples(example_lengths(400, w.max_seq_length), config.vocab_size)
    pad = 8 if device.type == "cuda" else 1
    rows = plan_rows([len(e) for e in examples], w.max_seq_length, True, seed=0, epoch=0)
    packed = [collate(examples, rows[i * mb:(i + 1) * mb], pad_multiple=pad) for i in range(steps)]
    used = [i for r in rows[:steps * mb] for i in r]  # the same examples, one per padded row, for litgpt
    padded = [collate(examples, [[i] for i in used[k:k + mb]], pad_multiple=pad) for k in range(0, len(used), mb)][:steps]
    onegpu = timed(harness, packed, lambda b: harness.step(b, w.activation_checkpointing))
    litgpt = timed(harness, padded, lambda b: litgpt_step(harness, b))
    memory = harness.measure(w)
    analytic = estimate_memory(config, replace(w, loss_token_fraction=memory.loss_tokens / memory.tokens))
    row = {"method": method, "name": f"{'QLoRA ' + w.quantize if w.quantize else 'LoRA'} r={w.lora_r} "
                                     f"mb={mb} seq={w.max_seq_length}", "build_s": build_s,
           "tokens_per_s": onegpu["tokens_per_s"], "mfu": onegpu["mfu"],
           "packing_efficiency": onegpu["packing_efficiency"], "litgpt_tokens_per_s": litgpt["tokens_per_s"],
           "litgpt_mfu": litgpt["mfu"], "speedup_vs_litgpt": onegpu["tokens_per_s"] / litgpt["tokens_per_s"],
           "peak_allocated_gib": memory.peak_bytes / GIB,
           "peak_reserved_gib": (memory.reserved_bytes or 0) / GIB, "analytic_tensor_peak_gib": analytic.tensor_peak / GIB,
           "analytic_error": analytic.tensor_peak / memory.peak_bytes - 1}
    if device.type != "cuda":  # the CPU "MFU" is against a measured fp32 peak: not a GPU number
        row["mfu_note"] = "CPU (--tiny): not a GPU MFU"
    return row, harness


# ---------------------------------------------------------------------------------------- 3. tracks
def track_check(method: str, harness: Any, tiny: bool, device: torch.device) -> list[dict[str, Any]]:
    """The method's config shape under each track's memory cap: fits or OOM, beside the analytic verdict."""
    config = harness.inner.config
    w = replace(harness.w, micro_batch_size=METHODS[method]["config_micro_batch"])
    rows = []
    for name, spec in TRACKS.items():
        estimate = estimate_memory(config, replace(w, device="cuda"))
        row = {"method": method, "track": name, "micro_batch_size": w.micro_batch_size,
               "analytic_fits": estimate.device_peak <= spec.memory_gib * GIB,
               "analytic_device_peak_gib": estimate.device_peak / GIB}
        if device.type != "cuda":
            row["measured"] = "skipped: the memory cap needs CUDA"
            rows.append(row)
            continue
        free, total = torch.cuda.mem_get_info(device)
        context = total - free - torch.cuda.memory_reserved(device)  # CUDA context + kernels, outside torch
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(max(0.01, (spec.memory_gib * GIB - context) / total), device)
        try:
            m = harness.measure(w)
            row.update(measured_fits=True, peak_allocated_gib=m.peak_bytes / GIB,
                       peak_reserved_gib=(m.reserved_bytes or 0) / GIB)
        except torch.cuda.OutOfMemoryError:
            row.update(measured_fits=False)
        finally:
            harness.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        row["cuda_context_gib"] = context / GIB
        row["agree"] = row["measured_fits"] == row["analytic_fits"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- 4. server
def server_check(tiny: bool, device: torch.device, tokenizer_dir: Path, work: Path) -> dict[str, Any]:
    import shutil

    from onegpu.submission.engine import Engine, GenRequest

    from tokenizers import Tokenizer as HFTokenizer

    vocab = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    config = model_config(tiny, vocab=math.ceil(vocab / 512) * 512)
    ckpt = random_checkpoint(work / "server-ckpt", config, weights=True,
                             dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, ckpt / name)
    setup = TINY if tiny else FULL
    max_seq = 1024 if tiny else 2048
    engine = Engine(ckpt, device=device.type, max_batch_size=max(setup["concurrency"]), max_seq_length=max_seq,
                    prompt_style="raw")
    rng = random.Random(0)
    requests = []
    for kind, share, prompt, new in HELM_MIX:
        for _ in range(max(1, round(share * setup["requests"]))):
            n = min(max_seq // 2, int(prompt * (setup["token_scale"] if tiny else 1)))
            requests.append((kind, [rng.randrange(100, vocab) for _ in range(n)],
                             max(1, int(new * setup["token_scale"] * (1 if tiny else 4)))))
    levels = {}
    try:
        for concurrency in setup["concurrency"]:
            levels[concurrency] = run_level(engine, requests, concurrency, GenRequest)
    finally:
        engine.shutdown()
    one, many = levels[setup["concurrency"][0]], levels[setup["concurrency"][-1]]
    return {"model": config.name, "requests": len(requests), "levels": levels,
            "batching_speedup": many["req_per_s"] / one["req_per_s"]}


def run_level(engine: Any, requests: list, concurrency: int, GenRequest: Any) -> dict[str, Any]:
    latencies: list[float] = []
    lock = threading.Lock()

    def one(req: tuple) -> None:
        _kind, ids, new = req
        t0 = time.perf_counter()
        engine.submit(GenRequest(prompt_ids=ids, max_new_tokens=new, temperature=0.0)).result()
        with lock:
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, requests))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"concurrency": concurrency, "req_per_s": len(requests) / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


# ------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("gpu_check: no CUDA GPU visible; use --tiny for the CPU mode")
    results: dict[str, Any] = {
        "mode": "tiny" if args.tiny else "full", "cuda": device.type == "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "train": [], "tracks": [], "errors": []}
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def section(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            return fn()
        except Exception as err:  # record and go on: one broken path must not hide the others
            results["errors"].append({"section": name, "error": repr(err), "traceback": traceback.format_exc()})
            return None
        finally:
            results.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
            atomic_write_json(out, results)

    results["attention"] = section("attention", lambda: attention_check(args.tiny, device))
    for method in METHODS:
        pair = section(f"train {method}", lambda: train_check(method, args.tiny, device, work))
        if pair is None:
            continue
        row, harness = pair
        results["train"].append(row)
        results["tracks"] += section(f"tracks {method}", lambda: track_check(method, harness, args.tiny, device)) or []
        del harness
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.tokenizer_dir:
        results["server"] = section("server", lambda: server_check(args.tiny, device, Path(args.tokenizer_dir), work))
    atomic_write_json(out, results)
    return results


def print_table(r: dict[str, Any]) -> None:
    print(f"gpu_check ({r['mode']}) on {r['device']}, torch {r['torch']}, {r['date']}")
    a = r.get("attention") or {}
    print(f"  attention: SDPA packed vs alone max |d loss| {a.get('sdpa_vs_alone_max_abs', float('nan')):.2e}; "
          + (f"Flex vs SDPA {a['flex_vs_sdpa_max_abs']:.2e}" if "flex_vs_sdpa_max_abs" in a else a.get("flex", "")))
    print("  | method | onegpu tok/s | MFU | litgpt tok/s | speed-up | peak alloc GiB | analytic GiB | error |")
    for t in r["train"]:
        print(f"  | {t['name']} | {t['tokens_per_s']:.0f} | {t['mfu']:.1%} | {t['litgpt_tokens_per_s']:.0f} | "
              f"{t['speedup_vs_litgpt']:.2f}x | {t['peak_allocated_gib']:.3f} | {t['analytic_tensor_peak_gib']:.3f} | "
              f"{t['analytic_error']:+.1%} |")
    for t in r["tracks"]:
        measured = t.get("measured") or ("fits" if t.get("measured_fits") else "OOM")
        print(f"  track {t['track']}: {t['method']} mb={t['micro_batch_size']}: measured {measured}, analytic "
              f"{'fits' if t['analytic_fits'] else 'does not fit'} ({t['analytic_device_peak_gib']:.1f} GiB)")
    s = r.get("server")
    if s:
        for c, lvl in s["levels"].items():
            print(f"  server concurrency {c}: {lvl['req_per_s']:.2f} req/s, p50 {lvl['p50_s']:.2f}s, p95 {lvl['p95_s']:.2f}s")
        print(f"  batching speed-up: {s['batching_speedup']:.2f}x")
    for e in r["errors"]:
        print(f"  ERROR in {e['section']}: {e['error']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer model on the CPU (CI)")
    p.add_argument("--out", default="benchmarks/gpu_check_results.json", help="results JSON")
    p.add_argument("--tokenizer_dir", default=None, help="dir with tokenizer.json for the server section")
    p.add_argument("--num_threads", type=int, default=None)
    args = p.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    results = run(args)
    print_table(results)
    sys.exit(1 if results["errors"] else 0)


if __name__ == "__main__":
    main()
