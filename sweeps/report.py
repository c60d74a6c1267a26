"""``onegpu report``: one self-contained HTML page comparing runs, from their local logs only.

Reads what every stage writes (``run.json``, ``metrics.jsonl``, ``summary.json``, eval
``results.json``), no W&B account or network. The page answers the sweep question: which
rank x precision x quantization gives the best validation score per hour of budget and per GiB —
loss / validation curves, tokens/s, MFU, peak memory, a budget bar per run, the Pareto plots of
validation score vs tokens/s and vs peak memory, and the run table. PNGs are embedded (base64) and
also written beside ``index.html``; ``report.json`` holds the table as data.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onegpu.contracts import find_run_dirs, read_json, read_jsonl
from onegpu.errors import UserError

# Where each number lives in what the stages log (first key found wins).
TRAIN_LOSS = ("loss", "train_loss", "train/loss")
VAL_LOSS = ("val_loss", "val/loss")
TOKENS_PER_S = ("tokens_per_s", "tokens_per_sec", "throughput/tokens_per_s")
MFU = ("mfu", "throughput/mfu")
PEAK_MEMORY = ("peak_memory_gib", "mem/cuda_peak_allocated_gib", "mem/cuda_peak_reserved_gib", "mem/peak_rss_gib")


@dataclass
class RunLog:
    path: Path
    name: str
    stage: str
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    results: dict[str, Any] = field(default_factory=dict)  # eval scores attached to this run

    def series(self, keys: tuple[str, ...]) -> tuple[list[float], list[float]]:
        for key in keys:
            pts = [(r.get("_step") if r.get("_step") is not None else i, r[key]) for i, r in enumerate(self.rows)
                   if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
            if pts:
                return [p[0] for p in pts], [float(p[1]) for p in pts]
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
        c = self.config
        parts = []
        if c.get("lora_r") is not None:
            parts.append(f"r{c['lora_r']}")
        if c.get("precision"):
            parts.append(str(c["precision"]))
        if c.get("quantize"):
            parts.append(str(c["quantize"]).removeprefix("bnb."))
        return " ".join(parts) or self.stage

    def budget(self) -> tuple[float | None, float | None]:
        """(seconds used, seconds available) of the run's budget clock."""
        used = self.summary.get("budget_elapsed_s")
        total = self.summary.get("budget_s")
        if used is None:
            _s, wall = self.series(("wall_clock_s",))
            used = wall[-1] if wall else None
        return used, total


def load_run(path: Path) -> RunLog:
    meta = read_json(path / "run.json")
    config = meta.get("config", {}) if isinstance(meta.get("config"), dict) else {}
    name = config.get("run_name") or path.name
    if path.name.startswith("trial-") or name == "final":
        name = f"{path.parent.name}/{path.name}"
    return RunLog(path=path, name=str(name), stage=str(meta.get("stage", "?")), config=config,
                  summary=read_json(path / "summary.json"), rows=read_jsonl(path / "metrics.jsonl"),
                  results=read_json(path / "results.json"))


def _attach_evals(runs: list[RunLog]) -> list[RunLog]:
    """Eval runs (results.json) whose checkpoint lies in a fine-tune run dir become that run's scores."""
    def is_eval(r: RunLog) -> bool:
        return r.stage.startswith("eval") or (bool(r.results) and not r.rows)

    train = [r for r in runs if not is_eval(r)]
    kept = list(train)
    for ev in (r for r in runs if is_eval(r)):
        ckpt = str(ev.config.get("checkpoint") or ev.config.get("checkpoint_dir") or "")
        owner = next((t for t in train if ckpt and Path(ckpt).resolve().is_relative_to(t.path.resolve())), None)
        scores = _scores(ev.summary) or _scores(ev.results)
        if owner is not None:
            owner.results.update({f"{ev.stage}:{k}": v for k, v in scores.items()})
        else:
            ev.results = scores
            kept.append(ev)
    return kept


def _scores(doc: dict[str, Any]) -> dict[str, float]:
    """Headline numbers of an eval: its summary.json, else results.json's ``summary`` block or top-level numbers."""
    block = doc.get("summary") if isinstance(doc.get("summary"), dict) else doc
    return {k: float(v) for k, v in block.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not k.endswith(("_s", "wall_s"))}


# ------------------------------------------------------------------------------------------ plots
def _fig_to_png(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_curves(runs: list[RunLog], path: Path) -> str | None:
    import matplotlib.pyplot as plt

    panels = [("training loss", TRAIN_LOSS), ("validation loss", VAL_LOSS), ("tokens/s", TOKENS_PER_S), ("MFU", MFU)]
    if not any(r.series(keys)[1] for r in runs for _t, keys in panels):
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, keys) in zip(axes.flat, panels):
        for run, color in zip(runs, _colors(len(runs))):
            xs, ys = run.series(keys)
            if ys:
                ax.plot(xs, ys, marker="o" if len(ys) < 12 else None, ms=3, color=color, label=f"{run.name} ({run.label})")
        ax.set_title(title)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.06))
    fig.tight_layout()
    return _fig_to_png(fig, path)


