"""Raw vs templated prompts, and each post-processing rule, on the offline HELM conf and lm-eval suite.

The model is a fine-tune of the bundled SmolLM2-135M (default: /tmp/qs/finetune/final, i.e.
`onegpu finetune finetune/configs/cpu-quickstart.yaml` on data/recipes/quickstart.yaml), which
records its training template (prompt_style.yaml). Everything runs on CPU in a few minutes, so the
instance counts are tiny (HELM offline conf: 2 synthetic scenarios x --helm_instances; lm-eval
offline suite at its own limits, gsm8k at --gen_limit): read the table as "what changes", not as a measurement.

* HELM: `onegpu eval helm --conf offline` with `--serve_args [--prompt_style raw|auto, --postprocess RULE]`,
  one full server + helm-run per row (the server is where the template and rules live).
* lm-eval: the offline suite through eval/lm.py's LitGPTLM. Multiple-choice tasks are scored by
  log-likelihood on raw contexts (lm-eval's norm), so template and rules do not change them;
  generation tasks are run once per prompt style and each rule is applied to those same greedy
  generations with submission.postprocess (the server's own rule code).

    python benchmarks/prompt_format.py                        # ~5-10 min on 2 shared CPU cores
    python benchmarks/prompt_format.py --skip_helm            # lm-eval part only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RULES = ("drop_answer_prefix", "mc_letter", "cut_blank_line", "strip")


def lm_eval_rows(checkpoint: Path, gen_limit: int, threads: int) -> list[dict]:
    import torch
    from lm_eval import simple_evaluate

    from onegpu.eval.lm import LitGPTLM
    from onegpu.eval.harness import primary_metric, task_manager
    from onegpu.eval.validate import load_suite
    from onegpu.submission.postprocess import kept_span

    torch.set_num_threads(threads)
    suite = load_suite("offline")["tasks"]
    manager, _ = task_manager([t["task"] for t in suite])

    class RuledLM(LitGPTLM):
        """LitGPTLM whose greedy generations are cached per context and narrowed by the server's rules."""

        rules: list[str] = []
        generations: dict = {}

        def generate_until(self, requests, disable_tqdm: bool = False):
            todo = [r for r in requests if (r.args[0], repr(r.args[1])) not in self.generations]
            for req, text in zip(todo, super().generate_until(todo, disable_tqdm) if todo else []):
                self.generations[(req.args[0], repr(req.args[1]))] = text
            out = []
            for req in requests:
                text = self.generations[(req.args[0], repr(req.args[1]))]
                start, end = kept_span(text, self.rules, req.args[0])
                out.append(text[start:end])
                self.changed += out[-1] != text
                self.generated += 1
            return out

    rows, mc_scores = [], {}
    for style in ("raw", "auto"):
        lm = RuledLM(str(checkpoint), batch_size=4, device="cpu", dtype="float32", prompt_style=style)
        lm.generations = {}
        for rules in ([], *[[r] for r in RULES]):
            lm.rules, lm.changed, lm.generated = rules, 0, 0
            row = {"prompt_style": "raw" if style == "raw" else "templated", "postprocess": ",".join(rules) or "none"}
            start = time.perf_counter()
            for entry in suite:
                task = entry["task"]
                if task in mc_scores:  # log-likelihood on raw contexts: style/rule-independent
                    row[task] = mc_scores[task]
                    continue
                limit = gen_limit if "gen_kwargs" in entry else entry.get("limit")
                result = simple_evaluate(model=lm, tasks=[task], num_fewshot=entry.get("num_fewshot"), limit=limit,
                                         gen_kwargs=entry.get("gen_kwargs"), task_manager=manager, bootstrap_iters=0,
                                         random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234,
                                         fewshot_random_seed=1234)
                metrics = {k: v for k, v in result["results"][task].items() if k != "alias"}
                row[task] = primary_metric(metrics)[1]
                if result["configs"][task]["output_type"] != "generate_until":
                    mc_scores[task] = row[task]
            row["generations changed"] = f"{lm.changed}/{lm.generated}"
            row["wall_s"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def helm_rows(checkpoint: Path, out: Path, instances: int) -> list[dict]:
    from onegpu.eval.helm import helm

    variants = [("raw", None), ("auto", None), *[("auto", r) for r in RULES]]
    rows = []
    for style, rule in variants:
        args = ["--prompt_style", style, "--num_threads", "1", "--max_batch_size", "4", "--prefix_cache_mb", "64"]
        if rule:
            args += ["--postprocess", rule]
        start = time.perf_counter()
        result = helm(checkpoint=checkpoint, conf="offline", out=out / f"{style}-{rule or 'none'}",
                      max_eval_instances=instances, serve_args=args, fresh=True)
        row = {"prompt_style": "raw" if style == "raw" else "templated", "postprocess": rule or "none"}
        for name, run in result["runs"].items():  # "synthetic_reasoning:mode=pattern_match,model=..."
            mode = name.split(":", 1)[1].split(",")[0].removeprefix("mode=")
            row[f"{mode} EM"] = run["metrics"].get("exact_match")
            row[f"{mode} quasi-EM"] = run["metrics"].get("quasi_exact_match")
            row[f"{mode} output tokens"] = run["metrics"].get("num_output_tokens")
        row.update(test_score=result.get("test_score"), wall_s=round(time.perf_counter() - start, 1))
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    return rows


def table(rows: list[dict], title: str) -> str:
    keys = [k for k in rows[0] if k not in ("prompt_style", "postprocess", "wall_s")]
    lines = [f"**{title}**", "", "| prompt | postprocess | " + " | ".join(k.removeprefix("onegpu_") for k in keys)
             + " | wall s |", "|---|---|" + "---:|" * (len(keys) + 1)]
    for row in rows:
        cells = [f"{row.get(k):.3f}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys]
        lines.append(f"| {row['prompt_style']} | {row['postprocess']} | " + " | ".join(cells) + f" | {row['wall_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/qs/finetune/final"),
                        help="a fine-tuned checkpoint with prompt_style.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-prompt-format"))
    parser.add_argument("--helm_instances", type=int, default=10)
    parser.add_argument("--gen_limit", type=int, default=8,
                        help="instances of the suite's generation task (gsm8k); the others keep the suite's limits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip_helm", action="store_true")
    parser.add_argument("--skip_lm_eval", action="store_true")
    args = parser.parse_args()
    if not (args.checkpoint / "prompt_style.yaml").is_file():
        raise SystemExit(f"{args.checkpoint} has no prompt_style.yaml: fine-tune first "
                         "(onegpu finetune --config finetune/configs/cpu-quickstart.yaml ...)")
    tables = []
    if not args.skip_lm_eval:
        tables.append(table(lm_eval_rows(args.checkpoint, args.gen_limit, args.threads),
                            "lm-eval offline suite (primary metric per task)"))
    if not args.skip_helm:
        tables.append(table(helm_rows(args.checkpoint, args.out, args.helm_instances),
                            f"HELM offline conf ({args.helm_instances} instances per scenario)"))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
