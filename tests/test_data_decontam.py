"""Data stage point 5: n-gram decontamination against the open-eval sets.

Eval items planted into a mix are caught 100%, with <= 1% false positives on clean training data,
and the build drops them into rejects naming the eval set."""

from __future__ import annotations

import json
import random

import pytest

from onegpu.data import decontam
from onegpu.data.build import build
from onegpu.data.sources import SOURCES, Reject, load_records

CHECKED = ("mmlu", "truthfulqa", "gsm8k_test", "bbq", "bigbench")


@pytest.fixture(scope="module")
def indexes(shared_datasets):
    return [decontam.load_index(name, shared_datasets) for name in CHECKED]


def _eval_items(name, shared_datasets):
    e = decontam.EVAL_SETS[name]
    return [t for f in decontam._files(e, shared_datasets) for t in e.read_local(f)]


def _clean_rows(shared_datasets):
    """Human-written training text that is not an eval set (FLAN's StrategyQA is: it is BIG-bench's)."""
    texts = []
    for name, opts in [("dolly", {}), ("oasst1", {}), ("lima", {}), ("cnn_dailymail", {}),
                       ("natural_instructions", {"max_per_task": 400}), ("self_instruct_seed", {})]:
        src = SOURCES[name]
        for rec in load_records(src, shared_datasets):
            for row in src.convert(rec, src, **opts):
                if not isinstance(row, Reject):
                    texts.append(" ".join((row["instruction"], row["input"], row["output"])))
    src = SOURCES["flan_cot"]
    for rec in load_records(src, shared_datasets, subsets=["aqua", "creak", "ecqa", "qasc", "sensemaking"]):
        row = next(iter(src.convert(rec, src)))
        texts.append(" ".join((row["instruction"], row["output"])))
    return texts


def test_planted_eval_items_are_all_caught_with_at_most_1pct_false_positives(indexes, shared_datasets):
    rng = random.Random(0)
    planted, origin = [], []
    templates = ["{}", "Question: {}\nAnswer:", "### Instruction:\n{}\n\n### Response:", "{}  (from a quiz)"]
    for name in CHECKED:
        for item in rng.sample(_eval_items(name, shared_datasets), 150):
            planted.append(rng.choice(templates).format(item))
            origin.append(name)
    hits = decontam.find_contaminated(planted, indexes)
    caught = {i for i in hits}
    missed = [(origin[i], planted[i][:120]) for i in range(len(planted)) if i not in caught]
    assert not missed, f"{len(missed)} planted eval items not caught: {missed[:5]}"
    assert all(hits[i][0] == origin[i] for i in range(len(planted))), "the eval set each item came from is named"

    clean = _clean_rows(shared_datasets)
    assert len(clean) > 15000
    flagged = decontam.find_contaminated(clean, indexes)
    assert len(flagged) / len(clean) <= 0.01, f"{len(flagged)} of {len(clean)} clean rows flagged"


def test_short_changes_do_not_hide_a_copy(indexes, shared_datasets):
    item = _eval_items("truthfulqa", shared_datasets)[10]
    variants = [item.upper(), item.replace(" ", "   "), item.replace(",", ""), "Q: " + item + " Thanks!"]
    assert set(decontam.find_contaminated(variants, indexes)) == set(range(len(variants)))


