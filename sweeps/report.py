"""``onegpu report``: one self-contained HTML page comparing runs, from their local logs only.

Reads what every stage writes (``run.json``, ``metrics.jsonl``, ``summary.json``, eval
``results.json``) through :class:`onegpu.contracts.RunDir`; no W&B account or network. The page
answers the sweep question (which rank x precision x quantization gives the best validation score
per hour of budget and per GiB) and shows what a competitor looks for first:

* validation scores per task (``onegpu eval val``) and test scores per HELM scenario
  (``onegpu eval helm``), a bar per run;
* training / validation loss per step; tokens/s, MFU and memory over (budget-clock) time;
* the Pareto plots of validation score vs tokens/s and vs peak memory; budget used and peak memory;
* per sweep, a sentence naming the trial that won, by how much, and whether that is beyond noise
  (paired over the validation rows both trials saw);
* a note naming runs that are identical (same configuration, or the same logged losses, whose
  curves would otherwise hide under each other), and the run table.

Units are the same everywhere: MFU in %, memory in GiB, time in minutes. Every run has a number
(1, 2, ...) used in every legend, label and the table. Charts are inline SVG with real text, so a
browser (and the test) can check that no two labels overlap; the same charts are written as PNGs
beside ``index.html``, with ``report.json`` holding the table and the notes as data.
"""

from __future__ import annotations

import html
import io
import json
import math
import statistics
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onegpu.contracts import SWEEP_STATE, RunDir, atomic_path, atomic_write_json, atomic_write_text, find_run_dirs
from onegpu.errors import UserError
from onegpu.tracking import record_crash

# Where each number lives in what the stages log (first key found wins).
TRAIN_LOSS = ("loss", "train_loss", "train/loss")
VAL_LOSS = ("val_loss", "val/loss")
TOKENS_PER_S = ("tokens_per_s", "tokens_per_sec", "throughput/tokens_per_s")
MFU = ("mfu", "throughput/mfu")  # a fraction in the logs; shown as %
PEAK_MEMORY = ("peak_memory_gib", "mem/cuda_peak_allocated_gib", "mem/cuda_peak_reserved_gib", "mem/peak_rss_gib")
MEMORY_IN_USE = ("mem/cuda_allocated_gib", "mem/rss_gib")
ELAPSED_S = ("wall_clock_s",)  # the budget clock; else time since the first logged row
# Config keys that name where a run writes, not what it computes (left out when comparing configs).
CONFIG_PLACES = {"out_dir", "out", "run_name", "resume", "resumed_from_wandb_id", "progress", "wandb_project"}
LABEL_WIDTH = 34  # characters per line of a wrapped axis label
EVAL_KINDS = {"val": ("eval-val", "validation score per task (onegpu eval val)"),
              "test": ("eval-helm", "test score per HELM scenario (onegpu eval helm)")}


def _sig(value: float) -> str:
    return f"{value:.4g}"


