"""onegpu finetune vs `litgpt finetune_lora`: non-padding tokens/s, step time, peak RSS, MFU.

Same model (the bundled SmolLM2-135M), same data (Dolly + Self-Instruct seed tasks + LIMA from
../shared/datasets: a Dolly-like mix of short and long examples, alpaca prompt style, loss on
responses in both), same max_seq_length, about the same tokens per optimizer step, fp32, same
thread count; the two tools alternate (A B A B ...) so background load hits both alike. Each run
is a fresh subprocess; peak RSS is that process's ``ru_maxrss`` (from ``os.wait4``).

Throughput is measured from each tool's own per-iteration log (onegpu ``metrics.jsonl``, litgpt's
CSV logger): non-padding tokens / iteration time, skipping the first (warm-up) iterations. MFU is
computed with one formula for both (``finetune.telemetry.step_flops`` averaged over the data) so
its ratio equals the tokens/s ratio.

    python benchmarks/finetune_throughput.py                      # CPU, bundled model
    python benchmarks/finetune_throughput.py --device cuda        # + Llama-2-7B-shaped section (GPU)
"""

from __future__ import annotations

import argparse
import atexit
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def scratch_dir(prefix: str) -> Path:
    """A temp dir removed at exit: each run writes a merged checkpoint, GBs per benchmark."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """(returncode, wall seconds, peak RSS GiB, stderr tail) of one subprocess."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-3000:]
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024 / 2**30, tail


