"""Score math of `onegpu eval compare`: the organizers' published finalist scores recomputed from their
own per-scenario numbers, hand-computed cases, the scenario grouping (SAMSum, ETHICS), and the verb
on real result files with and without a reference field."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from onegpu.eval.compare import (challenge_score, column_win_rates, geometric_mean, group_of, known_fields, load_field,
                                 pearson, run_columns, score_runs, spearman, win_rates)
from onegpu.paths import REPO_ROOT


@pytest.mark.parametrize("field", ["neurips2023-a100-40gb", "neurips2023-rtx4090-24gb"])
def test_field_reproduces_the_published_final_scores(field):
    # The field files hold the finalists' per-scenario HELM numbers as the organizers released them,
    # with their published scenario win rates and scores; recomputing them here checks every rule
    # (columns, ties, missing values, ETHICS as one scenario, geometric means, 1/3 + 2/3) at once.
    entries = score_runs([], load_field(field))["field"]
    assert len(entries) >= 8
    for entry in entries:
        published = entry["published"]
        assert set(entry["win_rates"]) == set(published["win_rates"]) == {
            "mmlu", "truthful_qa", "big_bench", "gsm", "bbq", "sam_sum", "corr2cause", "math", "ethics"}
        for scenario, rate in published["win_rates"].items():
            assert entry["win_rates"][scenario] == pytest.approx(rate, abs=1e-12), (entry["name"], scenario)
        assert entry["open_score"] == pytest.approx(published["open"], abs=1e-12)
        assert entry["hidden_score"] == pytest.approx(published["hidden"], abs=1e-12)
        assert entry["challenge_score"] == pytest.approx(published["score"], abs=1e-12)


def test_column_win_rates_by_hand():
    # n = 3 entries, the entry itself counted: a beats b and ties c (k = 2: 1/2) -> 1.5 / 3
    assert column_win_rates({"a": 0.5, "b": 0.4, "c": 0.5}) == {"a": 0.5, "b": 0.0, "c": 0.5}
    # a 3-way tie gives each 1/3 of a win; d beats all three
    got = column_win_rates({"a": 0.1, "b": 0.1, "c": 0.1, "d": 0.9})
    assert got == pytest.approx({"a": 1 / 12, "b": 1 / 12, "c": 1 / 12, "d": 3 / 4})
    # a missing value is a score of 0 (it ties a real 0); lower-is-better: missing is last
    assert column_win_rates({"a": 0.2, "b": None, "c": 0.0}) == pytest.approx({"a": 2 / 3, "b": 1 / 6, "c": 1 / 6})
    assert column_win_rates({"a": 0.1, "b": 0.3, "c": None}, lower_is_better=True) == \
        pytest.approx({"a": 2 / 3, "b": 1 / 3, "c": 0.0})
    assert column_win_rates({"a": 0.5}) == {}  # one entry: no win rate


def test_win_rates_average_a_scenarios_columns():
    # mmlu main: a 0.5 > b 0.4 -> a 1/2, b 0 ; robustness: b 0.4 > a 0.3 -> a 0, b 1/2
    # stereotypes (lower is better): a 0.2 < b 0.3 -> a 1/2 ; a only has main in gsm, c has no mmlu
    columns = {"a": {"mmlu": {"main": 0.5, "robustness": 0.3}, "sam_sum": {"main": 0.1, "stereotypes_race": 0.2}},
               "b": {"mmlu": {"main": 0.4, "robustness": 0.4}, "sam_sum": {"main": 0.1, "stereotypes_race": 0.3}},
               "c": {"gsm": {"main": 0.3}}}
    wins = win_rates(columns)
    assert wins["a"]["mmlu"] == pytest.approx((1 / 2 + 0) / 2)
    assert wins["b"]["mmlu"] == pytest.approx((0 + 1 / 2) / 2)
    assert wins["a"]["sam_sum"] == pytest.approx((1 / 4 + 1 / 2) / 2)  # ROUGE-2 tie (1/2 of a win / 2), then a wins
    assert wins["b"]["sam_sum"] == pytest.approx((1 / 4 + 0) / 2)
    assert "gsm" not in wins["c"]  # nobody to compare with


def test_geometric_mean_and_zero_rule():
    assert geometric_mean([0.25, 1.0]) == pytest.approx(0.5)  # sqrt(0.25 * 1)
    assert geometric_mean([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert geometric_mean([0.9, 0.0, 0.8]) == 0.0  # one lost scenario zeroes the score
    assert geometric_mean([]) is None


def test_challenge_score_weights_open_and_hidden():
    # open: mmlu 0.25, gsm 1.0 -> 0.5 ; hidden: math 0.64, ethics 1.0 -> 0.8 ; 1/3 * 0.5 + 2/3 * 0.8 = 0.7
    got = challenge_score({"mmlu": 0.25, "gsm": 1.0, "math": 0.64, "ethics": 1.0})
    assert got["open"] == pytest.approx(0.5) and got["hidden"] == pytest.approx(0.8)
    assert got["score"] == pytest.approx(0.7)
    only_open = challenge_score({"mmlu": 0.25, "gsm": 1.0, "synthetic_reasoning": 0.01})  # not a challenge scenario
    assert only_open["hidden"] is None and only_open["score"] == pytest.approx(0.5)
    assert "sam_sum" in only_open["missing"] and "mmlu" not in only_open["missing"]


def _test(**scenarios):
    return {"stage": "eval-helm", "scenarios": {s: {"value": v} for s, v in scenarios.items()}}


def test_samsum_is_hidden_under_both_names_and_ethics_is_one_scenario():
    assert group_of("sam_sum") == group_of("summarization_samsum") == group_of("samsum") == "hidden"
    assert group_of("ethics_virtue") == group_of("ethics") == "hidden"
    assert group_of("summarization_cnndm") is None and group_of("mmlu") == "open"
    ethics = {"ethics_justice": 0.6, "ethics_commonsense": 0.4, "ethics_virtue": 0.9, "ethics_deontology": 0.5,
              "ethics_utilitarianism": 0.6}
    stock = run_columns(_test(summarization_samsum=0.10, math=0.2, **ethics))  # stock HELM's names
    fork = run_columns(_test(sam_sum=0.12, math=0.1, **{k: v - 0.1 for k, v in ethics.items()}))  # the fork's
    assert set(stock) == set(fork) == {"sam_sum", "math", "ethics"}
    assert len(stock["ethics"]) == 5  # the subsets are columns of ONE scenario
    scored = score_runs([{"name": "stock", "dir": "s", "val": None, "columns": stock},
                         {"name": "fork", "dir": "f", "val": None, "columns": fork}])
    by = {r["name"]: r for r in scored["runs"]}
    assert by["stock"]["test_scenarios"]["ethics"] == pytest.approx(sum(ethics.values()) / 5)  # mean of subsets
    # n = 2: stock wins every ethics column (1/2 each), math (1/2), loses sam_sum (0)
    assert by["stock"]["win_rates"] == pytest.approx({"sam_sum": 0.0, "math": 0.5, "ethics": 0.5})
    # three hidden scenarios, not seven: a zero on SAMSum zeroes stock's hidden score; fork: (1/2 * 0 * 0)
    assert by["stock"]["hidden_score"] == 0.0 and by["fork"]["hidden_score"] == 0.0
    assert by["fork"]["win_rates"]["sam_sum"] == pytest.approx(0.5)
    geo = math.exp((math.log(0.5) + math.log(0.5) + math.log(0.5)) / 3)
    assert challenge_score({"sam_sum": 0.5, "math": 0.5, "ethics": 0.5})["hidden"] == pytest.approx(geo)


def test_correlations_by_hand():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x=[1,2,3,4], y=[1,3,2,4]: mean 2.5 each; sum dx*dy = 2.25+(-0.5*0.5)+(0.5*-0.5)+2.25 = 4; sxx=syy=5
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [1, 10, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3], [1, 10, 100]) < 1.0
    assert pearson([1], [1]) is None and pearson([1, 1], [2, 3]) is None


def test_score_runs_end_to_end_by_hand():
    runs = [{"name": n, "dir": n, "val": {"stage": "eval-val", "val_score": v}, "columns": run_columns(_test(mmlu=m, math=h))}
            for n, v, m, h in (("a", 0.3, 0.5, 0.2), ("b", 0.2, 0.4, 0.3), ("c", 0.1, 0.3, 0.1))]
    scored = score_runs(runs)
    by = {r["name"]: r for r in scored["runs"]}
    # n = 3. mmlu: a beats 2 -> 2/3, b 1/3, c 0 ; math: b 2/3, a 1/3, c 0
    assert by["a"]["win_rates"] == pytest.approx({"mmlu": 2 / 3, "math": 1 / 3})
    assert by["a"]["challenge_score"] == pytest.approx(2 / 9 + 2 / 9)  # 1/3 * 2/3 + 2/3 * 1/3
    assert by["b"]["challenge_score"] == pytest.approx(1 / 9 + 4 / 9)
    assert by["c"]["challenge_score"] == 0.0
    assert by["a"]["abs_score"] == pytest.approx(0.5 / 3 + 0.4 / 3)  # 1/3 * 0.5 + 2/3 * 0.2
    assert scored["test_score_kind"] == "challenge_score" and scored["correlation"]["n"] == 3
    xs, ys = [0.3, 0.2, 0.1], [4 / 9, 5 / 9, 0.0]
    mx, my = sum(xs) / 3, sum(ys) / 3
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    den = math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    assert scored["correlation"]["pearson"] == pytest.approx(num / den)


def _write_run(root, name, val, **scenarios):
    (root / name / "eval-val").mkdir(parents=True)
    (root / name / "eval-helm").mkdir(parents=True)
    (root / name / "eval-val" / "results.json").write_text(json.dumps({"stage": "eval-val", "val_score": val}))
    (root / name / "eval-helm" / "results.json").write_text(json.dumps(_test(**scenarios)))
    return root / name


def _compare(*args):
    return subprocess.run([sys.executable, "-m", "onegpu", "eval", "compare", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)


@pytest.mark.slow
def test_compare_cli_without_field(tmp_path):
    run1 = _write_run(tmp_path, "run1", 0.30, mmlu=0.50, gsm=0.10)
    run2 = _write_run(tmp_path, "run2", 0.20, mmlu=0.40, gsm=0.20)
    out = tmp_path / "cmp"
    proc = _compare(json.dumps([str(run1), str(run2)]), "--out", str(out), "--field", "none")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    # each run wins one scenario outright: win rates (1/2, 0) and (0, 1/2) -> geometric means 0
    assert {r["name"]: r["challenge_score"] for r in doc["runs"]} == {"run1": 0.0, "run2": 0.0}
    assert doc["field"] == [] and doc["test_score_kind"] == "challenge_score"
    assert (out / "val_vs_test.png").stat().st_size > 1000
    assert (out / "compare.table.json").is_file() and (out / "run.json").is_file()
    assert "challenge_score" in proc.stdout

    alone = _compare(str(run1), "--out", str(tmp_path / "alone"), "--field", "none")
    assert alone.returncode == 0, alone.stderr
    only = json.loads((tmp_path / "alone" / "results.json").read_text())
    assert only["runs"][0]["win_rates"] == {} and only["test_score_kind"] == "abs_score"  # nothing to beat

    missing = _compare(json.dumps([str(tmp_path / "nope")]), "--out", str(out))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "fix:" in missing.stderr
    bad_field = _compare(str(run1), "--out", str(out), "--field", "no-such-field")
    assert bad_field.returncode == 2 and "neurips2023-a100-40gb" in bad_field.stderr


@pytest.mark.slow
def test_one_run_against_the_default_field_gets_real_win_rates(tmp_path):
    # A user run that tested the open eval's scenarios and MATH: its place among the A100 finalists.
    field = load_field("neurips2023-a100-40gb")
    mmlu = sorted(e["scenarios"]["mmlu"]["main"] for e in field["entries"])
    run = _write_run(tmp_path, "mine", 0.4, mmlu=(mmlu[3] + mmlu[4]) / 2, truthful_qa=0.5, big_bench=0.3, gsm=0.3,
                     bbq=0.6, math=0.1)
    out = tmp_path / "cmp"
    saved = tmp_path / "my-field.json"
    proc = _compare(str(run), "--out", str(out), "--save_field", str(saved))  # default field
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    mine = doc["runs"][0]
    assert doc["field_name"] == "neurips2023-a100-40gb" and len(doc["field"]) == len(field["entries"])
    # the main MMLU column: 4 finalists below, 5 above, 10 entries -> 4/10; the finalists' robustness and
    # fairness columns are compared among themselves only (this run has no such value)
    assert mine["win_rates"]["mmlu"] == pytest.approx(4 / 10)
    assert all(0.0 < r < 1.0 for r in mine["win_rates"].values())
    assert 0.0 < mine["challenge_score"] < 1.0 and 1 <= mine["rank"] <= 10
    assert set(mine["missing"]) == {"sam_sum", "corr2cause", "ethics"}
    assert "rank" in proc.stdout and "field:" in proc.stdout
    # --save_field: the field plus this run, usable as --field next time
    extended = json.loads(saved.read_text())
    assert len(extended["entries"]) == len(field["entries"]) + 1 and extended["entries"][-1]["name"] == "mine"
    again = _compare(str(run), "--out", str(tmp_path / "cmp2"), "--field", str(saved))
    assert again.returncode == 0, again.stderr
    assert len(json.loads((tmp_path / "cmp2" / "results.json").read_text())["field"]) == len(field["entries"]) + 1
    assert set(known_fields()) >= {"neurips2023-a100-40gb", "neurips2023-rtx4090-24gb"}