@dataclass
class RunLog:
    run: RunDir
    name: str
    rows: list[dict[str, Any]]
    number: int = 0
    evals: dict[str, RunDir] = field(default_factory=dict)  # eval stage -> the eval that scored this run

    path = property(lambda self: self.run.path)
    stage = property(lambda self: self.run.stage)
    config = property(lambda self: self.run.config)
    summary = property(lambda self: self.run.summary)

    def series(self, keys: tuple[str, ...], x: str = "step") -> tuple[list[float], list[float]]:
        """(x, y) of the first of ``keys`` logged; x is the optimizer step or elapsed minutes."""
        t0 = next((r["_time"] for r in self.rows if isinstance(r.get("_time"), (int, float))), None)
        for key in keys:
            pts = []
            for i, r in enumerate(self.rows):
                y = r.get(key)
                if not isinstance(y, (int, float)) or isinstance(y, bool) or y != y:
                    continue
                if x == "step":
                    pts.append((r["_step"] if r.get("_step") is not None else i, float(y)))
                elif isinstance(r.get(ELAPSED_S[0]), (int, float)):
                    pts.append((r[ELAPSED_S[0]] / 60, float(y)))
                elif t0 is not None and isinstance(r.get("_time"), (int, float)):
                    pts.append(((r["_time"] - t0) / 60, float(y)))
            if pts:
                return [p[0] for p in pts], [p[1] for p in pts]
        return [], []

    def value(self, keys: tuple[str, ...], reduce: str = "last") -> float | None:
        for key in keys:
            v = self.summary.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                return float(v)
        _steps, ys = self.series(keys)
        if not ys:
            return None
        # Steady-state throughput: the first logged window includes warm-up / compilation.
        if reduce == "median":
            return statistics.median(ys[1:] if len(ys) > 2 else ys)
        return max(ys) if reduce == "max" else ys[-1]

    @property
    def label(self) -> str:
        """The settings a sweep varies, briefly: ``r16 bf16-true nf4``."""
        c = self.config
        parts = [f"r{c['lora_r']}"] if c.get("lora_r") is not None else []
        parts += [str(c["precision"])] if c.get("precision") else []
        parts += [str(c["quantize"]).removeprefix("bnb.")] if c.get("quantize") else []
        if c.get("learning_rate") is not None:
            parts.append(f"lr {c['learning_rate']:.2g}" if isinstance(c["learning_rate"], float) else f"lr {c['learning_rate']}")
        return " ".join(parts) or self.stage

    @property
    def legend(self) -> str:
        return f"{self.number}  {_shorten(self.name, 30)} ({self.label})"

    def budget(self) -> tuple[float | None, float | None]:
        """(seconds used, seconds available) of the run's budget clock."""
        used = self.summary.get("budget_elapsed_s")
        total = self.summary.get("budget_s")
        if used is None:
            _s, wall = self.series(ELAPSED_S)
            used = wall[-1] if wall else None
        return used, total

    def task_scores(self, kind: str) -> dict[str, tuple[str, float]]:
        """task or scenario -> (metric, value) from the attached ``eval val`` / ``eval helm`` run."""
        ev = self.evals.get(EVAL_KINDS[kind][0])
        if ev is None:
            return {}
        block = ev.results.get("tasks" if kind == "val" else "scenarios") or {}
        out = {}
        for task, entry in block.items():
            if not isinstance(entry, dict):
                continue
            metric = str(entry.get("primary_metric") or entry.get("main_metric") or "score").removesuffix(",none")
            value = entry.get("primary", entry.get("value"))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[task] = (str(metric), float(value))
        return out

    def scores(self) -> dict[str, float]:
        """Headline numbers of the attached evals, as ``STAGE:KEY`` (``eval-val:val_score``)."""
        out = {}
        for stage, ev in self.evals.items():
            doc = ev.summary or ev.results
            out.update({f"{stage}:{k}": float(v) for k, v in doc.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" not in k
                        and not k.endswith("_s")})
        return out


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width // 2 - 1] + "…" + text[-(width - width // 2):]


def load_runs(paths: list[Path]) -> list[RunLog]:
    """Run dirs -> RunLogs, each eval attached to the fine-tune run whose checkpoint it scored, numbered."""
    runs = []
    for path in find_run_dirs(paths):
        run = RunDir.load(path)
        name = str(run.config.get("run_name") or path.name)
        if path.name.startswith("trial-") or name in ("final", "finetune"):
            name = f"{path.parent.name}/{path.name}"
        runs.append(RunLog(run=run, name=name, rows=run.metrics()))
    train = [r for r in runs if not _is_eval(r)]
    kept = list(train)
    for ev in (r for r in runs if _is_eval(r)):
        ckpt = str(ev.config.get("checkpoint") or ev.config.get("checkpoint_dir") or ev.run.results.get("checkpoint") or "")
        owner = next((t for t in train if ckpt and Path(ckpt).resolve().is_relative_to(t.path.resolve())), None)
        if owner is not None and ev.stage not in owner.evals:
            owner.evals[ev.stage] = ev.run
        else:
            ev.evals[ev.stage] = ev.run
            kept.append(ev)
    for number, run in enumerate(kept, start=1):
        run.number = number
    return kept


def record_crashes(paths: list[Path]) -> None:
    """Runs killed with no exit recorded (SIGKILL, OOM killer, power loss): marked crashed in their
    summary.json and W&B run (``tracking.record_crash``), so the page and W&B show how far they got."""

    for path in find_run_dirs(paths):
        status = record_crash(path)
        if status is not None:
            print(f"[onegpu] {path}: the {status.stage} run was {status.text}; marked crashed in its "
                  f"summary.json and W&B run")


def _is_eval(run: RunLog) -> bool:
    return run.stage.startswith("eval") or (bool(run.run.results) and not run.rows)


