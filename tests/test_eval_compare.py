"""Score math of `onegpu eval compare` against hand-computed cases, and the verb on real result files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from onegpu.eval.compare import challenge_score, geometric_mean, pearson, score_runs, spearman, win_rates
from onegpu.paths import REPO_ROOT


def test_win_rates_by_hand():
    # scenario mmlu: a=0.5 beats b=0.4 and ties c=0.5 -> (1 + 0.5) / 2 = 0.75
    #                b loses both -> 0; c ties a, beats b -> 0.75
    # scenario gsm only in a and b: a=0.1 < b=0.2 -> a 0, b 1; c has no gsm win rate
    values = {"a": {"mmlu": 0.5, "gsm": 0.1}, "b": {"mmlu": 0.4, "gsm": 0.2}, "c": {"mmlu": 0.5}}
    wins = win_rates(values)
    assert wins == {"a": {"mmlu": 0.75, "gsm": 0.0}, "b": {"mmlu": 0.0, "gsm": 1.0}, "c": {"mmlu": 0.75}}


def test_geometric_mean_and_zero_rule():
    assert geometric_mean([0.25, 1.0]) == pytest.approx(0.5)  # sqrt(0.25 * 1)
    assert geometric_mean([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert geometric_mean([0.9, 0.0, 0.8]) == 0.0  # one lost scenario zeroes the score
    assert geometric_mean([]) is None


def test_challenge_score_weights_open_and_hidden():
    # open: mmlu 0.25, gsm 1.0 -> 0.5 ; hidden: math 0.64, ethics 1.0 -> 0.8
    # score = 1/3 * 0.5 + 2/3 * 0.8 = 0.7
    got = challenge_score({"mmlu": 0.25, "gsm": 1.0, "math": 0.64, "ethics": 1.0})
    assert got["open"] == pytest.approx(0.5)
    assert got["hidden"] == pytest.approx(0.8)
    assert got["score"] == pytest.approx(0.7)
    only_open = challenge_score({"mmlu": 0.25, "gsm": 1.0})
    assert only_open["hidden"] is None and only_open["score"] == pytest.approx(0.5)


def test_correlations_by_hand():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x=[1,2,3,4], y=[1,3,2,4]: mean 2.5 each; sum dx*dy = 2.25+(-0.5*0.5)+(0.5*-0.5)+2.25 = 4; sxx=syy=5
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # monotone but not linear -> spearman 1, pearson < 1
    assert spearman([1, 2, 3], [1, 10, 100]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 10, 100]) < 1.0
    assert pearson([1], [1]) is None and pearson([1, 1], [2, 3]) is None


def _val(score):
    return {"stage": "eval-val", "val_score": score}


def _test(**scenarios):
    return {"stage": "eval-helm", "scenarios": {s: {"value": v} for s, v in scenarios.items()}}


def test_score_runs_end_to_end_by_hand():
    runs = [
        {"name": "a", "dir": "a", "val": _val(0.3), "test": _test(mmlu=0.5, math=0.2)},
        {"name": "b", "dir": "b", "val": _val(0.2), "test": _test(mmlu=0.4, math=0.3)},
        {"name": "c", "dir": "c", "val": _val(0.1), "test": _test(mmlu=0.3, math=0.1)},
    ]
    scored = score_runs(runs)
    by = {r["name"]: r for r in scored["runs"]}
    # a: mmlu wins 2/2 = 1, math 1/2 -> open 1, hidden 0.5 -> 1/3 + 1/3 = 2/3
    assert by["a"]["win_rates"] == {"mmlu": 1.0, "math": 0.5}
    assert by["a"]["challenge_score"] == pytest.approx(2 / 3)
    # b: mmlu 0.5, math 1.0 -> 1/6 + 2/3 = 5/6 ; c: 0 and 0 -> 0
    assert by["b"]["challenge_score"] == pytest.approx(5 / 6)
    assert by["c"]["challenge_score"] == 0.0
    # abs score of a: 1/3 * 0.5 + 2/3 * 0.2
    assert by["a"]["abs_score"] == pytest.approx(0.5 / 3 + 0.4 / 3)
    assert scored["test_score_kind"] == "challenge_score"
    # val (0.3, 0.2, 0.1) vs test (2/3, 5/6, 0): pearson by hand
    xs, ys = [0.3, 0.2, 0.1], [2 / 3, 5 / 6, 0.0]
    mx, my = 0.2, 0.5
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    den = math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    assert scored["correlation"]["pearson"] == pytest.approx(num / den)
    assert scored["correlation"]["n"] == 3


def test_compare_cli_writes_results_table_and_plot(tmp_path):
    for name, val, mmlu, gsm in (("run1", 0.30, 0.50, 0.10), ("run2", 0.20, 0.40, 0.20)):
        (tmp_path / name / "eval-val").mkdir(parents=True)
        (tmp_path / name / "eval-helm").mkdir(parents=True)
        (tmp_path / name / "eval-val" / "results.json").write_text(json.dumps(_val(val)))
        (tmp_path / name / "eval-helm" / "results.json").write_text(json.dumps(_test(mmlu=mmlu, gsm=gsm)))
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "onegpu", "eval", "compare",
                           json.dumps([str(tmp_path / "run1"), str(tmp_path / "run2")]), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    scores = {r["name"]: r["challenge_score"] for r in doc["runs"]}
    # each run wins one of the two scenarios outright: win rates (1, 0) and (0, 1) -> both zero
    assert scores == {"run1": 0.0, "run2": 0.0}
    assert (out / "val_vs_test.png").stat().st_size > 1000
    assert (out / "compare.table.json").is_file() and (out / "run.json").is_file()
    assert "challenge_score" in proc.stdout

    missing = subprocess.run([sys.executable, "-m", "onegpu", "eval", "compare", json.dumps([str(tmp_path / "nope")]),
                              "--out", str(out)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "fix:" in missing.stderr
