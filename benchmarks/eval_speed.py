"""onegpu's lm-eval wrapper (litgpt model, `eval/lm.py`) vs lm-eval's own HFLM on the same weights.

Same checkpoint (HFLM gets a one-off HF export of it), same tasks, same limits, same batch size;
the two backends alternate round by round in one process so machine load hits both alike. Reports
wall time per task and backend, the speed ratio, and the largest score difference (per-request
log-likelihoods for multiple choice, generated text and metrics for generation).

    python benchmarks/eval_speed.py                       # bundled model, CPU
    python benchmarks/eval_speed.py --checkpoint DIR --device cuda --dtype float32 --limit_mc 200
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def run_task(lm, manager, task: str, limit: int, **kw) -> tuple[float, dict]:
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    result = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager, bootstrap_iters=0,
                             log_samples=True, **kw)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="litgpt checkpoint (default: bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--limit_mc", type=int, default=12, help="instances of the multiple-choice task")
    parser.add_argument("--limit_gen", type=int, default=4, help="instances of the generation task")
    parser.add_argument("--max_gen_toks", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from onegpu.eval.lm import LitGPTLM
    from onegpu.eval.validate import task_manager
    from onegpu.inference import export_hf
    from onegpu.model import prepare

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or prepare()
    tasks = [("onegpu_bigbench_emoji_movie", "multiple choice", dict(limit=args.limit_mc)),
             ("onegpu_truthfulqa_mc1", "multiple choice", dict(limit=args.limit_mc)),
             ("onegpu_gsm8k", "generation", dict(limit=args.limit_gen, num_fewshot=0,
                                                 gen_kwargs={"max_gen_toks": args.max_gen_toks}))]
    manager, _ = task_manager([t for t, _, _ in tasks])
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(checkpoint, Path(tmp) / "hf")
        ours = LitGPTLM(checkpoint, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                        prompt_style="raw")
        models = {  # HFLM with the BOS decision the inference layer made for ours: the same requests
            "onegpu": ours,
            "HFLM": HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                         add_bos_token=ours.add_bos_token),
        }
        times: dict[tuple[str, str], list[float]] = {}
        last: dict[tuple[str, str], dict] = {}
        for round_idx in range(args.rounds):
            order = list(models) if round_idx % 2 == 0 else list(reversed(models))
            for task, _kind, kw in tasks:
                for name in order:
                    seconds, result = run_task(models[name], manager, task, **{k: v for k, v in kw.items()})
                    times.setdefault((task, name), []).append(seconds)
                    last[(task, name)] = result

    print(f"\ncheckpoint: {checkpoint}\ndevice: {args.device} ({args.dtype}), torch threads {args.threads}, "
          f"batch size {args.batch_size}, {args.rounds} alternating rounds (median wall time)\n")
    header = ["task", "kind", "n", "onegpu s", "HFLM s", "speed-up", "max |score diff|", "metric onegpu", "metric HFLM"]
    rows = []
    for task, kind, kw in tasks:
        ours, theirs = last[(task, "onegpu")], last[(task, "HFLM")]
        s_ours, s_theirs = ours["samples"][task], theirs["samples"][task]
        if kind == "multiple choice":
            a = [float(r[0][0]) for s in s_ours for r in s["resps"]]
            b = [float(r[0][0]) for s in s_theirs for r in s["resps"]]
            diff = max(abs(x - y) for x, y in zip(a, b))
            metric = "acc,none"
        else:
            a = [s["resps"][0][0] for s in s_ours]
            b = [s["resps"][0][0] for s in s_theirs]
            metric = "exact_match,flexible-extract"
            diff = max(abs(ours["results"][task][metric] - theirs["results"][task][metric]),
                       0.0 if a == b else float("inf"))  # any differing generation is a failure
        t_ours = statistics.median(times[(task, "onegpu")])
        t_theirs = statistics.median(times[(task, "HFLM")])
        rows.append([task, kind, str(kw["limit"]), f"{t_ours:.2f}", f"{t_theirs:.2f}", f"{t_theirs / t_ours:.2f}x",
                     f"{diff:.2e}", f"{ours['results'][task][metric]:.4f}", f"{theirs['results'][task][metric]:.4f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