# ----------------------------------------------------------------------------------- identical runs
def _config_key(run: RunLog) -> str | None:
    config = {k: v for k, v in run.config.items() if k not in CONFIG_PLACES}
    return json.dumps([run.stage, config], sort_keys=True, default=str) if config else None


def _results_key(run: RunLog) -> str | None:
    curves = [[_sig(v) for v in run.series(keys)[1]] for keys in (TRAIN_LOSS, VAL_LOSS)]
    tasks = {k: _sig(v) for kind in EVAL_KINDS for k, (_m, v) in run.task_scores(kind).items()}
    return json.dumps([curves, tasks], sort_keys=True) if any(curves) else None


def _groups(runs: list[RunLog], key) -> list[list[RunLog]]:
    by: dict[str, list[RunLog]] = {}
    for run in runs:
        k = key(run)
        if k is not None:
            by.setdefault(k, []).append(run)
    return [g for g in by.values() if len(g) > 1]


def _differences(group: list[RunLog]) -> list[str]:
    keys = sorted({k for r in group for k in r.config} - CONFIG_PLACES)
    return [f"{k} ({' vs '.join(str(r.config.get(k)) for r in group)})" for k in keys
            if len({json.dumps(r.config.get(k), default=str) for r in group}) > 1]


def identical_runs(runs: list[RunLog]) -> list[dict[str, Any]]:
    """Groups of runs with the same configuration, or with the same logged losses (and eval scores)."""
    notes = []
    for group in _groups(runs, _config_key):
        same = len({_results_key(r) for r in group}) == 1
        notes.append({"runs": [r.number for r in group], "kind": "configuration", "text":
                      f"{_names(group)} have the same configuration" +
                      (" and logged the same losses: their curves lie on top of each other." if same else
                       "; their losses differ, which is run-to-run noise (seed, data order, timing), not a setting.")})
    for group in _groups(runs, _results_key):
        if len({_config_key(r) for r in group}) == 1:
            continue  # already said above
        diff = _differences(group)
        notes.append({"runs": [r.number for r in group], "kind": "results", "text":
                      f"{_names(group)} logged identical losses (to 4 significant digits), so their curves lie on "
                      f"top of each other" + (f", although they differ in {', '.join(diff)}: at this scale that "
                                              f"made no measurable difference." if diff else ".")})
    return notes


def _names(group: list[RunLog]) -> str:
    return "Runs " + ", ".join(f"{r.number} ({r.name})" for r in group)


# ------------------------------------------------------------------------------------ sweep winners
NOISE_Z = 2.0  # a win counts as beyond noise at 2 standard errors of the paired difference (~95%)


def _sweeps(runs: list[RunLog]) -> list[list[RunLog]]:
    """The trials of each sweep dir among the runs (a trial's parent holds the sweep state)."""
    by: dict[Path, list[RunLog]] = {}
    for run in runs:
        if (run.path.parent / SWEEP_STATE).is_file():
            by.setdefault(run.path.parent, []).append(run)
    return [trials for trials in by.values() if len(trials) > 1]


def paired_difference(winner: list[float], other: list[float]) -> tuple[float, float, int] | None:
    """Mean and standard error of ``other - winner`` over the validation rows both runs saw, and on
    how many of them the winner did better. Pairing removes what the rows share (some are just
    harder), so the spread left is what the runs themselves differ by."""
    if not winner or not other or len(winner) != len(other) or len(winner) < 3:
        return None
    diffs = [b - a for a, b in zip(winner, other)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)), sum(d > 0 for d in diffs)


