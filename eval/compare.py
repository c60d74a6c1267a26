"""``onegpu eval compare``: the challenge score across runs, and whether validation predicts test.

The score is the organizers' own, reproduced exactly from their published final-round tables
(``eval/fields/``; ``tests/test_eval_compare.py`` recomputes every finalist's published score):

* **scenarios** as the organizers grouped them: open = MMLU, TruthfulQA, BIG-bench, GSM8K, BBQ;
  hidden = SAMSum (HELM's ``summarization_samsum`` / ``samsum``, the challenge fork's ``sam_sum``),
  corr2cause, MATH (chain of thought), ETHICS (its five subsets are ONE scenario). Other scenarios
  (CNN/DM, synthetic reasoning, ...) are shown but do not count.
* **columns**: a scenario's win rate is the mean over its columns of the run's win rate in each:
  the headline metric, plus HELM's robustness and fairness EM where HELM reports them (MMLU,
  TruthfulQA, each ETHICS subset), plus SAMSum's four bias metrics (stereotypes and
  representation, race and gender; lower is better). ETHICS's value is the mean of its subsets.
* **win rate** in a column, among the n entries that have it (the run itself included): (entries
  it beats + 1/k if it ties with k-1 others) / n; an entry that produced no value counts as 0 (last
  on a lower-is-better column). Columns with fewer than two entries are skipped.
* per run, the **geometric mean** of its scenario win rates over the open and over the hidden
  scenarios (a zero anywhere zeroes the group); **challenge score** = 1/3 open + 2/3 hidden
  (or the one group tested).

Win rates need other entries: ``--field`` adds a reference field to every comparison, by
default the A100 track's nine finalists (``eval/fields/neurips2023-a100-40gb.json``), so one run
gets the rank it would have had. ``abs_score`` applies the same geometric means and weighting to
the raw scenario values. The plot puts each run's validation score (``eval val``'s
``val_score``) against its test score with the Pearson and Spearman correlations: if validation
gains do not predict test gains, the validation suite is being over-fitted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from onegpu.contracts import read_json
from onegpu.errors import UserError

OPEN_SCENARIOS = ("mmlu", "truthful_qa", "big_bench", "gsm", "bbq")
HIDDEN_SCENARIOS = ("sam_sum", "corr2cause", "math", "ethics")
SCENARIO_ALIASES = {"summarization_samsum": "sam_sum", "samsum": "sam_sum"}  # HELM's names -> the fork's
LOWER_IS_BETTER = ("stereotypes_", "representation_")  # HELM's bias columns
OPEN_WEIGHT, HIDDEN_WEIGHT = 1 / 3, 2 / 3
FIELDS_DIR = Path(__file__).resolve().parent / "fields"
DEFAULT_FIELD = "neurips2023-a100-40gb"


# ------------------------------------------------------------------------------------ scenarios
def challenge_scenario(helm_scenario: str) -> tuple[str, str]:
    """(challenge scenario, column prefix) of a HELM scenario name: ``ethics_justice`` -> (ethics, justice/)."""
    if helm_scenario.startswith("ethics_"):
        return "ethics", helm_scenario[len("ethics_"):] + "/"
    return SCENARIO_ALIASES.get(helm_scenario, helm_scenario), ""


def group_of(scenario: str) -> str | None:
    """open / hidden for the challenge's scenarios, None for the rest (shown, not scored)."""
    name = challenge_scenario(scenario)[0]
    return "open" if name in OPEN_SCENARIOS else "hidden" if name in HIDDEN_SCENARIOS else None


def run_columns(test: dict[str, Any] | None) -> dict[str, dict[str, float | None]]:
    """{challenge scenario: {column: value}} from an ``eval helm`` results.json."""
    out: dict[str, dict[str, float | None]] = {}
    for helm_scenario, entry in ((test or {}).get("scenarios") or {}).items():
        scenario, prefix = challenge_scenario(helm_scenario)
        columns = entry.get("columns") or {"main": entry.get("value")}
        out.setdefault(scenario, {}).update({prefix + c: v for c, v in columns.items()})
    return out


def scenario_value(columns: dict[str, float | None]) -> float | None:
    """The headline value: the ``main`` column, or the mean of the subsets' (ETHICS)."""
    if "main" in columns:
        return columns["main"]
    mains = [v for c, v in columns.items() if c.endswith("/main") and v is not None]
    return sum(mains) / len(mains) if mains else None