def test_build_drops_planted_rows_and_reports_per_source_and_eval_set(tmp_path, shared_datasets, bundled_checkpoint):
    rng = random.Random(1)
    mmlu = rng.sample(_eval_items("mmlu", shared_datasets), 5)
    gsm = [json.loads(line) for line in (shared_datasets / "gsm8k/test.jsonl").read_text().splitlines()[:5]]
    rows = [{"prompt": f"Answer the question.\n{q}", "reply": "B"} for q in mmlu]
    rows += [{"prompt": g["question"], "reply": g["answer"]} for g in gsm]
    dolly = [json.loads(line) for line in (shared_datasets / "dolly/databricks-dolly-15k.first34.jsonl").read_text().splitlines()]
    rows += [{"prompt": d["instruction"] + "\n" + d["context"], "reply": d["response"]} for d in dolly[:20]]
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "tokenizer": "bundled", "max_seq_length": 1024, "val_rows_per_source": 0,
        "sources": [{"name": "mix", "path": "mix.jsonl", "fields": {"instruction": "prompt", "output": "reply"},
                     "license": "mixed", "provenance": "human"}]}))
    out = build(recipe, tmp_path / "out", data_dir=shared_datasets)
    m = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    contaminated = [r for r in rejects if r["stage"] == "contaminated"]
    assert sorted(r["detail"].split(":")[0] for r in contaminated) == ["gsm8k_test"] * 5 + ["mmlu"] * 5
    assert m["counts"]["mix"]["contaminated"] == 10
    assert m["decontamination"]["n"] == 8
    evals = m["decontamination"]["eval_sets"]
    assert evals["mmlu"]["contaminated_rows_by_source"] == {"mix": 5}
    assert evals["gsm8k_test"]["contaminated_rows_by_source"] == {"mix": 5}
    assert evals["cnn_dm_test"]["status"].startswith("skipped")  # no local copy of CNN/DM test
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(train) == 20 - m["counts"]["mix"]["too_long"] - m["counts"]["mix"]["near_duplicate"]


def test_report_mode_keeps_rows_but_counts_them(tmp_path, shared_datasets, bundled_checkpoint):
    gsm = [json.loads(line) for line in (shared_datasets / "gsm8k/test.jsonl").read_text().splitlines()[:3]]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gsm))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "tokenizer": "bundled", "val_rows_per_source": 0,
        "decontamination": {"eval_sets": ["gsm8k_test"], "action": "report"},
        "sources": [{"name": "m", "path": "m.jsonl", "fields": {"instruction": "question", "output": "answer"},
                     "license": "MIT", "provenance": "human"}]}))
    out = build(recipe, tmp_path / "out", data_dir=shared_datasets)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["m"]["contaminated_kept"] == 3 and m["counts"]["m"]["train"] == 3


def test_vectorised_minhash_equals_datasketch_and_finds_near_duplicates(shared_datasets):
    """The near-dedup signatures are datasketch's MinHash values, computed a chunk at a time."""
    import numpy as np
    from datasketch import MinHash

    from onegpu.data.filters import RowText, minhash_signatures, near_duplicates

    rows = [json.loads(line) for line in (shared_datasets / "gsm8k/train.jsonl").read_text().splitlines()[:40]]
    texts = [r["question"] + " " + r["answer"] for r in rows]
    rng = random.Random(3)
    edited = []
    for t in texts[:10]:  # a near copy: one word changed
        words = t.split()
        words[rng.randrange(len(words))] = "perhaps"
        edited.append(" ".join(words))
    text = RowText.of(texts + edited)
    from onegpu.data.decontam import ngram_hashes

    grams, seg = ngram_hashes(text.words, text.starts, 5)
    grams = grams & np.uint64(0xFFFFFFFF)
    bounds = np.searchsorted(seg, np.arange(len(text) + 1))
    sigs = minhash_signatures(grams, bounds, 64)
    for i in range(5):
        m = MinHash(num_perm=64, seed=1, hashfunc=int)
        m.update_batch(grams[bounds[i]:bounds[i + 1]].tolist())
        assert (m.hashvalues == sigs[i]).all()
    dups = near_duplicates(text, list(range(len(text))), threshold=0.8)
    true_jaccard = []
    for k in range(10):
        a = set(grams[bounds[k]:bounds[k + 1]].tolist())
        b = set(grams[bounds[40 + k]:bounds[41 + k]].tolist())
        true_jaccard.append(len(a & b) / len(a | b))
    # 64 permutations estimate Jaccard within ~0.05: pairs well above the threshold must be found
    expected = {40 + k: k for k in range(10) if true_jaccard[k] >= 0.93}
    assert len(expected) >= 3
    found = {i: j for i, (j, _) in dups.items()}
    assert expected.items() <= found.items() and set(found) <= set(range(40, 50))