def sweep_verdicts(runs: list[RunLog], score: str = "val_loss", maximize: bool = False) -> list[dict[str, Any]]:
    """Per sweep: which trial won on ``score``, by how much, and whether that is beyond noise."""
    verdicts = []
    for trials in _sweeps(runs):
        scored = [(v, t) for t in trials if (v := _score(t, score)) is not None]
        if len(scored) < 2:
            continue
        scored.sort(key=lambda vt: -vt[0] if maximize else vt[0])
        (best, win), (second, runner) = scored[0], scored[1]
        varied = _differences([t for _v, t in scored])
        text = (f"Sweep {win.path.parent.name}: run {win.number} ({win.name}, {win.label}) won with {score} "
                f"{_sig(best)}, {_sig(abs(best - second))} better than the runner-up, run {runner.number} "
                f"({runner.label}, {_sig(second)})" + (f", and {_sig(abs(best - scored[-1][0]))} better than the "
                                                        f"last ({scored[-1][1].label})" if len(scored) > 2 else "")
                + (f"; the trials differ in {', '.join(varied)}." if varied else "."))
        paired = (paired_difference(win.summary.get("val_row_losses"), runner.summary.get("val_row_losses"))
                  if score == "val_loss" else None)
        beyond = None
        if paired is None:
            text += " The runs logged no per-row validation losses to pair, so whether that is beyond noise is unknown."
        else:
            mean, se, better = paired
            z = mean / se if se > 0 else math.inf
            beyond = z >= NOISE_Z
            n = len(win.summary["val_row_losses"])
            text += (f" On the same {n} validation rows the winner's loss was lower on {better} of {n}; the mean "
                     f"paired difference is {_sig(mean)} ± {_sig(se)} (standard error), {z:.1f} standard errors from "
                     f"zero: " + ("beyond noise (≥ 2)." if beyond else
                                  "within noise (< 2): another seed could reorder these two."))
        verdicts.append({"sweep": str(win.path.parent), "winner": win.number, "runner_up": runner.number,
                         "score": score, "margin": abs(best - second), "beyond_noise": beyond, "text": text})
    return verdicts


# ------------------------------------------------------------------------------------------ plots
STYLES = ["-", "--", ":", "-."]  # a line drawn on top of an identical one still shows


def matplotlib_agg():
    """matplotlib, with pyplot loaded on the Agg backend (files, no display)."""
    # the engine: matplotlib loads when a chart is drawn, not for --help
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 (loads matplotlib.pyplot)

    return matplotlib


def _colors(n: int):
    cmap = matplotlib_agg().colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _wrap(text: str, width: int = LABEL_WIDTH) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False)[:3]) or text


def _legend_outside(fig, axes, runs: list[RunLog]) -> None:
    """One legend right of the panels: every run any panel drew, in run order, then other entries."""
    by_label = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    labels = [r.legend for r in runs if r.legend in by_label]
    labels += [label for label in by_label if label not in labels]
    if labels:
        fig.legend([by_label[label] for label in labels], labels, loc="upper left", bbox_to_anchor=(1.0, 0.98),
                   fontsize=8, frameon=False, handlelength=3)


def _figure(runs: list[RunLog], panels, x: str, xlabel: str, scale: dict[str, float], clip_outliers: bool = False):
    """One row of line panels, a line per run; ``panels`` = [(title with unit, keys)].

    ``clip_outliers``: a diverged run (values over 3x the median of all) would flatten every other
    curve to a line; the axis stops at the rest and the panel names what runs off the top.
    """

    plt = matplotlib_agg().pyplot

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    colors = _colors(len(runs))
    for ax, (title, keys) in zip(axes[0], panels):
        plotted = []
        for i, run in enumerate(runs):
            xs, ys = run.series(keys, x=x)
            if ys:
                ys = [y * scale.get(title, 1.0) for y in ys]
                plotted.append((run.number or i + 1, ys))
                ax.plot(xs, ys, STYLES[i % len(STYLES)], marker="o" if len(ys) < 12 else None, ms=3,
                        color=colors[run.number - 1 if run.number else i], label=run.legend, lw=1.6)
        if clip_outliers and plotted:
            _clip_to_the_rest(ax, plotted, 3 * statistics.median(y for _n, ys in plotted for y in ys))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes[0], runs)
    fig.tight_layout()
    return fig


def _clip_to_the_rest(ax, plotted: list[tuple[int, list[float]]], ceiling: float) -> None:
    """Top of the axis just above the values under ``ceiling``; name the runs that go above it."""
    above = [(number, max(ys)) for number, ys in plotted if max(ys) > ceiling]
    kept = [y for _n, ys in plotted for y in ys if y <= ceiling]
    if not above or not kept:
        return
    low, high = min(kept), max(kept)
    pad = 0.08 * (high - low or abs(high) or 1.0)
    ax.set_ylim(low - pad, high + pad)
    ax.text(0.99, 0.97, "off scale: " + ", ".join(f"run {n} (up to {_sig(v)})" for n, v in above),
            transform=ax.transAxes, ha="right", va="top", fontsize=7, color="#a00")


