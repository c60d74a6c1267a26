"""`onegpu eval val`'s lm-eval wrapper (litgpt model, shared-context scoring) vs lm-eval's own HFLM.

Same checkpoint (HFLM gets a one-off HF export of it), same tasks, limits and batch size: the
offline suite (``eval/suites/offline.yaml``, as `onegpu eval val` runs it) and 5-shot MMLU on the
offline MMLU subjects. The two backends alternate task by task and round by round in one process,
so machine load hits both alike; the 1-minute load average is printed beside each row. Reports
the median wall time per task and backend (the whole ``simple_evaluate`` call) and the time spent
in the backend's request methods (scoring and generation, without lm-eval's own dataset, prompt
and metric work, which is the same for both), the speed-ups, and how many per-request results
(log-likelihood and is-greedy for multiple choice, generated text for generation) are identical.

    python benchmarks/eval_speed.py                       # bundled model, CPU fp32
    python benchmarks/eval_speed.py --mmlu_subjects philosophy,anatomy --mmlu_limit 20 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

BACKENDS = ("shared-context", "HFLM")


def time_model_calls(lm) -> list[float]:
    """Wrap the lm-eval request methods of ``lm`` so the seconds spent in them add up in the list
    returned (the rest of a task's wall time is lm-eval's own: dataset, prompts, metrics)."""
    spent = [0.0]
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        def timed(*args, _call=getattr(lm, name), **kwargs):
            start = time.perf_counter()
            try:
                return _call(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        setattr(lm, name, timed)
    return spent


def run_task(lm, spent: list[float], manager, entry: dict) -> tuple[float, float, dict]:
    """(wall seconds, seconds in the model's request methods, lm-eval's result) of one task."""
    from lm_eval import simple_evaluate

    start, spent[0] = time.perf_counter(), 0.0
    result = simple_evaluate(model=lm, tasks=[entry["task"]], limit=entry.get("limit"),
                             num_fewshot=entry.get("num_fewshot"), gen_kwargs=entry.get("gen_kwargs"),
                             task_manager=manager, bootstrap_iters=0, log_samples=True)
    return time.perf_counter() - start, spent[0], result


def responses(result: dict, task: str) -> list:
    return [r[0] if isinstance(r[0], str) else (float(r[0][0]), bool(r[0][1]))
            for s in result["samples"][task] for r in s["resps"]]


def timing(seconds: dict[tuple[str, str], float]) -> list[str]:
    """Wall and in-model seconds of both backends with the speed-ups, as table cells."""
    cells = []
    for kind in ("wall", "model"):
        ours, theirs = seconds[(kind, "shared-context")], seconds[(kind, "HFLM")]
        cells += [f"{ours:.2f}", f"{theirs:.2f}", f"{theirs / ours:.2f}x"]
    return cells


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="litgpt checkpoint (default: bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch_size", type=int, default=8, help="both backends (eval val's default)")
    parser.add_argument("--suite", default="offline", help="the suite whose tasks are timed")
    parser.add_argument("--mmlu_subjects", default="philosophy,high_school_biology",
                        help="offline MMLU subjects scored 5-shot (comma-separated; '' for none)")
    parser.add_argument("--mmlu_limit", type=int, default=12, help="questions per MMLU subject")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from onegpu.eval.lm import LitGPTLM
    from onegpu.eval.harness import task_manager
    from onegpu.eval.validate import load_suite
    from onegpu.inference import export_hf
    from onegpu.model import prepare

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or prepare()
    groups = {f"{args.suite} suite": load_suite(args.suite)["tasks"],
              "5-shot MMLU": [{"task": f"onegpu_mmlu_{s}", "limit": args.mmlu_limit, "num_fewshot": 5}
                              for s in args.mmlu_subjects.split(",") if s]}
    entries = [e for group in groups.values() for e in group]
    manager, _ = task_manager([e["task"] for e in entries])
    times: dict[tuple[str, str], list[float]] = {}
    model_times: dict[tuple[str, str], list[float]] = {}
    loads: dict[str, list[float]] = {}
    last: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(checkpoint, Path(tmp) / "hf")
        ours = LitGPTLM(checkpoint, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                        prompt_style="raw")
        models = {"shared-context": ours,  # HFLM with the BOS decision the inference layer made for ours
                  "HFLM": HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device=args.device,
                               dtype=args.dtype, add_bos_token=ours.add_bos_token)}
        spent = {name: time_model_calls(lm) for name, lm in models.items()}
        for round_idx in range(args.rounds):
            for i, entry in enumerate(entries):
                order = BACKENDS if (round_idx + i) % 2 == 0 else tuple(reversed(BACKENDS))
                for name in order:
                    seconds, in_model, result = run_task(models[name], spent[name], manager, entry)
                    times.setdefault((entry["task"], name), []).append(seconds)
                    model_times.setdefault((entry["task"], name), []).append(in_model)
                    loads.setdefault(entry["task"], []).append(os.getloadavg()[0])
                    last[(entry["task"], name)] = result
                    print(f"[round {round_idx + 1}] {entry['task']} {name}: {seconds:.1f} s "
                          f"({in_model:.1f} s in the model)", flush=True)

    print(f"\ncheckpoint: {checkpoint}\ndevice: {args.device} ({args.dtype}), torch threads {args.threads}, "
          f"batch size {args.batch_size}, {args.rounds} alternating rounds (median wall time), "
          f"CPUs {os.cpu_count()}\n")
    header = ["task", "n-shot", "limit", "shared-context s", "HFLM s", "speed-up", "in model: shared-context s",
              "HFLM s", "speed-up", "identical results", "load avg"]
    rows = []
    for group, group_entries in groups.items():
        total = {(kind, name): 0.0 for kind in ("wall", "model") for name in BACKENDS}
        for entry in group_entries:
            task = entry["task"]
            med = {("wall", name): statistics.median(times[(task, name)]) for name in BACKENDS}
            med.update({("model", name): statistics.median(model_times[(task, name)]) for name in BACKENDS})
            for key, value in med.items():
                total[key] += value
            a, b = (responses(last[(task, name)], task) for name in BACKENDS)
            shots = last[(task, "HFLM")].get("n-shot", {}).get(task, entry.get("num_fewshot"))
            rows.append([task, str(shots), str(entry.get("limit")), *timing(med),
                         f"{sum(x == y for x, y in zip(a, b))}/{len(b)}", f"{statistics.mean(loads[task]):.1f}"])
        if group_entries:
            rows.append([f"**{group} total**", "", "", *(f"**{c}**" for c in timing(total)), "", ""])
    print(table(header, rows))
    print(f"\nscorer: {ours.scorer.stats} (positions: in the requests; positions_computed: run through the model)")


if __name__ == "__main__":
    main()
