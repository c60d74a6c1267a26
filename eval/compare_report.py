"""The engine of ``onegpu eval compare`` (``eval/compare.py``): a scored comparison written out, tracked:
``results.json``, the validation-vs-test plot, the table printed and logged, a new field file if asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from onegpu.contracts import atomic_path, atomic_write_json
from onegpu.eval.compare import field_doc
from onegpu.tables import text_table
from onegpu.tracking import Run


def write_comparison(run_dirs: list[Path], runs: list[dict[str, Any]], reference: dict[str, Any] | None,
                     scored: dict[str, Any], out: Path, save_field: Path | None) -> dict:
    """``onegpu eval compare`` (its options and scoring: ``eval/compare.py``): ``scored`` written to ``out``,
    in one tracked run; returns it, with the plot's path."""
    config = {"run_dirs": [str(d) for d in run_dirs], "field": (reference or {}).get("path")}
    with Run("eval-compare", out, config, tags=["eval", "compare"],
             after_interrupt="comparing again: compare does not resume (it only reads results, in seconds)") as run:
        for r in runs:
            test = r["test"] or r["val"] or {}
            if test.get("checkpoint"):
                run.use_input(name=f"eval-{Path(r['dir']).name}", type="evaluation",
                              digest=str(test.get("checkpoint_digest")), path=r["dir"])
        png = plot_val_vs_test(scored, out / "val_vs_test.png")
        scored["plot"] = str(png) if png else None
        atomic_write_json(out / "results.json", {"stage": "eval-compare", **scored})
        if save_field:
            atomic_write_json(save_field, field_doc(runs, reference, source=f"onegpu eval compare {config}"))
            print(f"[onegpu] field with {len(runs)} more entr(ies) written to {save_field}")
        columns, rows = _table(scored)
        run.log_table("compare", columns, rows)
        if png:
            run.log_image("val_vs_test", png)
        run.summary(**{f"correlation_{k}": v for k, v in scored["correlation"].items()},
                    **{f"challenge_score/{Path(r['name']).name}": r["challenge_score"] for r in scored["runs"]})
        _print_report(scored, columns, rows, out)
        return scored


def plot_val_vs_test(scored: dict[str, Any], path: Path) -> Path | None:
    pts = [(r["val_score"], r["test_score"], r["name"]) for r in scored["runs"]
           if r["val_score"] is not None and r["test_score"] is not None]
    fig = Figure(figsize=(6, 4.5))  # no pyplot: a file, never a window, whatever backend is set
    ax = fig.subplots()
    for x, y, name in pts:
        ax.scatter([x], [y], s=40)
        ax.annotate(Path(name).name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(pts) >= 2:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if max(xs) > min(xs):
            n = len(xs)
            mx, my = sum(xs) / n, sum(ys) / n
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            ax.plot([min(xs), max(xs)], [my + slope * (min(xs) - mx), my + slope * (max(xs) - mx)], "--", lw=1)
    corr = scored["correlation"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    ax.set_title(f"validation vs test ({len(pts)} runs): pearson {fmt(corr['pearson'])}, "
                 f"spearman {fmt(corr['spearman'])}", fontsize=10)
    ax.set_xlabel("validation score (eval val: mean primary metric)")
    ax.set_ylabel(f"test score ({scored['test_score_kind']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _table(scored: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Your runs, then the field's entries; a cell is ``value (win rate)`` per scenario."""
    scenarios = sorted({s for r in scored["runs"] for s in r["test_scenarios"]})
    columns = ["run", "val_score", *scenarios, "open", "hidden", "challenge_score", "abs_score"]
    rows = []
    for r in scored["runs"] + scored["field"]:
        cells = [f"{_fmt(r['test_scenarios'][s], 3)} ({r['win_rates'][s]:.2f})" if s in r["win_rates"]
                 else (_fmt(r["test_scenarios"][s], 3) if s in r["test_scenarios"] else "-") for s in scenarios]
        name = r["name"] if r["name"].startswith("field:") else Path(r["name"]).name
        rows.append([name[:40], r["val_score"], *cells, r["open_score"], r["hidden_score"],
                     r["challenge_score"], r["abs_score"]])
    return columns, rows


def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _print_report(scored: dict[str, Any], columns: list[str], rows: list[list[Any]], out: Path) -> None:
    print(text_table(columns, rows, cell=_fmt))
    field = f"the field {scored['field_name']} ({len(scored['field'])} entries) + " if scored["field"] else ""
    print(f"\nwin rates among {field}{len(scored['runs'])} run(s); cells: value (win rate)")
    for r in scored["runs"]:
        missing = f"; not tested (not in its score): {', '.join(r['missing'])}" if r["missing"] else ""
        rank = f", rank {r['rank']} of {scored['entries']}" if r.get("rank") else ""
        print(f"  {Path(r['name']).name}: challenge score {_fmt(r['challenge_score'])}{rank}{missing}")
    corr = scored["correlation"]
    print(f"validation vs test over {corr['n']} runs: pearson {_fmt(corr['pearson'])}, spearman "
          f"{_fmt(corr['spearman'])}  (test = {scored['test_score_kind']})")
    print(f"plot: {scored['plot']}\nresults: {out / 'results.json'}")