def plot_losses(runs: list[RunLog]):
    if not any(r.series(k)[1] for r in runs for k in (TRAIN_LOSS, VAL_LOSS)):
        return None
    return _figure(runs, [("training loss", TRAIN_LOSS), ("validation loss", VAL_LOSS)], "step", "optimizer step", {},
                   clip_outliers=True)


def plot_over_time(runs: list[RunLog]):
    panels = [("tokens/s (non-padding)", TOKENS_PER_S), ("MFU (%)", MFU), ("memory in use (GiB)", MEMORY_IN_USE)]
    if not any(r.series(k)[1] for r in runs for _t, k in panels):
        return None
    return _figure(runs, panels, "time", "budget-clock time (min)", {"MFU (%)": 100.0})


def plot_task_scores(runs: list[RunLog], kind: str):
    """Grouped horizontal bars: a row per task (label: task and metric), a bar per run."""
    plt = matplotlib_agg().pyplot

    scored = [r for r in runs if r.task_scores(kind)]
    if not scored:
        return None
    tasks: dict[str, str] = {}
    for run in scored:
        for task, (metric, _v) in run.task_scores(kind).items():
            tasks.setdefault(task, metric)
    bar, gap = 0.8 / len(scored), 0.2  # in rows: a task's bars fill 0.8 of its row
    fig, ax = plt.subplots(figsize=(9.5, max(2.2, 0.3 * len(scored) * len(tasks) + 0.35 * len(tasks) + 0.9)))
    colors = _colors(len(runs))
    for j, run in enumerate(scored):
        values = run.task_scores(kind)
        ys = [i + j * bar for i in range(len(tasks))]
        xs = [values[t][1] if t in values else 0.0 for t in tasks]
        ax.barh(ys, xs, height=bar * 0.9, color=colors[run.number - 1], label=run.legend)
        for y, t, v in zip(ys, tasks, xs):
            ax.text(v, y, f" {_sig(v)}" if t in values else " n/a", va="center", fontsize=7)
    ax.set_yticks([i + bar * (len(scored) - 1) / 2 for i in range(len(tasks))],
                  [_wrap(f"{t} ({m})") for t, m in tasks.items()], fontsize=8)
    ax.set_ylim(len(tasks) - 1 + (len(scored) - 0.5) * bar + gap / 2, -bar / 2 - gap / 2)  # first task on top
    top = max([v for r in scored for _m, v in r.task_scores(kind).values()] + [1.0])
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("score (higher is better)", fontsize=9)
    ax.set_title(EVAL_KINDS[kind][1], fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    _legend_outside(fig, [ax], runs)
    fig.tight_layout()
    return fig


def plot_budget_and_memory(runs: list[RunLog]):
    plt = matplotlib_agg().pyplot

    budget = [r.budget() for r in runs]
    memory = [r.value(PEAK_MEMORY, reduce="max") for r in runs]
    if not any(u is not None for u, _t in budget) and not any(m is not None for m in memory):
        return None
    fig, (ax_b, ax_m) = plt.subplots(1, 2, figsize=(11, max(2.2, 0.42 * len(runs) + 1.2)))
    names = [_wrap(f"{r.number}  {r.name}", 26) for r in runs]
    for i, (used, total) in enumerate(budget):
        if total:
            ax_b.barh(i, 100.0, color="#e8e8e8", edgecolor="#bbb")
            pct = 100.0 * (used or 0) / total
            ax_b.barh(i, min(pct, 100.0), color="#d62728" if pct >= 100 else "#1f77b4")
            ax_b.text(min(pct, 100.0) + 1, i, f"{pct:.0f}% of {_duration(total)}", va="center", fontsize=8)
        elif used is not None:
            ax_b.text(1, i, f"{_duration(used)} (no budget set)", va="center", fontsize=8)
    ax_b.set_xlim(0, 140)
    ax_b.set_xlabel("budget used (%)", fontsize=9)
    ax_b.set_title("budget clock per run", fontsize=10)
    colors = _colors(len(runs))
    ax_m.barh(range(len(runs)), [m or 0.0 for m in memory], color=[colors[r.number - 1] for r in runs])
    for i, m in enumerate(memory):
        ax_m.text(m or 0.0, i, f" {m:.2f}" if m is not None else " n/a", va="center", fontsize=8)
    ax_m.set_xlim(0, max([m or 0.0 for m in memory] + [0.1]) * 1.25)
    ax_m.set_xlabel("peak memory (GiB)", fontsize=9)
    ax_m.set_title("peak memory", fontsize=10)
    for ax in (ax_b, ax_m):
        ax.set_yticks(range(len(runs)), names, fontsize=8)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def pareto_front(points: list[tuple[float, float]], maximize_x: bool, maximize_y: bool) -> list[int]:
    """Indices of the points no other point beats on both axes, sorted by x."""
    def better_or_equal(a, b):
        ax_ = a[0] >= b[0] if maximize_x else a[0] <= b[0]
        ay = a[1] >= b[1] if maximize_y else a[1] <= b[1]
        return ax_ and ay

    front = [i for i, p in enumerate(points)
             if not any(j != i and better_or_equal(q, p) and q != p for j, q in enumerate(points))]
    return sorted(front, key=lambda i: points[i][0])


def _score(run: RunLog, key: str) -> float | None:
    return run.scores().get(key, run.value((key,)))


def plot_pareto(runs: list[RunLog], score_key: str, maximize: bool):
    plt = matplotlib_agg().pyplot

    scored = [(r, _score(r, score_key)) for r in runs]
    scored = [(r, s) for r, s in scored if s is not None]
    if not scored:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = _colors(len(runs))
    labels_at = []
    for ax, (xlabel, keys, reduce, max_x) in zip(axes, [("tokens/s (median over logged windows)", TOKENS_PER_S,
                                                         "median", True),
                                                        ("peak memory (GiB)", PEAK_MEMORY, "max", False)]):
        at: dict[tuple[float, float], list[RunLog]] = {}
        for run, score in scored:
            x = run.value(keys, reduce=reduce)
            if x is not None:
                at.setdefault((x, score), []).append(run)
                ax.scatter(x, score, s=60, color=colors[run.number - 1], edgecolor="black", linewidth=0.5, zorder=3,
                           label=run.legend)
        labels_at.append((ax, at))
        pts = list(at)
        if pts:
            front = pareto_front(pts, maximize_x=max_x, maximize_y=maximize)
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="gray", zorder=2,
                    label="Pareto front")
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(_wrap(f"{score_key} ({'higher' if maximize else 'lower'} is better)", 40), fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes, runs)
    fig.suptitle("validation score vs speed and memory (numbers: runs)", fontsize=10)
    fig.tight_layout()
    for ax, at in labels_at:  # after the layout, which moves the points
        _label_points(ax, at)
    return fig


