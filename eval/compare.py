"""``onegpu eval compare``: the challenge score across runs, and whether validation predicts test.

Score math (as reconstructed from the published finalist scores, ../shared/reference/challenge-api.md):

* per scenario, each run's **mean win rate** against the other runs: the fraction of the other runs
  it beats on that scenario's headline metric (a tie counts one half);
* per run, the **geometric mean** of its win rates across the scenarios of a group (open eval:
  MMLU, TruthfulQA, BIG-bench, GSM8K, BBQ, CNN/DM...; hidden eval: SAMSum, corr2cause, MATH,
  ETHICS), so losing every comparison on one scenario zeroes the group;
* the **challenge score** = 1/3 open + 2/3 hidden when both groups were tested, else the one group.

Win rates need at least two runs; ``abs_score`` (the same geometric means and weighting applied to
the raw scenario values) is reported for every run. The plot puts each run's validation score
(``eval val``'s ``val_score``) against its test score (challenge score, or ``abs_score`` with one
run) with the Pearson and Spearman correlations: if validation gains do not predict test gains,
the validation suite is being over-fitted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from onegpu.errors import UserError

# HELM scenario names (the part of a run name before ':') of the hidden eval; the rest count as open.
HIDDEN_SCENARIOS = {"summarization_samsum", "samsum", "corr2cause", "math", "ethics", "ethics_commonsense",
                    "ethics_deontology", "ethics_justice", "ethics_utilitarianism", "ethics_virtue"}
OPEN_WEIGHT, HIDDEN_WEIGHT = 1 / 3, 2 / 3


# ------------------------------------------------------------------------------------ score math
def win_rates(values: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per run, per scenario: fraction of the *other* runs (that have the scenario) it beats; ties 1/2."""
    out: dict[str, dict[str, float]] = {run: {} for run in values}
    scenarios = sorted({s for per_run in values.values() for s in per_run})
    for scenario in scenarios:
        having = {run: v[scenario] for run, v in values.items() if scenario in v}
        for run, mine in having.items():
            others = [v for r, v in having.items() if r != run]
            if not others:
                continue
            wins = sum(1.0 if mine > o else 0.5 if mine == o else 0.0 for o in others)
            out[run][scenario] = wins / len(others)
    return out


def geometric_mean(xs: list[float]) -> float | None:
    """Geometric mean; 0.0 if any value is 0 (a zero anywhere zeroes the score), None if empty."""
    if not xs:
        return None
    if any(x <= 0 for x in xs):
        return 0.0
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def group_of(scenario: str) -> str:
    return "hidden" if scenario in HIDDEN_SCENARIOS or scenario.startswith(("ethics", "samsum")) else "open"


def challenge_score(per_scenario: dict[str, float]) -> dict[str, float | None]:
    """{open, hidden, score}: geometric mean per group, then 1/3 open + 2/3 hidden (or the one group)."""
    groups: dict[str, list[float]] = {"open": [], "hidden": []}
    for scenario, value in per_scenario.items():
        groups[group_of(scenario)].append(value)
    open_score, hidden_score = geometric_mean(groups["open"]), geometric_mean(groups["hidden"])
    if open_score is not None and hidden_score is not None:
        score = OPEN_WEIGHT * open_score + HIDDEN_WEIGHT * hidden_score
    else:
        score = open_score if open_score is not None else hidden_score
    return {"open": open_score, "hidden": hidden_score, "score": score}


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    return pearson(_ranks(xs), _ranks(ys)) if len(xs) >= 2 else None


# ------------------------------------------------------------------------------------ run dirs
def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's validation and test results: ``results.json`` in the dir or its sub-dirs (2 levels)."""
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} does not exist",
                        fix="pass dirs written by `onegpu eval val`/`onegpu eval helm` (or their parent)")
    found = [run_dir / "results.json"] if (run_dir / "results.json").is_file() else []
    found += sorted(run_dir.glob("*/results.json")) + sorted(run_dir.glob("*/*/results.json"))
    val, test = None, None
    for path in found:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if doc.get("stage") == "eval-val" and val is None:
            val = doc
        elif doc.get("stage") == "eval-helm" and test is None:
            test = doc
    if val is None and test is None:
        raise UserError(f"{run_dir} holds no eval results.json (from `onegpu eval val` or `onegpu eval helm`)",
                        fix="run the evaluations first, or pass their --out dirs")
    return {"name": run_dir.name, "dir": str(run_dir), "val": val, "test": test}


