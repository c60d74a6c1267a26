"""Data stage points 6 and 9: the LLM-generated rule guard and bad input -> a clear error before heavy
work; malformed rows go to rejects instead of crashing."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from onegpu.data.build import build
from onegpu.cli import main
from onegpu.errors import UserError


def recipe(tmp_path, sources, **extra):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"tokenizer": "bundled", "sources": sources, **extra}))
    return path


def error_of(path, data_dir, **kw) -> UserError:
    with pytest.raises(UserError) as info:
        build(path, path.parent / "out", data_dir=data_dir, **kw)
    assert info.value.fix, "every error says how to fix it"
    return info.value


def test_llm_generated_sources_are_refused_citing_the_rule(tmp_path, shared_datasets):
    err = error_of(recipe(tmp_path, [{"name": "alpaca"}]), shared_datasets)
    assert "LLM-generated" in err.problem and "Challenge" in err.problem and "allow_llm_generated" in err.fix
    file = tmp_path / "gen.jsonl"
    file.write_text('{"q": "a", "a": "b"}\n')
    err = error_of(recipe(tmp_path, [{"path": "gen.jsonl", "fields": {"instruction": "q", "output": "a"},
                                      "license": "x", "provenance": "llm-generated"}]), shared_datasets)
    assert "LLM-generated" in err.problem
    # allowed on request: passes the guard (then fails only because alpaca has no local copy)
    err = error_of(recipe(tmp_path, [{"name": "alpaca"}], allow_llm_generated=True), shared_datasets)
    assert "no local copy" in err.problem and "tatsu-lab/alpaca" in err.fix


def test_unknown_source_lists_the_known_ones(tmp_path, shared_datasets):
    err = error_of(recipe(tmp_path, [{"name": "dolly15k"}]), shared_datasets)
    assert "dolly15k" in err.problem and "dolly" in err.fix and "oasst1" in err.fix


def test_missing_file_and_bad_field_mapping(tmp_path, shared_datasets):
    err = error_of(recipe(tmp_path, [{"path": "nope.jsonl", "fields": {"instruction": "q", "output": "a"},
                                      "license": "x", "provenance": "human"}]), shared_datasets)
    assert "nope.jsonl" in err.problem and "not found" in err.problem
    (tmp_path / "qa.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n')
    err = error_of(recipe(tmp_path, [{"path": "qa.jsonl", "fields": {"instruction": "prompt", "output": "answer"},
                                      "license": "x", "provenance": "human"}]), shared_datasets)
    assert "instruction: prompt" in err.problem and "question" in err.fix and "answer" in err.fix
    err = error_of(recipe(tmp_path, [{"path": "qa.jsonl", "fields": {"instruction": "question", "output": "answer"},
                                      "license": "x"}]), shared_datasets)
    assert "provenance" in err.problem


def test_weights_that_cannot_be_met_and_budget_larger_than_data(tmp_path, shared_datasets):
    start = time.time()
    err = error_of(recipe(tmp_path, [{"name": "dolly"}, {"name": "lima"}], budget_tokens=10_000_000), shared_datasets)
    assert "budget_tokens" in err.problem and "larger" in err.problem
    assert time.time() - start < 60, "refused before the heavy filters"
    err = error_of(recipe(tmp_path, [{"name": "dolly", "weight": 9}, {"name": "gsm8k", "weight": 1}],
                          budget_tokens=100_000, decontamination={"eval_sets": ["truthfulqa"]}), shared_datasets)
    assert "dolly" in err.problem and "weight" in err.problem and "replace: true" in err.fix
    err = error_of(recipe(tmp_path, [{"name": "dolly", "weight": 1}]), shared_datasets)
    assert "budget_tokens" in err.problem
    err = error_of(recipe(tmp_path, [{"name": "dolly", "weight": -1}], budget_tokens=100), shared_datasets)
    assert "-1" in err.problem
    err = error_of(recipe(tmp_path, [{"name": "dolly", "weight": 1, "count": 3}], budget_tokens=100), shared_datasets)
    assert "weight and count" in err.problem


def test_cli_prints_error_and_fix_without_traceback(tmp_path, shared_datasets, capsys):
    path = recipe(tmp_path, [{"name": "sharegpt"}])
    assert main(["data", "build", str(path), "--out", str(tmp_path / "o"), "--data_dir", str(shared_datasets)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "fix:" in err and "Traceback" not in err
    assert main(["data", "build", str(tmp_path / "missing.yaml")]) == 2


def test_malformed_rows_never_crash_and_go_to_rejects(tmp_path, shared_datasets, bundled_checkpoint):
    lines = [
        json.dumps({"q": "What is the capital of France?", "a": "Paris is the capital of France."}),
        "{this is not json",
        json.dumps({"q": {"nested": "object"}, "a": "x"}),
        json.dumps({"q": "Empty answer here, please", "a": ""}),
        json.dumps(["a", "list"]),
        json.dumps({"q": "Name a primary colour of light.", "a": "Red, green and blue are the primaries."}),
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    path = recipe(tmp_path, [{"path": "bad.jsonl", "fields": {"instruction": "q", "output": "a"},
                              "license": "x", "provenance": "human"}], val_rows_per_source=0, min_tokens=1,
                  decontamination={"eval_sets": ["truthfulqa"]})
    out = build(path, tmp_path / "out", data_dir=shared_datasets)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == ["empty", "malformed", "malformed", "malformed"]
    assert len((out / "train.jsonl").read_text().splitlines()) == 2
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["bad"]["malformed"] == 4