# ------------------------------------------------------------------------------------ score math
def column_win_rates(values: dict[str, float | None], lower_is_better: bool = False) -> dict[str, float]:
    """The organizers' win rate in one column: (beaten + 1/k on a k-way tie) / n, missing = last."""
    if len(values) < 2:
        return {}
    if lower_is_better:  # compare on -value; a missing value is last
        filled = {run: -math.inf if v is None else -v for run, v in values.items()}
    else:  # a missing value is a score of 0 (ties with real zeros, as in the published tables)
        filled = {run: 0.0 if v is None else v for run, v in values.items()}
    out = {}
    for run, mine in filled.items():
        beaten = sum(1 for other, v in filled.items() if other != run and v < mine)
        tied = sum(1 for v in filled.values() if v == mine)
        out[run] = (beaten + (1 / tied if tied > 1 else 0.0)) / len(filled)
    return out


def win_rates(columns: dict[str, dict[str, dict[str, float | None]]]) -> dict[str, dict[str, float]]:
    """Per run, per scenario: the mean of its column win rates among the entries that have the column."""
    per_column: dict[str, dict[str, list[float]]] = {run: {} for run in columns}
    keys = sorted({(s, c) for per_run in columns.values() for s, cols in per_run.items() for c in cols})
    for scenario, column in keys:
        having = {run: cols[scenario][column] for run, cols in columns.items()
                  if column in cols.get(scenario, {})}
        lower = column.rsplit("/", 1)[-1].startswith(LOWER_IS_BETTER)
        for run, rate in column_win_rates(having, lower).items():
            per_column[run].setdefault(scenario, []).append(rate)
    return {run: {s: sum(r) / len(r) for s, r in scen.items()} for run, scen in per_column.items()}


def geometric_mean(xs: list[float]) -> float | None:
    """Geometric mean; 0.0 if any value is 0 (a zero anywhere zeroes the score), None if empty."""
    if not xs:
        return None
    if any(x <= 0 for x in xs):
        return 0.0
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def challenge_score(per_scenario: dict[str, float | None]) -> dict[str, Any]:
    """{open, hidden, score, missing}: geometric mean per group, then 1/3 open + 2/3 hidden (or the one group)."""
    groups: dict[str, list[float]] = {"open": [], "hidden": []}
    for scenario, value in per_scenario.items():
        group = group_of(scenario)
        if group and value is not None:
            groups[group].append(value)
    open_score, hidden_score = geometric_mean(groups["open"]), geometric_mean(groups["hidden"])
    if open_score is not None and hidden_score is not None:
        score = OPEN_WEIGHT * open_score + HIDDEN_WEIGHT * hidden_score
    else:
        score = open_score if open_score is not None else hidden_score
    missing = [s for s in OPEN_SCENARIOS + HIDDEN_SCENARIOS if s not in per_scenario]
    return {"open": open_score, "hidden": hidden_score, "score": score, "missing": missing}


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


# ------------------------------------------------------------------------------------ runs and fields
def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's validation and test results: ``results.json`` in the dir or its sub-dirs (2 levels)."""
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} does not exist",
                        fix="pass dirs written by `onegpu eval val`/`onegpu eval helm` (or their parent)")
    found = [run_dir / "results.json"] if (run_dir / "results.json").is_file() else []
    found += sorted(run_dir.glob("*/results.json")) + sorted(run_dir.glob("*/*/results.json"))
    val, test = None, None
    for path in found:
        doc = read_json(path)
        if doc.get("stage") == "eval-val" and val is None:
            val = doc
        elif doc.get("stage") == "eval-helm" and test is None:
            test = doc
    if val is None and test is None:
        raise UserError(f"{run_dir} holds no eval results.json (from `onegpu eval val` or `onegpu eval helm`)",
                        fix="run the evaluations first, or pass their --out dirs")
    return {"name": run_dir.name, "dir": str(run_dir), "val": val, "test": test, "columns": run_columns(test)}


def known_fields() -> list[str]:
    return sorted(p.stem for p in FIELDS_DIR.glob("*.json"))


def load_field(field: str | Path | None) -> dict[str, Any] | None:
    """A reference field by name (``eval/fields/NAME.json``) or path; None for ``none``."""
    if field is None or str(field).lower() in ("none", ""):
        return None
    path = Path(field).expanduser()
    if not path.is_file():
        path = FIELDS_DIR / f"{field}.json"
    if not path.is_file():
        raise UserError(f"unknown field {field!r}", fix=f"use one of: {', '.join(known_fields())}, none, or the "
                                                        "path of a field JSON (see docs/evaluation.md, `eval compare --field`)")
    doc = read_json(path)
    entries = doc.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("name") and
                                                isinstance(e.get("scenarios"), dict) for e in entries):
        raise UserError(f"field {path} has no valid `entries` list",
                        fix="each entry needs a `name` and `scenarios: {scenario: {column: value}}`")
    return {**doc, "path": str(path)}