def plot_budget_and_memory(runs: list[RunLog], path: Path) -> str | None:
    import matplotlib.pyplot as plt

    budget = [(r, *r.budget()) for r in runs]
    memory = [(r, r.value(PEAK_MEMORY, reduce="max")) for r in runs]
    if not any(u is not None for _r, u, _t in budget) and not any(m is not None for _r, m in memory):
        return None
    height = max(2.5, 0.45 * len(runs) + 1.2)
    fig, (ax_b, ax_m) = plt.subplots(1, 2, figsize=(12, height))
    names = [r.name for r in runs]
    for i, (_run, used, total) in enumerate(budget):
        if total:
            ax_b.barh(i, 100.0, color="#e8e8e8", edgecolor="#bbb")
            pct = 100.0 * (used or 0) / total
            ax_b.barh(i, min(pct, 100.0), color="#d62728" if pct >= 100 else "#1f77b4")
            ax_b.text(min(pct, 100.0) + 1, i, f"{pct:.0f}% of {_duration(total)}", va="center", fontsize=8)
        elif used is not None:
            ax_b.text(1, i, f"{_duration(used)} (no budget set)", va="center", fontsize=8)
    ax_b.set_yticks(range(len(names)), names, fontsize=8)
    ax_b.set_xlim(0, 130)
    ax_b.set_xlabel("budget used (%)")
    ax_b.set_title("budget clock per run")
    ax_b.invert_yaxis()
    vals = [m or 0.0 for _r, m in memory]
    ax_m.barh(range(len(names)), vals, color=_colors(len(runs)))
    for i, v in enumerate(vals):
        ax_m.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax_m.set_yticks(range(len(names)), names, fontsize=8)
    ax_m.set_xlabel("peak memory (GiB)")
    ax_m.set_title("peak memory")
    ax_m.invert_yaxis()
    fig.tight_layout()
    return _fig_to_png(fig, path)


def pareto_front(points: list[tuple[float, float]], maximize_x: bool, maximize_y: bool) -> list[int]:
    """Indices of the points no other point beats on both axes, sorted by x."""
    def better_or_equal(a, b):
        ax_ = a[0] >= b[0] if maximize_x else a[0] <= b[0]
        ay = a[1] >= b[1] if maximize_y else a[1] <= b[1]
        return ax_ and ay

    front = [i for i, p in enumerate(points)
             if not any(j != i and better_or_equal(q, p) and q != p for j, q in enumerate(points))]
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(runs: list[RunLog], score_key: str, maximize: bool, path: Path) -> str | None:
    import matplotlib.pyplot as plt

    scored = [(r, r.value((score_key,)) if score_key not in r.results else r.results[score_key]) for r in runs]
    scored = [(r, s) for r, s in scored if s is not None]
    if not scored:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ranks = sorted({str(r.config.get("lora_r", "?")) for r, _s in scored}, key=lambda v: (len(v), v))
    precisions = sorted({f"{r.config.get('precision') or '?'}" + (f"+{r.config['quantize']}" if r.config.get("quantize") else "")
                         for r, _s in scored})
    colors = dict(zip(ranks, _colors(len(ranks))))
    markers = dict(zip(precisions, "osD^v<>Pp*hX"))
    for ax, (xlabel, keys, reduce, max_x) in zip(axes, [("tokens/s (median over logged windows)", TOKENS_PER_S, "median", True),
                                                        ("peak memory (GiB)", PEAK_MEMORY, "max", False)]):
        pts, shown = [], []
        for run, score in scored:
            x = run.value(keys, reduce=reduce)
            if x is None:
                continue
            prec = f"{run.config.get('precision') or '?'}" + (f"+{run.config['quantize']}" if run.config.get("quantize") else "")
            ax.scatter(x, score, s=60, color=colors[str(run.config.get("lora_r", "?"))], marker=markers.get(prec, "o"),
                       edgecolor="black", linewidth=0.5, zorder=3)
            ax.annotate(run.name, (x, score), fontsize=7, xytext=(4, 3), textcoords="offset points")
            pts.append((x, score))
            shown.append(run)
        if pts:
            front = pareto_front(pts, maximize_x=max_x, maximize_y=maximize)
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="gray", zorder=2,
                    label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{score_key} ({'higher' if maximize else 'lower'} is better)")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    legend = [Line2D([], [], marker="o", ls="", color=colors[r], label=f"rank {r}") for r in ranks]
    legend += [Line2D([], [], marker=markers[p], ls="", color="gray", label=p) for p in precisions]
    legend.append(Line2D([], [], ls="--", color="gray", label="Pareto front"))
    fig.legend(handles=legend, loc="upper center", ncol=min(6, len(legend)), fontsize=8, bbox_to_anchor=(0.5, 1.08))
    fig.suptitle("validation score vs speed and memory, by rank x precision", y=1.13)
    fig.tight_layout()
    return _fig_to_png(fig, path)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.1f}m"
    return f"{seconds:.0f}s"


# ------------------------------------------------------------------------------------------- table
COLUMNS = ["run", "stage", "lora_r", "lora_alpha", "precision", "quantize", "learning_rate", "steps", "val_loss",
           "tokens/s", "MFU", "peak GiB", "budget used", "stopped by", "scores", "dir"]


