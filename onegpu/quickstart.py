"""``onegpu quickstart``: the whole pipeline on the bundled model, offline, on a CPU.

Each step is the exact ``onegpu`` command a user would type (printed before it runs), so the
quickstart doubles as a worked example: data mix -> fine-tune -> validation (lm-eval) -> test (HELM
against our own server) -> a 2-trial sweep -> an HTML report. Steps whose outputs already exist are
skipped, so an interrupted quickstart picks up where it stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from onegpu.errors import UserError
from onegpu.paths import stage_dir


@dataclass
class Step:
    name: str
    args: list[str]
    done_marker: Path  # the step is complete when this file exists

    def command(self) -> list[str]:
        return ["onegpu", *self.args]


def _steps(out: Path, checkpoint: Path) -> list[Step]:
    data, ft, val, helm, sweep, report = (out / n for n in ("data", "finetune", "eval-val", "eval-helm", "sweep", "report"))
    final = ft / "final"
    return [
        Step("data mix", ["data", "build", str(stage_dir("data") / "recipes/quickstart.yaml"), "--out", str(data)],
             data / "manifest.json"),
        Step("fine-tune (LoRA, CPU)", ["finetune", "--config", str(stage_dir("finetune") / "configs/cpu-quickstart.yaml"),
                                       "--checkpoint_dir", str(checkpoint), "--data", str(data), "--out_dir", str(ft)],
             final / "lit_model.pth"),
        Step("validation (lm-eval, offline suite)", ["eval", "val", "--checkpoint", str(final), "--suite", "offline",
                                                     "--out", str(val)], val / "results.json"),
        *loop_turn_steps(out),
        Step("test (HELM, offline synthetic conf)", ["eval", "helm", "--checkpoint", str(final), "--conf", "offline",
                                                     "--out", str(helm)], helm / "results.json"),
        # The sweep YAML names no data dir of its own: point its trials at this mix.
        Step("sweep (2 trials)", ["sweep", str(stage_dir("sweeps") / "quickstart.yaml"), "--out", str(sweep),
                                  "--params", json.dumps({"data": str(data)})], sweep / "sweep_summary.json"),
        # A sweep dir stands for its trials; eval dirs attach their scores to the run they scored.
        Step("report", ["report", json.dumps([str(ft), str(val), str(helm), str(sweep)]), "--out", str(report)],
             report / "index.html"),
    ]


# ------------------------------------------------------------ one turn of the loop (eval-guided mixing)
# build -> fine-tune -> val (above) -> reweight -> rebuild: the validation scores choose the next mix.
# Cheap on purpose: the mix is rebuilt, not fine-tuned on again (that is the next turn, by hand).
LOOP_TURN_KEYS = ("reweight", "rebuild")


def loop_turn_steps(out: Path) -> list[Step]:
    """``data reweight`` from the validation results, then ``data build`` of the new recipe."""
    recipe, new_recipe, new_data = stage_dir("data") / "recipes/quickstart.yaml", out / "recipe-r2.yaml", out / "data-r2"
    return [
        Step("reweight the mix from the validation scores",
             ["data", "reweight", "--results", str(out / "eval-val"), "--recipe", str(recipe), "--out", str(new_recipe)],
             new_recipe),
        Step("rebuild the mix (the next turn's data)", ["data", "build", str(new_recipe), "--out", str(new_data)],
             new_data / "manifest.json"),
    ]


def loop_turn_lines(out: Path) -> list[str]:
    """What the turn changed (the new recipe's comment block) and the next command."""
    new_recipe = out / "recipe-r2.yaml"
    if not new_recipe.is_file():
        return []
    header = [line[2:] for line in new_recipe.read_text(encoding="utf-8").split("\n\n")[0].splitlines()]
    return ["", "One turn of the loop (build -> fine-tune -> val -> reweight -> rebuild):",
            *(f"  {line}" for line in header[3:]),
            f"  next turn: onegpu finetune --config {stage_dir('finetune') / 'configs/cpu-quickstart.yaml'} "
            f"--data {out / 'data-r2'} --out_dir {out / 'finetune-r2'}"]
# ------------------------------------------------------------ end of the loop turn


def quickstart(out: Path = Path("runs/quickstart"), fresh: bool = False, skip: list[str] | None = None) -> int:
    """Run the whole pipeline on the bundled model (offline, CPU, W&B offline).

    Args:
        out: where every step writes its run dir.
        fresh: delete ``out`` first instead of resuming the steps already done.
        skip: step names to leave out (``data``, ``finetune``, ``val``, ``reweight``, ``rebuild``, ``helm``,
            ``sweep``, ``report``).
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    out = Path(out).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(skip or [])
    known = {"data", "finetune", "val", *LOOP_TURN_KEYS, "helm", "sweep", "report"}
    if skip - known:
        raise UserError(f"unknown step(s) to skip: {sorted(skip - known)}", fix=f"choose from {sorted(known)}")

    from onegpu.model import prepare

    started = time.time()
    print("== [0] bundled model: onegpu model prepare", flush=True)
    checkpoint = prepare()
    keys = ["data", "finetune", "val", *LOOP_TURN_KEYS, "helm", "sweep", "report"]
    timings: dict[str, float] = {}
    for key, step in zip(keys, _steps(out, checkpoint)):
        if key in skip:
            print(f"== skip {step.name}", flush=True)
            continue
        if step.done_marker.exists():
            print(f"== {step.name}: already done ({step.done_marker})", flush=True)
            continue
        print(f"\n== {step.name}\n$ {shlex.join(step.command())}", flush=True)
        t0 = time.time()
        result = subprocess.run([sys.executable, "-m", "onegpu", *step.args], cwd=Path.cwd())
        timings[key] = time.time() - t0
        if result.returncode != 0:
            print(f"\nquickstart: step '{step.name}' failed (exit {result.returncode}); fix it and re-run "
                  f"`onegpu quickstart` to resume from this step.", file=sys.stderr)
            return result.returncode
    _print_summary(out, time.time() - started, timings)
    return 0


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _print_summary(out: Path, seconds: float, timings: dict[str, float]) -> None:
    ft = out / "finetune"
    lines = [
        "",
        f"quickstart finished in {seconds / 60:.1f} min. Where everything is:",
        f"  data mix         {out / 'data'}  (train/val/rejects JSONL, manifest.json, plot)",
        f"  fine-tune run    {ft}  (metrics.csv, run.json, checkpoints/)",
        f"  merged model     {ft / 'final'}",
        f"  validation       {out / 'eval-val' / 'results.json'}",
        f"  HELM test        {out / 'eval-helm' / 'results.json'}",
        f"  sweep            {out / 'sweep'}",
        f"  report           {out / 'report' / 'index.html'}",
        f"  W&B offline runs {out}/*/wandb/offline-run-*   (upload: wandb sync <dir>)",
    ]
    summary = _read_json(ft / "summary.json")
    val = _read_json(out / "eval-val" / "results.json")
    helm = _read_json(out / "eval-helm" / "results.json")
    if summary:
        shown = {k: summary[k] for k in ("steps", "first_loss", "final_loss", "val_loss", "tokens_seen",
                                         "peak_memory_gib", "budget_used_pct", "stopped_by") if k in summary}
        lines.append(f"  fine-tune summary: {json.dumps(shown)}")
    if val:
        lines.append(f"  validation score (mean over tasks): {val.get('val_score')}")
    if helm:
        lines.append(f"  HELM test score (mean over scenarios): {helm.get('test_score')}")
    lines += loop_turn_lines(out)
    if timings:
        lines.append("  step times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    lines += [
        "",
        "The real thing, on a GPU (see README.md):",
        "  onegpu model prepare meta-llama/Llama-2-7b-hf",
        "  onegpu data build data/recipes/competition.yaml --out runs/mix",
        "  onegpu finetune plan --config finetune/configs/llama2-7b-qlora-rtx4090.yaml --data runs/mix",
        "  onegpu finetune --config finetune/configs/llama2-7b-qlora-rtx4090.yaml --data runs/mix",
    ]
    print("\n".join(lines), flush=True)