def _label_points(ax, at: dict[tuple[float, float], list[RunLog]]) -> None:
    """Run numbers beside the points ("2=3" where runs coincide), moved up until no two overlap."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    placed = []
    for (x, y), group in sorted(at.items()):
        text = ax.annotate("=".join(str(r.number) for r in group), (x, y), xytext=(5, 4), textcoords="offset points",
                           fontsize=8)
        for _ in range(20):
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            dx, dy = text.get_position()
            text.set_position((dx, dy + 9))
        placed.append(text.get_window_extent(renderer))


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.1f}m"
    return f"{seconds:.0f}s"


def render_chart(fig, png: Path) -> str:
    """Save ``fig`` as ``png``; return it as inline SVG with real <text> (a browser can lay the labels out)."""
    matplotlib = matplotlib_agg()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    matplotlib.pyplot.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


# ------------------------------------------------------------------------------------------- table
COLUMNS = ["#", "run", "stage", "lora_r", "lora_alpha", "precision", "quantize", "learning_rate", "steps",
           "val_loss", "val score", "test score", "tokens/s", "MFU %", "peak GiB", "budget used", "stopped by", "status",
           "dir"]


def table_rows(runs: list[RunLog]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        used, total = r.budget()
        mfu = r.value(MFU, reduce="median")
        scores = r.scores()
        status = r.run.status()
        rows.append({
            "#": r.number, "run": r.name, "stage": r.stage, "lora_r": r.config.get("lora_r"),
            "lora_alpha": r.config.get("lora_alpha"), "precision": r.config.get("precision"),
            "quantize": r.config.get("quantize"), "learning_rate": r.config.get("learning_rate"),
            "steps": r.summary.get("steps", status.last_step), "val_loss": r.value(VAL_LOSS),
            # an eval dir passed alongside, else what the evals wrote back to the run (tracking.write_back_summary)
            "val score": scores.get("eval-val:val_score", r.summary.get("val/score")),
            "test score": scores.get("eval-helm:test_score", r.summary.get("test/score")),
            "tokens/s": r.value(TOKENS_PER_S, reduce="median"), "MFU %": None if mfu is None else round(100 * mfu, 2),
            "peak GiB": r.value(PEAK_MEMORY, reduce="max"),
            "budget used": (f"{_percent(100 * used / total)} of {_duration(total)}" if used is not None and total
                            else (_duration(used) if used is not None else None)),
            "stopped by": r.summary.get("stopped_by"), "status": _status_cell(status), "dir": str(r.path),
        })
    return rows


def _status_cell(status: Any) -> str:
    """``finished``, ``running``, ``failed (exit 1)``, ``crashed after step 7 of 12``."""
    if status.state == "crashed":
        return " ".join(w for w in ("crashed", status.progress) if w)
    if status.state == "failed":
        return f"failed (exit {status.exit_code})"
    return status.state


def _percent(pct: float) -> str:
    """``37%``; a step-bounded run that used a sliver of 24 h reads ``0.35%``, not ``0%``."""
    return f"{pct:.0f}%" if pct >= 1 else f"{pct:.2g}%"


def _cell(value: Any) -> str:
    if value is None:
        return "<td class=na>-</td>"
    text = _sig(value) if isinstance(value, float) else str(value)
    return f"<td>{html.escape(text)}</td>"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
 body {{ font-family: "DejaVu Sans", system-ui, sans-serif; margin: 2em; color: #222; max-width: 1500px; }}
 figure.chart {{ margin: .5em 0 1.5em; border: 1px solid #ddd; display: inline-block; max-width: 100%; }}
 figure.chart svg {{ max-width: 100%; height: auto; display: block; }}
 table {{ border-collapse: collapse; font-size: 13px; }}
 th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
 th {{ background: #f3f3f3; }} td.na {{ color: #aaa; }} td:nth-child(2), td:last-child {{ text-align: left; }}
 td:last-child {{ word-break: break-all; max-width: 24em; font-size: 11px; }}
 .note {{ color: #666; font-size: 13px; }}
 .identical {{ background: #fff6d6; border-left: 4px solid #e0b000; padding: .5em 1em; font-size: 14px; }}
 .verdict {{ background: #e8f4ea; border-left: 4px solid #2a8a3a; padding: .5em 1em; font-size: 14px; }}
</style></head>
<body>
<h1>{title}</h1>
<p class=note>{n} run(s), generated {when} by <code>onegpu report</code> from local logs (run.json, metrics.jsonl,
summary.json, results.json). Score: <b>{score}</b> ({direction} is better). Units: MFU in %, memory in GiB,
time in minutes of the budget clock. Numbers 1..{n} name the runs in every chart and in the table.</p>
{notes}
{sections}
<h2>Runs</h2>
<table id="runs"><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
<script>{script}</script>
</body></html>
"""

