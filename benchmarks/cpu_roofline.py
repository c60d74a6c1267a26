"""CPU roofline of the LoRA training step, and candidate speed-ups measured against it side by side.

    python benchmarks/cpu_roofline.py [--rounds 3] [--steps 1] [--threads 2]

Prints one table:
(a) useful FLOPs per real token of the bundled SmolLM2-135M LoRA step (telemetry's count);
(b) fp32 matmul throughput at a large square GEMM vs at this model's own GEMM shapes, forward +
    input-gradient as LoRA trains them (frozen base: no weight gradient), LM head on response tokens;
(c) the trainer's real step: forward_hidden + loss_sum + backward on one packed 512-token row;
(d) candidates, each alternated with the baseline in the same process (ratios, not absolute speed:
    the machine is shared), with the 1-minute load average beside every row.
From (a)-(c): the attainable tok/s if every FLOP ran at the model's own GEMM-shape throughput, and
what 2x litgpt's quiet-machine tok/s would need as a fraction of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# litgpt's quiet-machine numbers from benchmarks/RESULTS.md (finetune_throughput.py, 2 threads)
LITGPT_TOK_S, QUIET_PEAK = 237.3, 324e9


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rate(m: int, k: int, n: int, repeats: int = 5, backward: bool = True) -> tuple[float, float]:
    """(seconds, FLOPs) of x(m,k) @ W(k,n) forward plus the input gradient dy(m,n) @ W^T."""
    gen = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen), torch.randn(m, n, generator=gen)

    def run():
        torch.mm(x, w)
        if backward:
            torch.mm(dy, w.t())

    return best_time(run, repeats), (4 if backward else 2) * m * k * n


def build_model(ckpt: Path, lora_r: int):
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable

    cfg = Config.from_file(ckpt / "model_config.yaml", lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                           lora_query=True, lora_value=True)
    model = GPT(cfg)
    state = torch.load(ckpt / "lit_model.pth", map_location="cpu", mmap=True, weights_only=True)
    model.load_state_dict(state, strict=False)
    mark_only_lora_as_trainable(model)
    return model.train()


def packed_row(ckpt: Path, max_seq_length: int) -> dict:
    """The first packed row the trainer would see on the benchmark's data (alpaca style, responses only)."""
    from litgpt.tokenizer import Tokenizer
    from onegpu.data.schema import render
    from onegpu.finetune.packing import MicroBatches, tokenize_example
    from onegpu.finetune.tiny import shared_rows

    from onegpu.paths import shared_datasets_dir

    tok = Tokenizer(ckpt)
    rows = shared_rows(shared_datasets_dir())
    examples = [tokenize_example(tok, *render(r, "alpaca"), max_seq_length) for r in rows]
    return MicroBatches(examples, max_seq_length, 1, packing=True, seed=0)[0]