def field_doc(runs: list[dict[str, Any]], field: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """A field file: the current field's entries plus these runs' test results (for ``--save_field``)."""
    entries = list((field or {}).get("entries") or [])
    entries += [{"name": r["name"], "scenarios": r["columns"], "source": r["dir"]} for r in runs if r["columns"]]
    return {"name": "custom", "description": "a reference field for `onegpu eval compare --field`",
            "source": source, "entries": entries}


def score_runs(runs: list[dict[str, Any]], field: dict[str, Any] | None = None) -> dict[str, Any]:
    """All the numbers of a comparison (pure function of the loaded runs and field; unit-tested)."""
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):  # same leaf name in different places: use the path
        for r in runs:
            r["name"] = r["dir"]
    entries = [{"name": f"field:{e['name']}", "dir": None, "val": None, "columns": e["scenarios"],
                "published": e.get("published")} for e in (field or {}).get("entries", [])]
    everyone = runs + entries
    wins = win_rates({r["name"]: r["columns"] for r in everyone})
    rows = [_score_row(r, wins[r["name"]]) for r in everyone]
    user_rows = rows[:len(runs)]
    use_challenge = len(everyone) >= 2 and all(r["challenge_score"] is not None for r in user_rows)
    for row in rows:
        row["test_score"] = row["challenge_score"] if use_challenge else row["abs_score"]
    ranked = sorted((r for r in rows if r["challenge_score"] is not None), key=lambda r: -r["challenge_score"])
    for row in user_rows:
        row["rank"] = next((i + 1 for i, r in enumerate(ranked) if r is row), None)
    paired = [(r["val_score"], r["test_score"]) for r in user_rows if r["val_score"] is not None
              and r["test_score"] is not None]
    xs, ys = [p[0] for p in paired], [p[1] for p in paired]
    return {"runs": user_rows, "field": rows[len(runs):], "field_name": (field or {}).get("name"),
            "field_source": (field or {}).get("source"), "entries": len(ranked),
            "test_score_kind": "challenge_score" if use_challenge else "abs_score",
            "correlation": {"n": len(paired), "pearson": pearson(xs, ys), "spearman": spearman(xs, ys)}}


def _score_row(run: dict[str, Any], wins: dict[str, float]) -> dict[str, Any]:
    values = {s: scenario_value(cols) for s, cols in run["columns"].items()}
    absolute = challenge_score(values)
    winning = challenge_score(wins)
    row = {"name": run["name"], "dir": run["dir"], "val_score": (run["val"] or {}).get("val_score"),
           "test_scenarios": values, "win_rates": wins, "open_score": winning["open"],
           "hidden_score": winning["hidden"], "challenge_score": winning["score"], "missing": absolute["missing"],
           "abs_score": absolute["score"], "abs_open": absolute["open"], "abs_hidden": absolute["hidden"]}
    if run.get("published"):
        row["published"] = run["published"]
    return row


def compare(run_dirs: list[Path] | Path, out: Path = Path("runs/eval-compare"), field: str | None = DEFAULT_FIELD,
            save_field: Path | None = None) -> dict:
    """Challenge score per run (the organizers' win rates, geometric means, 1/3 open + 2/3 hidden) and a
    val-vs-test plot.

    Args:
        run_dirs: dirs written by ``onegpu eval val`` / ``onegpu eval helm``, or parents holding both
            (e.g. one dir per fine-tuning run with ``eval-val/`` and ``eval-helm/`` inside), as a
            list (``'[runs/a, runs/b]'``) or one dir.
        out: where ``results.json``, ``val_vs_test.png`` and the W&B run go.
        field: reference entries included in every win rate: ``neurips2023-a100-40gb`` (default: the
            A100 track's nine finalists, final round), ``neurips2023-rtx4090-24gb`` (the 4090 track's
            eight), the path of a field JSON, or ``none`` (your runs only).
        save_field: also write the field plus these runs' test results as a new field JSON here.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [Path(run_dirs)]
    if not run_dirs:
        raise UserError("no run dirs given", fix="onegpu eval compare RUN_DIR [RUN_DIR ...] --out DIR")
    reference = load_field(field)
    runs = [load_run(Path(d)) for d in run_dirs]
    scored = score_runs(runs, reference)
    from onegpu.eval.compare_report import write_comparison  # the engine: matplotlib and W&B load here, not for --help

    return write_comparison(run_dirs, runs, reference, scored, Path(out), save_field)