def score_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """All the numbers of a comparison (pure function of the loaded runs; unit-tested)."""
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):  # same leaf name in different places: use the path
        for r in runs:
            r["name"] = r["dir"]
    values = {r["name"]: {s: v["value"] for s, v in (r["test"] or {}).get("scenarios", {}).items()} for r in runs}
    wins = win_rates(values)
    rows = []
    for r in runs:
        name = r["name"]
        absolute = challenge_score(values[name]) if values[name] else {"open": None, "hidden": None, "score": None}
        winning = challenge_score(wins[name]) if wins[name] else {"open": None, "hidden": None, "score": None}
        rows.append({"name": name, "dir": r["dir"],
                     "val_score": (r["val"] or {}).get("val_score"),
                     "test_scenarios": values[name], "win_rates": wins[name],
                     "open_score": winning["open"], "hidden_score": winning["hidden"],
                     "challenge_score": winning["score"], "abs_score": absolute["score"],
                     "abs_open": absolute["open"], "abs_hidden": absolute["hidden"]})
    use_challenge = len(runs) >= 2 and all(r["challenge_score"] is not None for r in rows)
    for row in rows:
        row["test_score"] = row["challenge_score"] if use_challenge else row["abs_score"]
    paired = [(r["val_score"], r["test_score"]) for r in rows if r["val_score"] is not None
              and r["test_score"] is not None]
    xs, ys = [p[0] for p in paired], [p[1] for p in paired]
    return {"runs": rows, "test_score_kind": "challenge_score" if use_challenge else "abs_score",
            "correlation": {"n": len(paired), "pearson": pearson(xs, ys), "spearman": spearman(xs, ys)}}


def plot_val_vs_test(scored: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["val_score"], r["test_score"], r["name"]) for r in scored["runs"]
           if r["val_score"] is not None and r["test_score"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _table(scored: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    scenarios = sorted({s for r in scored["runs"] for s in r["test_scenarios"]})
    columns = ["run", "val_score", *scenarios, "open", "hidden", "challenge_score", "abs_score"]
    rows = []
    for r in scored["runs"]:
        cells = [f"{r['test_scenarios'][s]:.3f} ({r['win_rates'][s]:.2f})" if s in r["win_rates"]
                 else (f"{r['test_scenarios'][s]:.3f}" if s in r["test_scenarios"] else "-") for s in scenarios]
        rows.append([Path(r["name"]).name, r["val_score"], *cells, r["open_score"], r["hidden_score"],
                     r["challenge_score"], r["abs_score"]])
    return columns, rows


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------ the verb
def compare(run_dirs: list[Path] | Path, out: Path = Path("runs/eval-compare")) -> dict:
    """Challenge score per run (win rates, geometric mean, open/hidden weighting) and a val-vs-test plot.

    Args:
        run_dirs: dirs written by ``onegpu eval val`` / ``onegpu eval helm``, or parents holding both
            (e.g. one dir per fine-tuning run with ``eval-val/`` and ``eval-helm/`` inside), as a
            list (``'[runs/a, runs/b]'``) or one dir.
        out: where ``results.json``, ``val_vs_test.png`` and the W&B run go.
    """
    from onegpu.tracking import Run

    if isinstance(run_dirs, (str, Path)):
        run_dirs = [Path(run_dirs)]
    if not run_dirs:
        raise UserError("no run dirs given", fix="onegpu eval compare RUN_DIR [RUN_DIR ...] --out DIR")
    runs = [load_run(Path(d)) for d in run_dirs]
    scored = score_runs(runs)
    out = Path(out)
    run = Run("eval-compare", out, {"run_dirs": [str(d) for d in run_dirs]}, tags=["eval", "compare"])
    exit_code = 1
    try:
        for r in runs:
            test = r["test"] or r["val"] or {}
            if test.get("checkpoint"):
                run.use_input(name=f"eval-{Path(r['dir']).name}", type="evaluation",
                              digest=str(test.get("checkpoint_digest")), path=r["dir"])
        png = plot_val_vs_test(scored, out / "val_vs_test.png")
        scored["plot"] = str(png) if png else None
        (out / "results.json").write_text(json.dumps({"stage": "eval-compare", **scored}, indent=2), encoding="utf-8")
        columns, rows = _table(scored)
        run.log_table("compare", columns, rows)
        if png:
            run.log_image("val_vs_test", png)
        run.summary(**{f"correlation_{k}": v for k, v in scored["correlation"].items()})
        widths = [max(len(_fmt(x)) for x in col) for col in zip(columns, *rows)]
        for line in [columns, ["-" * w for w in widths], *rows]:
            print("  ".join(_fmt(c).ljust(w) for c, w in zip(line, widths)))
        corr = scored["correlation"]
        print(f"\nvalidation vs test over {corr['n']} runs: pearson {_fmt(corr['pearson'])}, spearman "
              f"{_fmt(corr['spearman'])}  (test = {scored['test_score_kind']}; cells: value (win rate))")
        print(f"plot: {png}\nresults: {out / 'results.json'}")
        exit_code = 0
        return scored
    finally:
        run.finish(exit_code=exit_code)