def chunked_loss_sum(model, hidden, labels, chunk: int = 128):
    """Candidate: LM head + cross-entropy in chunks of response tokens, each recomputed in backward."""
    from onegpu.finetune.packing import IGNORE_INDEX

    keep = labels != IGNORE_INDEX
    h, y = hidden[keep], labels[keep]

    def part(hc, yc):
        return torch.nn.functional.cross_entropy(model.lm_head(hc).float(), yc, reduction="sum")

    total = sum(torch.utils.checkpoint.checkpoint(part, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
                for i in range(0, h.size(0), chunk))
    return total, int(keep.sum())


def make_step(model, batch, *, forward=None, loss=None):
    from onegpu.finetune.packing import forward_hidden, loss_sum

    forward = forward or forward_hidden
    loss = loss or loss_sum

    def step():
        hidden = forward(model, batch)
        value, n = loss(model, hidden, batch["labels"])
        (value / n).backward()
        model.zero_grad(set_to_none=True)

    return step


def alternate(name: str, base, cand, rounds: int, steps: int, cand_threads: int | None = None,
              base_threads: int | None = None) -> list[float]:
    """Per-round speed ratio candidate/baseline (> 1 = candidate faster), alternating in one process."""
    ratios = []
    for rnd in range(rounds):
        times = {}
        for side, fn, threads in (("base", base, base_threads), ("cand", cand, cand_threads)):
            if threads:
                torch.set_num_threads(threads)
            if rnd == 0:
                fn()  # warm-up (and compile)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[side] = (time.perf_counter() - t0) / steps
        ratios.append(times["base"] / times["cand"])
        print(f"  {name:34s} round {rnd}: base {times['base']:6.2f} s/step, candidate {times['cand']:6.2f} s/step, "
              f"ratio {ratios[-1]:.3f}x, load {load()}", flush=True)
    return ratios


class Rows(list):
    """Table rows, also printed as they come (a run takes minutes on a loaded machine)."""

    def append(self, row: tuple[str, str, str]) -> None:
        print("  " + " | ".join(row), flush=True)
        super().append(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora_r", type=int, default=8)
    ap.add_argument("--max_seq_length", type=int, default=512)
    ap.add_argument("--candidates", default="compile_block,chunked_loss,threads_1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from onegpu.finetune import telemetry

    from onegpu.model import prepare

    ckpt = Path(prepare())
    model = build_model(ckpt, args.lora_r)
    batch = packed_row(ckpt, args.max_seq_length)
    cfg = model.config
    shapes = telemetry.linear_shapes(model)
    T, n_loss = batch["n_tokens"], batch["n_loss_tokens"]
    flops = telemetry.step_flops(shapes, T, n_loss, batch["segment_lengths"])
    rows = Rows()
    rows.append(("(a) useful FLOPs / real token (telemetry)", f"{flops / T / 1e6:.1f} MFLOP",
                 f"row: {T} real tokens, {n_loss} response tokens, {len(batch['segment_lengths'])} examples"))

    # (b) GEMM throughput: large square vs the model's own shapes at this row's token count
    t_sq, f_sq = gemm_rate(1024, 1024, 1024, backward=False)
    square = f_sq / t_sq
    rows.append(("(b) fp32 GEMM 1024^3 (telemetry's peak)", f"{square / 1e9:.0f} GFLOP/s", f"load {load()}"))
    qkv_out = (cfg.n_head + 2 * cfg.n_query_groups) * cfg.head_size
    layer_gemms = {"qkv": (T, cfg.n_embd, qkv_out), "proj": (T, cfg.n_head * cfg.head_size, cfg.n_embd),
                   "fc_1": (T, cfg.n_embd, cfg.intermediate_size), "fc_2": (T, cfg.n_embd, cfg.intermediate_size),
                   "mlp.proj": (T, cfg.intermediate_size, cfg.n_embd)}
    model_t = model_f = 0.0
    for name, (m, k, n) in layer_gemms.items():
        t, f = gemm_rate(m, k, n)
        model_t += cfg.n_layer * t
        model_f += cfg.n_layer * f
        rows.append((f"(b) GEMM {name} {m}x{k}x{n} fwd+dgrad", f"{f / t / 1e9:.0f} GFLOP/s", f"x{cfg.n_layer} layers, load {load()}"))
    t, f = gemm_rate(n_loss, cfg.n_embd, cfg.padded_vocab_size, repeats=3)
    model_t, model_f = model_t + t, model_f + f
    rows.append((f"(b) GEMM lm_head {n_loss}x{cfg.n_embd}x{cfg.padded_vocab_size} fwd+dgrad",
                 f"{f / t / 1e9:.0f} GFLOP/s", f"load {load()}"))
    shape_peak = model_f / model_t
    rows.append(("(b) model's GEMM mix (time-weighted)", f"{shape_peak / 1e9:.0f} GFLOP/s",
                 f"{shape_peak / square:.0%} of the square GEMM; covers {model_f / flops:.0%} of (a)"))

    # (c) the trainer's real step
    base = make_step(model, batch)
    t_step = best_time(base, args.steps)
    rows.append(("(c) real step: forward_hidden+loss_sum+backward", f"{t_step:.2f} s/step",
                 (f"{T / t_step:.0f} tok/s, {flops / t_step / 1e9:.0f} GFLOP/s = {flops / t_step / shape_peak:.0%} of "
                 f"the GEMM mix, {flops / t_step / square:.0%} of square; GEMMs alone {model_t:.2f} s, load {load()}")))

    # roofline: every FLOP at the model's own GEMM-shape throughput
    attainable = shape_peak / (flops / T)
    rows.append(("roofline: tok/s at the GEMM-mix rate", f"{attainable:.0f} tok/s",
                 f"now: {T / t_step:.0f} tok/s ({T / t_step / attainable:.0%} of it)"))
    need = 2 * LITGPT_TOK_S * flops / T
    rows.append(("2x litgpt (quiet: 474.6 tok/s at 324 GFLOP/s)", f"{need / 1e9:.0f} GFLOP/s",
                 (f"= {need / QUIET_PEAK:.0%} of the quiet square peak, "
                 f"{need / (QUIET_PEAK * shape_peak / square):.0%} of the quiet GEMM-mix rate")))

    # (d) candidates, alternated with the baseline
    print(f"candidates ({args.rounds} rounds x {args.steps} steps each side):", flush=True)
    from onegpu.finetune.packing import forward_hidden

    for name in [c for c in args.candidates.split(",") if c]:
        kwargs = {}
        if name == "compile_block":
            compiled = build_model(ckpt, args.lora_r)
            compiled.load_state_dict(model.state_dict())
            for block in compiled.transformer.h:
                block.compile()
            cand = make_step(compiled, batch)
        elif name == "compile_forward":
            cand = make_step(model, batch, forward=torch.compile(forward_hidden, dynamic=False))
        elif name == "chunked_loss":
            cand = make_step(model, batch, loss=chunked_loss_sum)
        elif name == "threads_1":
            cand, kwargs = base, {"cand_threads": 1, "base_threads": args.threads}
        else:
            raise SystemExit(f"unknown candidate {name!r}")
        try:
            ratios = alternate(name, base, cand, args.rounds, args.steps, **kwargs)
        except RuntimeError as exc:  # (dynamo and inductor errors are RuntimeErrors) a candidate that does not run on this CPU is a result, not a crash
            rows.append((f"(d) {name}", "failed", f"{type(exc).__name__}: {str(exc)[:80]}"))
            continue
        finally:
            torch.set_num_threads(args.threads)
        pays = min(ratios) >= 1.05
        rows.append((f"(d) {name} / baseline", f"{statistics.median(ratios):.3f}x",
                     f"rounds {', '.join(f'{r:.2f}' for r in ratios)}; {'PAYS' if pays else 'does not pay'}, load {load()}"))

    print(f"\ntorch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| measure | value | note |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