def onegpu_rates(out: Path, skip: int) -> tuple[list[float], list[float]]:
    """Per optimizer step (log_interval 1): real tokens (delta of tokens_seen) and step time."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time_s" in r]
    seen = {r["_step"]: r["tokens_seen"] for r in rows}
    tok = [r["tokens_seen"] - seen.get(r["_step"] - 1, 0) for r in rows]
    return tok[skip:], [r["step_time_s"] for r in rows][skip:]


def litgpt_rates(out: Path, skip: int) -> tuple[list[float], list[float]]:
    files = sorted(out.glob("logs/csv/**/metrics.csv"))
    rows = [r for r in csv.DictReader(open(files[-1])) if r.get("iter_time")]
    tok, times, prev = [], [], 0.0
    for r in rows:
        t = float(r["tokens"])
        tok.append(t - prev)
        prev = t
        times.append(float(r["iter_time"]))
    return tok[skip:], times[skip:]


def cpu_benchmark(args: argparse.Namespace) -> str:
    import torch

    from onegpu.data.schema import render
    from onegpu.finetune import telemetry
    from onegpu.finetune.packing import tokenize_example
    from onegpu.finetune.tiny import make_data_dir
    from onegpu.model import prepare
    from onegpu.paths import shared_datasets_dir

    ckpt = Path(prepare())
    datasets = shared_datasets_dir()
    work = scratch_dir("ft-bench-")
    data = make_data_dir(work / "data", datasets, n_val=4, max_seq_length=args.max_seq_length, prompt_style="alpaca")
    # litgpt's JSON format: the same train rows, rendered by litgpt with the same alpaca style
    train_rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    litgpt_json = work / "litgpt.json"
    litgpt_json.write_text(json.dumps([{"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
                                       for r in train_rows]))

    # useful FLOPs per token of this data, for MFU on both sides (same formula)
    from litgpt.lora import GPT, Config
    from litgpt.tokenizer import Tokenizer

    tok = Tokenizer(ckpt)
    examples = [tokenize_example(tok, *render(r, "alpaca"), max_seq_length=args.max_seq_length) for r in train_rows]
    with torch.device("meta"):
        meta_model = GPT(Config.from_file(ckpt / "model_config.yaml", lora_r=args.lora_r, lora_alpha=2 * args.lora_r))
    shapes = telemetry.linear_shapes(meta_model)
    total_flops = sum(telemetry.step_flops(shapes, len(e), e.n_loss_tokens, [len(e)]) for e in examples)
    flops_per_token = total_flops / sum(len(e) for e in examples)
    torch.set_num_threads(args.threads)
    peak, _ = telemetry.cached_cpu_peak()  # the same peak the trainer divides by
    mean_len = statistics.mean(len(e) for e in examples)

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    # same tokens per optimizer step: litgpt takes `micro` examples per iteration, onegpu one packed
    # row of max_seq_length tokens (~ the same number of real tokens as micro * mean example length)
    onegpu_rows = max(1, round(args.litgpt_micro_batch * mean_len / args.max_seq_length))
    results: dict[str, dict[str, list[float]]] = {"onegpu": {}, "litgpt": {}}
    for rnd in range(args.rounds):
        for tool in ("onegpu", "litgpt"):
            out = work / f"{tool}-{rnd}"
            if tool == "onegpu":
                cmd = [sys.executable, "-m", "onegpu", "finetune", "--data", str(data), "--checkpoint_dir", str(ckpt),
                       "--out_dir", str(out), "--precision", "32-true", "--lora_r", str(args.lora_r),
                       "--lora_alpha", str(2 * args.lora_r), "--max_seq_length", str(args.max_seq_length),
                       "--micro_batch_size", str(onegpu_rows), "--global_batch_size", str(onegpu_rows),
                       "--max_steps", str(args.steps), "--log_interval", "1", "--eval_interval", "0",
                       "--num_samples", "0", "--save_interval", "0", "--num_threads", str(args.threads),
                       "--progress", "false", "--eval_max_examples", "4"]
            else:
                cmd = [sys.executable, "-m", "litgpt", "finetune_lora", str(ckpt), "--data", "JSON",
                       "--data.json_path", str(litgpt_json), "--data.val_split_fraction", "0.02",
                       "--data.mask_prompt", "true", "--data.prompt_style", "alpaca", "--data.num_workers", "0",
                       "--out_dir", str(out), "--precision", "32-true", "--lora_r", str(args.lora_r),
                       "--lora_alpha", str(2 * args.lora_r), "--train.max_seq_length", str(args.max_seq_length),
                       "--train.micro_batch_size", str(args.litgpt_micro_batch),
                       "--train.global_batch_size", str(args.litgpt_micro_batch), "--train.max_steps", str(args.steps),
                       "--train.log_interval", "1", "--eval.interval", "100000", "--eval.initial_validation", "false",
                       "--eval.final_validation", "false", "--logger_name", "csv"]
            rc, wall, rss, tail = run_measured(cmd, env)
            if rc != 0:
                raise SystemExit(f"{tool} failed (rc {rc}):\n{tail}")
            tokens, times = (onegpu_rates if tool == "onegpu" else litgpt_rates)(out, args.skip)
            r = results[tool]
            r.setdefault("tok_s", []).append(sum(tokens) / sum(times))
            r.setdefault("step_s", []).append(statistics.mean(times))
            r.setdefault("tokens_per_step", []).append(statistics.mean(tokens))
            r.setdefault("rss", []).append(rss)
            r.setdefault("wall", []).append(wall)
            print(f"round {rnd} {tool:7s}: {r['tok_s'][-1]:7.1f} tok/s, step {r['step_s'][-1]:6.2f} s, "
                  f"{r['tokens_per_step'][-1]:6.0f} tok/step, peak RSS {rss:.2f} GiB, wall {wall:.0f} s", flush=True)

    def med(tool, key):
        return statistics.median(results[tool][key])

    lines = [
        "| tool | non-padding tok/s | step time (s) | real tokens / step | peak RSS (GiB) | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for tool in ("onegpu", "litgpt"):
        mfu = med(tool, "tok_s") * flops_per_token / peak
        lines.append(f"| {tool} | {med(tool, 'tok_s'):.1f} | {med(tool, 'step_s'):.2f} | {med(tool, 'tokens_per_step'):.0f} | "
                     f"{med(tool, 'rss'):.2f} | {mfu:.1%} |")
    speedup = med("onegpu", "tok_s") / med("litgpt", "tok_s")
    # paired per round (onegpu then litgpt back to back): less exposed to load drift than a ratio of medians
    paired = [a / b for a, b in zip(results["onegpu"]["tok_s"], results["litgpt"]["tok_s"])]
    mem = med("onegpu", "rss") / med("litgpt", "rss")
    lines.append("")
    lines.append("per-round tok/s ratios (onegpu/litgpt): " + ", ".join(f"{x:.2f}x" for x in paired)
                 + f"; median {statistics.median(paired):.2f}x")
    lines.append("")
    lines.append(f"onegpu / litgpt: **{speedup:.2f}x** non-padding tokens/s at **{mem:.2f}x** peak RSS "
                 f"(goal >= 2.0x at <= 1.0x); medians of {args.rounds} alternating rounds, {args.steps} steps each, "
                 f"first {args.skip} skipped. Setup: SmolLM2-135M fp32, LoRA r={args.lora_r} (q,v), max_seq_length "
                 f"{args.max_seq_length}, {len(examples)} examples (mean {mean_len:.0f} tokens), litgpt micro-batch "
                 f"{args.litgpt_micro_batch} examples padded to the longest, onegpu micro-batch {onegpu_rows} packed "
                 f"row(s); {args.threads} threads; MFU vs measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s.")
    table = "\n".join(lines)
    print(table)
    return table


def cuda_benchmark(args: argparse.Namespace) -> str:
    """Llama-2-7B-shaped random-init model: LoRA bf16 and QLoRA nf4, ranks 8/64/256, seq 2048, both tracks."""
    import torch
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    from onegpu.finetune.verbs import plan
    from onegpu.finetune.tiny import make_data_dir
    from onegpu.model import prepare
    from onegpu.paths import shared_datasets_dir

    assert torch.cuda.is_available(), "--device cuda needs a GPU"
    work = scratch_dir("ft-bench-cuda-")
    ckpt = work / "llama2-7b-random"
    ckpt.mkdir()
    config = Config.from_name("Llama-2-7b-hf")
    config.padded_vocab_size = config.vocab_size = Config.from_file(Path(prepare()) / "model_config.yaml").padded_vocab_size
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = GPT(config)
        torch.set_default_dtype(torch.float32)
    torch.save(model.state_dict(), ckpt / "lit_model.pth")
    del model
    torch.cuda.empty_cache()
    save_config(config, ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (ckpt / name).write_bytes((Path(prepare()) / name).read_bytes())
    data = make_data_dir(work / "data", shared_datasets_dir(), max_seq_length=2048)
    lines = ["| method | rank | track | micro-batch | tok/s | MFU | peak reserved (GiB) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for quantize in (None, "bnb.nf4"):
        for rank in (8, 64, 256):
            for track in ("rtx4090-24gb", "a100-40gb"):
                rep = plan(data=str(data), checkpoint_dir=ckpt, track=track, precision="bf16-true", quantize=quantize,
                           lora_r=rank, lora_alpha=2 * rank, lora_key=True, lora_projection=True, lora_mlp=True,
                           max_seq_length=2048, micro_batch_size=1, max_micro_batch_size=8, steps=2,
                           out_dir=work / f"plan-{quantize}-{rank}-{track}")
                m = rep["measured"][0]
                lines.append(f"| {'QLoRA nf4' if quantize else 'LoRA bf16'} | {rank} | {track} | 1 | "
                             f"{m.get('tokens_per_s', float('nan')):.0f} | {m.get('mfu', float('nan')):.1%} | "
                             f"{m.get('peak_memory_gib', float('nan')):.1f} | {rep['verdict']} |")
    table = "\n".join(lines)
    print(table)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per tool")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=1, help="warm-up steps left out of the rates")
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--litgpt_micro_batch", type=int, default=4)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("ONEGPU_CACHE", str(Path.home() / ".cache" / "onegpu"))
    cpu_benchmark(args)
    if args.device == "cuda":
        cuda_benchmark(args)


if __name__ == "__main__":
    main()