# Lets a headless browser (and a curious human) check the rendered page: every chart drawn, no two
# labels of a chart overlapping, no chart wider than the window, the table built.
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  function overlap(a, b) {
    var w = Math.min(a.right, b.right) - Math.max(a.left, b.left), h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
    return w > 1 && h > 1;
  }
  var charts = Array.from(document.querySelectorAll("figure.chart")), drawn = 0, overlaps = [], rects = [];
  charts.forEach(function (fig) {
    var svg = fig.querySelector("svg"), box = svg.getBoundingClientRect();
    if (box.width > 50 && box.height > 50 && svg.querySelectorAll("path, rect, use").length > 0) drawn++;
    rects.push([fig.id, Math.round(box.left + scrollX), Math.round(box.top + scrollY), Math.round(box.width), Math.round(box.height)].join(","));
    var texts = Array.from(svg.querySelectorAll("text")).filter(function (t) { return t.textContent.trim(); });
    var boxes = texts.map(function (t) { return t.getBoundingClientRect(); });
    for (var i = 0; i < boxes.length; i++) for (var j = i + 1; j < boxes.length; j++)
      if (overlap(boxes[i], boxes[j])) overlaps.push(fig.id + ": '" + texts[i].textContent + "' x '" + texts[j].textContent + "'");
  });
  var b = document.body;
  b.setAttribute("data-charts", charts.length);
  b.setAttribute("data-charts-drawn", drawn);
  b.setAttribute("data-chart-rects", rects.join(";"));
  b.setAttribute("data-label-overlaps", overlaps.length);
  b.setAttribute("data-label-overlap-list", overlaps.slice(0, 20).join(" | "));
  b.setAttribute("data-too-wide", charts.filter(function (f) { return f.getBoundingClientRect().right > innerWidth + 1; }).length);
  b.setAttribute("data-table-rows", document.querySelectorAll("#runs tbody tr").length);
});
"""


def _sections(runs: list[RunLog], score: str, maximize: bool, out: Path) -> tuple[list[str], list[str]]:
    """HTML sections (heading + inline SVG, or a note) and the names of the charts drawn."""
    sections, drawn = [], []
    for heading, name, make in [
        ("Validation scores per task", "val_tasks", lambda: plot_task_scores(runs, "val")),
        ("Test scores per HELM scenario", "test_scenarios", lambda: plot_task_scores(runs, "test")),
        ("Training and validation loss", "losses", lambda: plot_losses(runs)),
        ("Throughput, MFU and memory over time", "over_time", lambda: plot_over_time(runs)),
        ("Pareto: validation score vs tokens/s and vs peak memory", "pareto", lambda: plot_pareto(runs, score, maximize)),
        ("Budget used and peak memory per run", "budget_memory", lambda: plot_budget_and_memory(runs)),
    ]:
        fig = make()
        if fig is None:
            sections.append(f"<h2>{html.escape(heading)}</h2><p class=note>nothing to plot: the runs logged none of "
                            f"the numbers this chart needs.</p>")
            continue
        svg = render_chart(fig, out / f"{name}.png")
        sections.append(f'<h2>{html.escape(heading)}</h2>\n<figure class=chart id="{name}">{svg}</figure>')
        drawn.append(name)
    return sections, drawn


def report(
    run_dirs: list[Path] | Path,
    out: Path = Path("runs/report"),
    score: str = "val_loss",
    maximize: bool = False,
    title: str = "onegpu run comparison",
) -> Path:
    """Write a self-contained HTML page comparing runs (scores per task, curves, memory, Pareto, table).

    Args:
        run_dirs: one dir, or a list ``'[DIR, DIR, ...]'``: run dirs (``onegpu finetune
            --out_dir``), sweep dirs (``onegpu sweep --out``: stands for all its trials) or eval
            dirs (``results.json``; attached to the fine-tune run whose checkpoint they scored).
        out: output dir: ``index.html`` (charts inline), the same charts as PNGs, ``report.json``.
        score: the validation score on the Pareto plots: a key of the runs' ``summary.json`` /
            metrics (``val_loss``) or of an attached eval (``eval-val:val_score``, ``eval-helm:test_score``).
        maximize: the score is better when higher (accuracy); default lower is better (loss).
        title: page title.
    """
    matplotlib_agg()
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [Path(run_dirs)]
    if not run_dirs:
        raise UserError("no runs given", fix="pass run dirs, e.g. onegpu report runs/sweep-quickstart --out runs/report")
    record_crashes([Path(p) for p in run_dirs])
    runs = load_runs([Path(p) for p in run_dirs])
    if not runs:
        raise UserError("none of the given dirs holds a finished or running run",
                        fix="pass dirs that contain run.json / metrics.jsonl")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections, charts = _sections(runs, score, maximize, out)
    notes, verdicts = identical_runs(runs), sweep_verdicts(runs, score, maximize)
    notes_html = "\n".join([f"<p class=verdict>{html.escape(v['text'])}</p>" for v in verdicts] +
                           [f"<p class=identical>{html.escape(n['text'])}</p>" for n in notes])
    rows = table_rows(runs)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "\n".join("<tr>" + "".join(_cell(row[c]) for c in COLUMNS) + "</tr>" for row in rows)
    page = PAGE.format(title=html.escape(title), n=len(runs), when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       score=html.escape(score), direction="higher" if maximize else "lower", notes=notes_html,
                       sections="\n".join(sections), head=head, body=body, script=CHECK_SCRIPT)
    index = atomic_write_text(out / "index.html", page)
    atomic_write_json(out / "report.json", {"score": score, "maximize": maximize, "charts": charts,
                                            "identical": notes, "sweeps": _finite(verdicts), "runs": _finite(rows)})
    for verdict in verdicts:
        print(verdict["text"])
    print(f"report: {index}")
    return index


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
