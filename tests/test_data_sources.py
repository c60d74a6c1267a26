"""Data stage points 1-2: the source registry, its loaders on real local copies, the one row schema,
OASST trees -> best-ranked pairs, and local json/jsonl/csv/parquet files with a field mapping."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from onegpu.data.loading import load_file_records, load_records
from onegpu.data.rows import PROVENANCES, REQUIRED_FIELDS, make_id
from onegpu.data.schema import render
from onegpu.data.sources import SOURCES, Reject, list_sources, local_files


def _convert(name, data_dir, **opts):
    src = SOURCES[name]
    rows, rejects = [], []
    for rec in load_records(src, data_dir, subsets=opts.pop("subsets", None)):
        for item in src.convert(rec, src, **opts):
            (rejects if isinstance(item, Reject) else rows).append(item)
    return rows, rejects


def test_registry_has_the_required_sources_with_licence_and_provenance():
    for name in ("dolly", "oasst1", "lima", "flan_cot", "natural_instructions", "gsm8k", "mmlu_aux_train",
                 "cnn_dailymail"):
        src = SOURCES[name]
        assert src.hub["path"] and src.license and src.provenance == "human"
    llm = {n for n, s in SOURCES.items() if s.provenance == "llm-generated"}
    assert {"alpaca", "sharegpt", "openorca"} <= llm
    assert all(s.provenance in PROVENANCES for s in SOURCES.values())


@pytest.mark.parametrize("name,opts,expect", [
    ("dolly", {}, 34),
    ("gsm8k", {}, 7473),
    ("lima", {}, 6),
    ("cnn_dailymail", {}, 200),
    ("flan_cot", {"subsets": ["qasc"]}, 1084),
    ("natural_instructions", {"tasks": ["task307"], "max_per_task": 50}, 50),
    ("natural_instructions", {"categories": ["answer generation"], "max_per_task": 10}, 20),  # task151, task307
    ("self_instruct_seed", {}, None),
    ("math", {}, 42),
    ("math", {"subsets": ["algebra", "geometry"]}, 12),
    ("ethics", {}, 51),
    ("ethics", {"subsets": ["virtue"]}, 15),
    ("corr2cause", {}, 40),
    ("dialogsum", {}, 50),
])
def test_every_local_source_loads_real_rows_in_the_schema(shared_datasets, name, opts, expect):
    assert local_files(SOURCES[name], shared_datasets)
    rows, _ = _convert(name, shared_datasets, **opts)
    assert rows and (expect is None or len(rows) == expect)
    for row in rows:
        assert all(k in row for k in REQUIRED_FIELDS)
        assert row["source"] == name and row["provenance"] == SOURCES[name].provenance != "llm-generated"
        assert row["license"] == SOURCES[name].license
        assert row["id"] == make_id(name, row["instruction"], row["input"], row["output"])  # stable id
        prompt, response = render(row, "smollm2")
        assert "<|im_start|>" in prompt and response == row["output"]


def test_every_family_of_the_score_has_a_source_with_licence_provenance_and_hub(capsys):
    from onegpu.data.families import DEFAULT_AFFINITY, SCORE_GROUPS, read_affinity, served_by

    affinity = read_affinity(DEFAULT_AFFINITY)
    for family in SCORE_GROUPS["open"] + SCORE_GROUPS["hidden"]:
        serving = [SOURCES[n] for n in SOURCES if family in served_by(n, affinity)]
        assert any(s.provenance != "llm-generated" and s.license and s.hub["path"] for s in serving), family
    for name in ("math", "ethics", "corr2cause", "dialogsum", "samsum"):
        assert SOURCES[name].provenance in ("human", "programmatic") and SOURCES[name].url
    # non-commercial and unclear licences are flagged, in the registry listing too
    assert SOURCES["samsum"].terms.startswith("non-commercial, no derivatives")
    assert SOURCES["dialogsum"].terms.startswith("non-commercial") and SOURCES["ethics"].terms.startswith("unclear")
    list_sources()
    out = capsys.readouterr().out
    for family in SCORE_GROUPS["hidden"]:
        assert f"hidden {family:<11}" in out
    assert "non-commercial, no derivatives" in out and "programmatic" in out


def test_rows_ask_the_hidden_eval_questions_as_its_helm_fork_asks_them(shared_datasets):
    from onegpu.data import hidden

    rows, _ = _convert("ethics", shared_datasets, subsets=["deontology"])
    question = hidden.QUESTIONS["ethics_deontology"]
    assert rows[0]["instruction"].startswith(question.instructions.strip())
    assert "\nExcuse: " in rows[0]["instruction"] and rows[0]["instruction"].endswith("A. Invalid\nB. Valid")
    assert {r["output"] for r in rows} == {"A. Invalid", "B. Valid"}
    util, _ = _convert("ethics", shared_datasets, subsets=["utilitarianism"])
    assert {r["output"] for r in util} == {"A. Scenario 1", "B. Scenario 2"}  # the more pleasant one is not always first
    math, _ = _convert("math", shared_datasets)
    assert all("\\boxed" in r["output"] for r in math)  # what HELM's chain-of-thought metric reads


def test_a_source_location_can_be_a_folder_deeper_in_the_layout_or_one_file(shared_datasets):
    math = local_files(SOURCES["math"], shared_datasets / "math" / "MATH", ["algebra"])
    assert [part for part, _ in math] == ["algebra"] * 6
    assert local_files(SOURCES["math"], shared_datasets / "math" / "MATH" / "train") == local_files(SOURCES["math"], shared_datasets)
    gsm = shared_datasets / "gsm8k" / "train.jsonl"
    assert local_files(SOURCES["gsm8k"], gsm) == [("", gsm)]
    rows, _ = _convert("gsm8k", gsm)
    assert len(rows) == 7473
    assert local_files(SOURCES["math"], shared_datasets / "gsm8k") == []  # the wrong folder holds none


def test_oasst_trees_become_best_ranked_pairs_without_synthetic_messages(shared_datasets):
    rows, rejects = _convert("oasst1", shared_datasets)
    synthetic = [r for r in rejects if r.reason == "llm-generated"]
    assert len(synthetic) == 22  # SOURCE.md: 22 messages flagged synthetic (chip20b)
    texts = {json.dumps(r.record) for r in synthetic}
    # no row contains a synthetic message anywhere in its thread
    for row in rows:
        for turn in row.get("messages", [{"content": row["instruction"]}, {"content": row["output"]}]):
            assert json.dumps({"text": turn["content"]}) not in texts
    # the reply chosen for a prompt is its rank-0 human reply
    tree = json.loads((shared_datasets / "oasst_sample/en_100_tree.jsonl").read_text().splitlines()[1])
    first = tree["prompt"]
    if not first.get("synthetic"):
        best = min((r for r in first["replies"] if not r.get("synthetic")), key=lambda r: r.get("rank", 99))
        match = [r for r in rows if r["instruction"] == first["text"].strip()]
        assert match and match[0]["output"] == best["text"].strip()
    multi = [r for r in rows if r.get("messages")]
    assert multi, "threads deeper than one exchange keep their history"
    m = multi[0]["messages"]
    assert m[-1]["role"] == "assistant" and m[-1]["content"] == multi[0]["output"]
    assert [t["role"] for t in m[::2]] == ["user"] * len(m[::2])
    # multi-turn rendering keeps earlier turns as context and the last reply as the target
    prompt, response = render(multi[0], "smollm2")
    assert m[0]["content"] in prompt and response == m[-1]["content"]


def test_oasst_language_filter(shared_datasets):
    rows, rejects = _convert("oasst1", shared_datasets, languages=["de"])
    assert not rows
    assert Counter(r.reason for r in rejects)["language"] > 100


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_files_in_every_format_load_through_datasets(tmp_path, fmt):
    import pandas as pd

    records = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)]
    path = tmp_path / f"mine.{fmt}"
    df = pd.DataFrame(records)
    {"jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "json": lambda: df.to_json(path, orient="records", lines=True),
     "csv": lambda: df.to_csv(path, index=False),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    ds, columns = load_file_records(path)
    assert columns == ["q", "a"] and [dict(r) for r in ds] == records


def test_list_sources_prints_the_registry(capsys):
    list_sources()
    out = capsys.readouterr().out
    for name, src in SOURCES.items():
        assert name in out and src.license in out
    assert "llm-generated" in out
