"""``onegpu quickstart``: the whole pipeline on the bundled model, offline, on a CPU, long enough to learn.

Each step is the exact ``onegpu`` command a user would type (printed before it runs), so the
quickstart doubles as a worked example: data mix -> fine-tune -> validation (lm-eval) -> one turn of
the data loop (reweight the mix from the scores, rebuild it) -> test (HELM
against our own server) -> a 3-trial learning-rate sweep -> an HTML report. The fine-tune and the
trials stop after a fixed number of steps, not when a budget runs out, so a busy machine makes the
quickstart slower but never teaches less; the budget clock still runs (the track's 24 h) and the
summary projects what 24 h would give at the pace measured. Steps whose outputs already exist are
skipped, so an interrupted quickstart picks up where it stopped (``--fresh`` starts over). A step
whose inputs come from a skipped step is skipped too (and says so); the report compares what ran.

Adding a step: write a function ``(QuickstartDirs, ran) -> Step`` (``ran``: the keys of the steps
done so far) and put it in ``STEPS``; ``needs`` names the steps whose outputs it reads.
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

from onegpu.contracts import read_json
from onegpu.errors import UserError
from onegpu.model import prepare
from onegpu.paths import stage_dir

DAY_S = 24 * 3600


@dataclass(frozen=True)
class QuickstartDirs:
    """Where each step writes (all under ``out``) and the base model they start from."""

    out: Path
    checkpoint: Path

    data = property(lambda self: self.out / "data")
    finetune = property(lambda self: self.out / "finetune")
    eval_val = property(lambda self: self.out / "eval-val")
    eval_helm = property(lambda self: self.out / "eval-helm")
    recipe_r2 = property(lambda self: self.out / "recipe-r2.yaml")
    data_r2 = property(lambda self: self.out / "data-r2")
    sweep = property(lambda self: self.out / "sweep")
    report = property(lambda self: self.out / "report")


@dataclass(frozen=True)
class Step:
    key: str  # what ``--skip`` names
    title: str
    args: list[str]
    done_marker: Path  # the step is complete when this file exists
    needs: tuple[str, ...] = ()  # the steps whose outputs it reads
    output: str = ""  # the summary's line for it (empty: none)

    def command(self) -> list[str]:
        return ["onegpu", *self.args]


def data_step(d: QuickstartDirs, ran: set[str]) -> Step:
    recipe = stage_dir("data") / "recipes/quickstart.yaml"
    return Step("data", "data mix", ["data", "build", str(recipe), "--out", str(d.data)], d.data / "manifest.json",
                output=f"data mix         {d.data}  (train/val/rejects JSONL, manifest.json, plot)")


def finetune_step(d: QuickstartDirs, ran: set[str]) -> Step:
    config = stage_dir("finetune") / "configs/cpu-quickstart.yaml"
    return Step("finetune", "fine-tune (LoRA, CPU, a fixed number of steps)",
                ["finetune", "--config", str(config), "--checkpoint_dir", str(d.checkpoint), "--data", str(d.data),
                 "--out_dir", str(d.finetune)], d.finetune / "final" / "lit_model.pth", needs=("data",),
                output=f"fine-tune run    {d.finetune}  (metrics.csv, training_curves.png, run.json, checkpoints/)\n"
                       f"  merged model     {d.finetune / 'final'}")


def val_step(d: QuickstartDirs, ran: set[str]) -> Step:
    return Step("val", "validation (lm-eval, offline suite)",
                ["eval", "val", "--checkpoint", str(d.finetune / "final"), "--suite", "offline", "--out", str(d.eval_val)],
                d.eval_val / "results.json", needs=("finetune",), output=f"validation       {d.eval_val / 'results.json'}")


def helm_step(d: QuickstartDirs, ran: set[str]) -> Step:
    return Step("helm", "test (HELM, offline synthetic conf)",
                ["eval", "helm", "--checkpoint", str(d.finetune / "final"), "--conf", "offline", "--out", str(d.eval_helm)],
                d.eval_helm / "results.json", needs=("finetune",), output=f"HELM test        {d.eval_helm / 'results.json'}")


def sweep_step(d: QuickstartDirs, ran: set[str]) -> Step:
    # The sweep YAML names no data dir of its own: point its trials at this mix.
    return Step("sweep", "sweep (3 learning rates: too low, good, too high)",
                ["sweep", str(stage_dir("sweeps") / "quickstart.yaml"), "--out", str(d.sweep),
                 "--params", json.dumps({"data": str(d.data)})], d.sweep / "sweep_summary.json", needs=("data",),
                output=f"sweep            {d.sweep}  (one trial-NNN dir per learning rate: metrics, LoRA adapter)")


def report_step(d: QuickstartDirs, ran: set[str]) -> Step:
    # A sweep dir stands for its trials; eval dirs attach their scores to the run they scored. Only what ran.
    inputs = [str(path) for key, path in (("finetune", d.finetune), ("val", d.eval_val), ("helm", d.eval_helm),
                                          ("sweep", d.sweep)) if key in ran]
    return Step("report", "report", ["report", json.dumps(inputs), "--out", str(d.report)], d.report / "index.html",
                needs=("finetune",) if "sweep" not in ran else (), output=f"report           {d.report / 'index.html'}")


# ------------------------------------------------------------ one turn of the loop (eval-guided mixing)
# build -> fine-tune -> val (above) -> reweight -> rebuild: the validation scores choose the next mix.
# Cheap on purpose: the mix is rebuilt, not fine-tuned on again (that is the next turn, by hand).
def reweight_step(d: QuickstartDirs, ran: set[str]) -> Step:
    recipe = stage_dir("data") / "recipes/quickstart.yaml"
    return Step("reweight", "reweight the mix from the validation scores",
                ["data", "reweight", "--results", str(d.eval_val), "--recipe", str(recipe), "--out", str(d.recipe_r2)],
                d.recipe_r2, needs=("val",))


def rebuild_step(d: QuickstartDirs, ran: set[str]) -> Step:
    return Step("rebuild", "rebuild the mix (the next turn's data)", ["data", "build", str(d.recipe_r2), "--out",
                                                                      str(d.data_r2)], d.data_r2 / "manifest.json",
                needs=("reweight",))


def loop_turn_lines(d: QuickstartDirs) -> list[str]:
    """What the turn changed (the new recipe's comment block) and the next command."""
    if not d.recipe_r2.is_file():
        return []
    header = [line[2:] for line in d.recipe_r2.read_text(encoding="utf-8").split("\n\n")[0].splitlines()]
    return ["", "One turn of the loop (build -> fine-tune -> val -> reweight -> rebuild):",
            *(f"  {line}" for line in header[3:]),
            f"  next turn: onegpu finetune --config {stage_dir('finetune') / 'configs/cpu-quickstart.yaml'} "
            f"--data {d.data_r2} --out_dir {d.out / 'finetune-r2'}"]
# ------------------------------------------------------------ end of the loop turn


STEPS = [data_step, finetune_step, val_step, reweight_step, rebuild_step, helm_step, sweep_step, report_step]


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
    placeholder = QuickstartDirs(out, Path())
    known = [make(placeholder, set()).key for make in STEPS]
    skip = set(skip or [])
    if skip - set(known):
        raise UserError(f"unknown step(s) to skip: {sorted(skip - set(known))}", fix=f"choose from {known}")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    print("== [0] bundled model: onegpu model prepare", flush=True)
    dirs = QuickstartDirs(out, prepare())
    timings: dict[str, float] = {}
    ran: list[Step] = []  # done before or now, in order
    for make in STEPS:
        step = make(dirs, {s.key for s in ran})
        code = run_step(step, skip, {s.key for s in ran}, timings)
        if code:
            return code
        if step.key not in skip and step.done_marker.exists():
            ran.append(step)
    print_summary(dirs, ran, time.time() - started, timings)
    return 0


def run_step(step: Step, skip: set[str], ran: set[str], timings: dict[str, float]) -> int:
    """Run one step as its own ``onegpu`` process (unless skipped, left without its inputs, or done)."""
    if step.key in skip:
        print(f"== skip {step.title} (--skip)", flush=True)
        return 0
    missing = [need for need in step.needs if need not in ran]
    if missing:
        print(f"== skip {step.title}: it reads the output of {', '.join(missing)}, which did not run", flush=True)
        return 0
    if step.done_marker.exists():
        print(f"== {step.title}: already done ({step.done_marker})", flush=True)
        return 0
    print(f"\n== {step.title}\n$ {shlex.join(step.command())}", flush=True)
    t0 = time.time()
    result = subprocess.run([sys.executable, "-m", "onegpu", *step.args], cwd=Path.cwd())
    timings[step.key] = time.time() - t0
    if result.returncode != 0:
        print(f"\nquickstart: step '{step.title}' failed (exit {result.returncode}); fix it and re-run "
              f"`onegpu quickstart` to resume from this step.", file=sys.stderr)
    return result.returncode


def learning_lines(summary: dict) -> list[str]:
    """What the fine-tune learned and what the budget clock says, with the pace projected to 24 h."""
    if not summary:
        return []
    lines = [f"  fine-tune: {summary.get('steps')}/{summary.get('total_steps')} steps, train loss "
             f"{summary.get('first_loss', 0):.3f} -> {summary.get('final_loss', 0):.3f}, val loss "
             f"{summary.get('val_loss') or float('nan'):.3f}, peak memory {summary.get('peak_memory_gib')} GiB"]
    elapsed, tokens, steps = summary.get("budget_elapsed_s"), summary.get("tokens_seen"), summary.get("steps")
    if elapsed and tokens and steps:
        scale = DAY_S / elapsed
        lines.append(f"  budget clock: {elapsed / 60:.1f} min of 24 h used ({summary.get('budget_used_pct', 0):.2f}%); "
                     f"at this pace 24 h would give ~{steps * scale:,.0f} steps, ~{tokens * scale / 1e6:,.1f}M tokens")
    return lines


def print_summary(dirs: QuickstartDirs, ran: list[Step], seconds: float, timings: dict[str, float]) -> None:
    """Where each output is and what it says, for the steps that ran (now or before) only: a skipped step's
    dir may hold an older run's files."""
    done = {step.key for step in ran}

    def results(key: str, path: Path) -> dict:
        return read_json(path) if key in done else {}

    lines = [
        "",
        f"quickstart finished in {seconds / 60:.1f} min. Where everything is:",
        *(f"  {step.output}" for step in ran if step.output),
        f"  W&B offline runs {dirs.out}/*/wandb/offline-run-*   (upload: wandb sync <dir>)",
        "",
        "What it learned:",
        *learning_lines(results("finetune", dirs.finetune / "summary.json")),
    ]
    val, helm = results("val", dirs.eval_val / "results.json"), results("helm", dirs.eval_helm / "results.json")
    if val:
        lines.append(f"  validation score (mean over tasks): {val.get('val_score')}")
    if helm:
        lines.append(f"  HELM test score (mean over scenarios): {helm.get('test_score')}")
    lines += [f"  {verdict['text']}" for verdict in results("report", dirs.report / "report.json").get("sweeps", [])]
    lines += loop_turn_lines(dirs) if "reweight" in done else []
    if timings:
        lines.append("  step times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    lines += [
        "",
        "The real thing, on one GPU for 24 h (README.md, 'The GPU day'):",
        "  onegpu day plan --track rtx4090-24gb --model Mistral-7B-v0.1 --out runs/day   # here, the day before",
        "  bash runs/day/day.sh    # on the GPU box: prepare, sweep, final run, eval, the image",
    ]
    print("\n".join(lines), flush=True)
