"""`onegpu data check` and per-source locations: every problem of a recipe in one run, hub sources that
are absent reported as such, a mix of a local path and the default data dir that builds, and the
manifest's tokens per eval family with the families a mix leaves uncovered."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from onegpu.data.build import build
from onegpu.data.check import check
from onegpu.errors import UserError
from onegpu.paths import REPO_ROOT


def write(tmp_path, recipe: dict, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"tokenizer": "bundled", "prompt_style": "smollm2", "max_seq_length": 512,
                                    "val_rows_per_source": 2, **recipe}, sort_keys=False))
    return path


@pytest.mark.slow
def test_three_independent_problems_are_reported_in_one_run_in_seconds(tmp_path, shared_datasets, bundled_checkpoint):
    recipe = write(tmp_path, {"budget_tokens": 30000, "sources": [
        {"name": "dolly", "weight": 5},                       # 1. its weight asks for far more than it has
        {"name": "samsum", "weight": 1, "location": "hub"},   # 2. a hub source that cannot be reached here
        {"name": "ethicz", "weight": 1},                      # 3. a misspelt source
        {"name": "corr2cause", "weight": 1, "location": str(shared_datasets / "corr2cause" / "train.csv"), "replace": True},
        {"name": "math", "weight": 2, "replace": True},
    ]})
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "onegpu", "data", "check", str(recipe), "--data_dir",
                           str(shared_datasets)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    seconds = time.time() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert "3 problems:" in err and "Traceback" not in err
    assert "unknown source 'ethicz'" in err and "did you mean ethics?" in err
    assert "source 'samsum' (hub: knkarthick/samsum): not available" in err and "point `location:` at a local copy" in err
    assert "source 'dolly' cannot meet its weight" in err and "lower its weight to" in err and "replace: true" in err
    assert seconds < 60, f"{seconds:.0f} s"  # one process start and a few local files: seconds, not a build
    # the report names every source that could be checked, where it was read and what it holds
    out = proc.stdout
    assert f"local: {shared_datasets}" in out and f"local: {shared_datasets}/corr2cause/train.csv" in out
    assert "hub: knkarthick/samsum" in out
    # what is missing leaves its family uncovered: samsum (unreachable) and ethics (misspelt)
    assert "uncovered families of the score: mmlu, truthfulqa, bbq, bigbench, gsm8k, samsum, ethics" in out
    assert "samsum (non-commercial, no derivatives" in out


@pytest.mark.slow
def test_a_recipe_that_fits_passes_with_estimates_that_match_the_build(tmp_path, shared_datasets, bundled_checkpoint):
    """A local path source beside sources from the default data dir: the check passes and the build
    builds; the build's manifest carries the locations, the licence terms and tokens per eval family."""
    recipe = write(tmp_path, {"budget_tokens": 9000, "languages": ["en"],
                              "decontamination": {"eval_sets": ["math_test", "ethics_test", "corr2cause_test",
                                                                "dialogsum_test", "gsm8k_test"]},
                              "sources": [
        {"name": "math", "weight": 3, "location": str(shared_datasets / "math" / "MATH")},  # a folder of its own
        {"name": "ethics", "weight": 1},
        {"name": "corr2cause", "weight": 1, "location": str(shared_datasets / "corr2cause" / "train.csv")},
        {"name": "dialogsum", "weight": 2},
        {"name": "gsm8k", "count": 4},
    ]})
    report = check(recipe, data_dir=shared_datasets, out=tmp_path / "check.json")
    assert not report["problems"] and json.loads((tmp_path / "check.json").read_text())["sources"]
    by_name = {s["name"]: s for s in report["sources"]}
    assert by_name["math"]["location"] == f"local: {shared_datasets / 'math' / 'MATH'}" and by_name["math"]["rows"] == 42
    assert by_name["corr2cause"]["location"].startswith("local: ") and by_name["corr2cause"]["rows"] == 40
    assert by_name["ethics"]["location"] == f"local: {shared_datasets}"
    assert report["families"]["uncovered"] == ["mmlu", "truthfulqa", "bbq", "bigbench"]

    out = build(recipe, tmp_path / "out", data_dir=shared_datasets)
    m = json.loads((out / "manifest.json").read_text())
    assert {n: c["location"] for n, c in m["counts"].items()} == {"math": "local", "ethics": "local", "corr2cause": "local",
                                                                "dialogsum": "local", "gsm8k": "local"}
    assert m["counts"]["dialogsum"]["license_terms"].startswith("non-commercial")
    fam = m["families"]
    assert fam["uncovered"] == ["mmlu", "truthfulqa", "bbq", "bigbench"]
    for family in ("samsum", "corr2cause", "ethics", "math", "gsm8k"):
        assert fam["families"][family]["tokens"] > 0, family
    assert fam["families"]["ethics"]["sources"] == ["ethics"] and fam["families"]["samsum"]["sources"] == ["dialogsum"]
    assert sum(f["tokens"] for f in fam["families"].values()) == m["tokens"]["train"]["total"]
    # the hidden families' test splits were checked, and nothing of them was in these train splits
    for name in ("math_test", "ethics_test", "corr2cause_test", "dialogsum_test"):
        assert m["decontamination"]["eval_sets"][name]["status"] == "checked", name
    assert all(m["counts"][n]["contaminated"] == 0 for n in ("math", "ethics", "corr2cause", "dialogsum"))
    # the check's estimates bound what the build found (filters only remove rows)
    for name, c in m["counts"].items():
        assert c["available"] <= by_name[name]["usable_rows"] + 2, name


def test_build_reports_every_problem_before_the_filters(tmp_path, shared_datasets, bundled_checkpoint):
    recipe = write(tmp_path, {"budget_tokens": 200000, "sources": [
        {"name": "lima", "weight": 1}, {"name": "dolly", "weight": 1},
        {"name": "ethics", "weight": 1, "location": str(tmp_path / "nowhere")}]})
    try:
        build(recipe, tmp_path / "out", data_dir=shared_datasets)
        raise AssertionError("the build should have refused")
    except UserError as err:
        problems = [p.problem for p in err.problems]
    assert len(problems) == 3, problems  # (no budget verdict while a source's size is unknown)
    assert any("location" in p and "does not exist" in p for p in problems)
    assert sum("cannot meet its weight" in p for p in problems) == 2
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_the_competition_recipe_names_every_source_it_cannot_reach(tmp_path, shared_datasets):
    """Offline, the shipped competition recipe (every source on the hub, a hub tokenizer) reports each
    unreachable source and the tokenizer in one run, and still plans every family of the score."""
    try:
        check(REPO_ROOT / "data" / "recipes" / "competition.yaml", data_dir=shared_datasets, out=tmp_path / "c.json")
        raise AssertionError("nothing can be reached offline")
    except UserError as err:
        problems = [p.problem for p in err.problems]
    recipe = yaml.safe_load((REPO_ROOT / "data" / "recipes" / "competition.yaml").read_text())
    assert len(problems) == len(recipe["sources"]) + 1
    assert any("tokenizer 'meta-llama/Llama-2-7b-hf'" in p for p in problems)
    for source in recipe["sources"]:
        assert any(p.startswith(f"source {source['name']!r} (hub: ") and "not available" in p for p in problems), source
    from onegpu.data.families import DEFAULT_AFFINITY, SCORE_GROUPS, read_affinity, served_by

    affinity = read_affinity(DEFAULT_AFFINITY)
    names = [s["name"] for s in recipe["sources"]]
    for family in SCORE_GROUPS["open"] + SCORE_GROUPS["hidden"]:
        assert any(family in served_by(n, affinity) for n in names), family
