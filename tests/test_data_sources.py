"""Data stage points 1-2: the source registry, its loaders on real local copies, the one row schema,
OASST trees -> best-ranked pairs, and local json/jsonl/csv/parquet files with a field mapping."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from onegpu.data.schema import PROVENANCES, REQUIRED_FIELDS, make_id, render
from onegpu.data.sources import SOURCES, Reject, list_sources, load_file_records, load_records, local_files


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
    ("self_instruct_seed", {}, None),
])
def test_every_local_source_loads_real_rows_in_the_schema(shared_datasets, name, opts, expect):
    assert local_files(SOURCES[name], shared_datasets)
    rows, _ = _convert(name, shared_datasets, **opts)
    assert rows and (expect is None or len(rows) == expect)
    for row in rows:
        assert all(k in row for k in REQUIRED_FIELDS)
        assert row["source"] == name and row["provenance"] == "human" and row["license"] == SOURCES[name].license
        assert row["id"] == make_id(name, row["instruction"], row["input"], row["output"])  # stable id
        prompt, response = render(row, "smollm2")
        assert "<|im_start|>" in prompt and response == row["output"]


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