def table_rows(runs: list[RunLog]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        used, total = r.budget()
        mfu = r.value(MFU, reduce="median")
        rows.append({
            "run": r.name, "stage": r.stage, "lora_r": r.config.get("lora_r"), "lora_alpha": r.config.get("lora_alpha"),
            "precision": r.config.get("precision"), "quantize": r.config.get("quantize"),
            "learning_rate": r.config.get("learning_rate"), "steps": r.summary.get("steps"),
            "val_loss": r.value(VAL_LOSS), "tokens/s": r.value(TOKENS_PER_S, reduce="median"),
            "MFU": None if mfu is None else f"{100 * mfu:.1f}%", "peak GiB": r.value(PEAK_MEMORY, reduce="max"),
            "budget used": (f"{100 * used / total:.0f}% of {_duration(total)}" if used is not None and total
                            else (_duration(used) if used is not None else None)),
            "stopped by": r.summary.get("stopped_by"),
            "scores": ", ".join(f"{k}={v:.4g}" for k, v in _scores(r.results).items()) if r.results else None,
            "dir": str(r.path),
        })
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "<td class=na>-</td>"
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return f"<td>{html.escape(text)}</td>"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
 img {{ max-width: 100%; border: 1px solid #ddd; margin: .5em 0 1.5em; }}
 table {{ border-collapse: collapse; font-size: 13px; }}
 th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
 th {{ background: #f3f3f3; }} td.na {{ color: #aaa; }} td:first-child, td:last-child {{ text-align: left; }}
 .note {{ color: #666; font-size: 13px; }}
</style></head>
<body>
<h1>{title}</h1>
<p class=note>{n} run(s), generated {when} by <code>onegpu report</code> from local logs (run.json, metrics.jsonl,
summary.json, results.json). Score: <b>{score}</b> ({direction} is better).</p>
{sections}
<h2>Runs</h2>
<table id="runs"><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
<script>
// Lets a headless browser (and a curious human) check that every plot decoded and the table is there.
window.addEventListener("load", function () {{
  var imgs = Array.from(document.images);
  document.body.setAttribute("data-images", imgs.length);
  document.body.setAttribute("data-images-rendered", imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length);
  document.body.setAttribute("data-table-rows", document.querySelectorAll("#runs tbody tr").length);
}});
</script>
</body></html>
"""


def report(
    run_dirs: list[Path] | Path,
    out: Path = Path("runs/report"),
    score: str = "val_loss",
    maximize: bool = False,
    title: str = "onegpu run comparison",
) -> Path:
    """Write a self-contained HTML page comparing runs (curves, budget, memory, Pareto, table).

    Args:
        run_dirs: one dir, or a list ``'[DIR, DIR, ...]'``: run dirs (``onegpu finetune
            --out_dir``), sweep dirs (``onegpu sweep --out``: stands for all its trials) or eval
            dirs (``results.json``; attached to the fine-tune run whose checkpoint they scored).
        out: output dir: ``index.html`` (PNGs embedded), the same PNGs beside it, ``report.json``.
        score: the validation score on the Pareto plots: a key of the runs' ``summary.json`` /
            metrics (``val_loss``) or of an attached eval's results (``eval:KEY``).
        maximize: the score is better when higher (accuracy); default lower is better (loss).
        title: page title.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [Path(run_dirs)]
    if not run_dirs:
        raise UserError("no runs given", fix="pass run dirs, e.g. onegpu report runs/sweep-quickstart --out runs/report")
    runs = _attach_evals([load_run(p) for p in find_run_dirs([Path(p) for p in run_dirs])])
    if not runs:
        raise UserError("none of the given dirs holds a finished or running run",
                        fix="pass dirs that contain run.json / metrics.jsonl")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for heading, name, make in [
        ("Training and validation curves, throughput, MFU", "curves.png", lambda p: plot_curves(runs, p)),
        ("Pareto: validation score vs tokens/s and vs peak memory", "pareto.png",
         lambda p: plot_pareto(runs, score, maximize, p)),
        ("Budget used and peak memory per run", "budget_memory.png", lambda p: plot_budget_and_memory(runs, p)),
    ]:
        png = make(out / name)
        if png is None:
            sections.append(f"<h2>{html.escape(heading)}</h2><p class=note>nothing to plot: the runs logged none of "
                            f"the metrics this plot needs.</p>")
        else:
            sections.append(f'<h2>{html.escape(heading)}</h2>\n<img alt="{html.escape(name)}" '
                            f'src="data:image/png;base64,{png}">')
    rows = table_rows(runs)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "\n".join("<tr>" + "".join(_cell(row[c]) for c in COLUMNS) + "</tr>" for row in rows)
    page = PAGE.format(title=html.escape(title), n=len(runs), when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       score=html.escape(score), direction="higher" if maximize else "lower",
                       sections="\n".join(sections), head=head, body=body)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    (out / "report.json").write_text(json.dumps({"score": score, "maximize": maximize, "runs": rows}, indent=2,
                                                default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)),
                                     encoding="utf-8")
    print(f"report: {index}")
    return index
