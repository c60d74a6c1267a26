"""Data stage point 5: n-gram decontamination against the open-eval sets.

Eval items planted into a mix are caught 100% (whole, the prompt alone, the answer alone); clean
GSM8K-train rows held out from tuning the rule are flagged <= 0.5% (a shared stock phrase of a
worked solution is not a copy), clean instruction data <= 0.1%; the build drops contaminated rows
into rejects naming the eval set. ``benchmarks/decontam_precision.py`` prints the same numbers
for the rule's variants."""

from __future__ import annotations

import json
import random

import pytest

from onegpu.data import decontam
from onegpu.data.build import build
from onegpu.data.probes import (HIDDEN_SETS, PLANTED_SETS, clean_mix, family_train_rows, flan_strategyqa,
                                gsm8k_train_probe, planted)


@pytest.fixture(scope="module")
def indexes(shared_datasets):
    return [decontam.load_index(name, shared_datasets) for name in PLANTED_SETS]


def _eval_texts(name, shared_datasets):
    return [f"{prompt} {answer}" for prompt, answer in decontam.read_items(name, shared_datasets)]


def test_planted_eval_items_are_all_caught_whole_or_in_part(indexes, shared_datasets):
    for kind, rows in planted(shared_datasets).items():
        hits = decontam.find_contaminated([text for _, text in rows], indexes)
        missed = [(origin, text[:120]) for i, (origin, text) in enumerate(rows) if i not in hits]
        assert not missed, f"{kind}: {len(missed)} of {len(rows)} planted eval items not caught: {missed[:5]}"
        assert all(hits[i][0] == origin for i, (origin, _) in enumerate(rows)), "the eval set each came from is named"
        assert len(rows) >= (750 if kind == "whole" else 150)


def test_clean_rows_are_rarely_flagged(indexes, shared_datasets):
    """Held-out clean GSM8K-train rows: the rule before this one (3 shared 8-grams anywhere) flagged
    ~1% for stock phrases of worked solutions; the prompt-side rule flags <= 0.5%."""
    _, held_out, same_problem = gsm8k_train_probe(shared_datasets)
    assert len(held_out) > 3500 and same_problem  # some train problems are test problems with new numbers
    flagged = decontam.find_contaminated(held_out, indexes)
    assert len(flagged) / len(held_out) <= 0.005, f"{len(flagged)} of {len(held_out)} clean GSM8K-train rows flagged"
    anywhere = decontam.find_contaminated(held_out, indexes, answer_matches=None)
    assert len(anywhere) / len(held_out) > 0.005  # the probe holds the false positives the side rule removes
    assert all(asked == 0 for _, _, _, asked in (anywhere[i] for i in set(anywhere) - set(flagged)))
    assert len(decontam.find_contaminated(same_problem, indexes)) == len(same_problem)

    mix = clean_mix(shared_datasets)
    assert len(mix) > 15000
    flagged = decontam.find_contaminated(mix, indexes)
    assert len(flagged) / len(mix) <= 0.001, f"{len(flagged)} of {len(mix)} clean rows flagged"


def test_the_side_rule_still_finds_the_real_overlap(indexes, shared_datasets):
    """FLAN's StrategyQA rows are BIG-bench's items reworded around the answer ("Yes." moves to the
    end), so short questions share no n-gram of their own: every row the rule before found is found."""
    rows = flan_strategyqa(shared_datasets)
    found = decontam.find_contaminated(rows, indexes)
    assert set(found) == set(decontam.find_contaminated(rows, indexes, answer_matches=None))
    assert len(found) / len(rows) > 0.99 and {hit[0] for hit in found.values()} == {"bigbench"}
    strict = decontam.find_contaminated(rows, indexes, short_prompts_too=False)
    assert set(strict) < set(found)  # demanding prompt-side n-grams of short questions misses some (52)


def test_the_hidden_evals_test_splits_are_caught_and_their_train_splits_kept(shared_datasets):
    """MATH, ETHICS, Corr2Cause and DialogSum test items planted whole, prompt alone or answer alone are all
    caught; none of their own train rows (the closest clean text) nor the clean mix is flagged."""
    hidden_indexes = [decontam.load_index(name, shared_datasets) for name in HIDDEN_SETS]
    plants = planted(shared_datasets, sets=HIDDEN_SETS)
    for kind, rows in plants.items():
        hits = decontam.find_contaminated([text for _, text in rows], hidden_indexes)
        assert sorted(hits) == list(range(len(rows))), kind
        assert all(hits[i][0] == origin for i, (origin, _) in enumerate(rows))
    assert len(plants["whole"]) == 64 and len(plants["answer"]) == 29
    for name, rows in family_train_rows(shared_datasets).items():
        assert len(rows) >= 40 and not decontam.find_contaminated(rows, hidden_indexes), name
    mix = clean_mix(shared_datasets)
    assert not decontam.find_contaminated(mix, hidden_indexes)


def test_corr2cause_items_count_only_whole(shared_datasets):
    """Corr2Cause is one template over other variables: any two items share most n-grams, so only an item's
    whole text (premise and hypothesis) is a copy; the n-gram rule would flag a fifth of its train rows."""
    index = [decontam.load_index("corr2cause_test", shared_datasets)]
    items = [prompt for prompt, _ in decontam.read_items("corr2cause_test", shared_datasets)]
    premise, hypothesis = items[1].split("\n")
    other = next(i for i in items if i.split("\n")[0] == premise and i != items[1])
    rows = [f"Question: {items[1].upper()}  Answer: No.",   # the item, whole, in a wrapper: a copy
            premise,                                          # its premise alone: every item of 2 variables has it
            f"{premise}\nHypothesis: A and B share no cause.",  # a hypothesis no item has
            f"{other}\n{hypothesis}"]                      # two items' parts run together: holds the other item
    hits = decontam.find_contaminated(rows, index)
    assert sorted(hits) == [0, 3] and hits[0][1] == 1 and hits[3][1] == items.index(other)
    train = family_train_rows(shared_datasets)["corr2cause_test"]
    as_ngrams = [decontam.build_index("corr2cause_test", iter(decontam.read_items("corr2cause_test", shared_datasets)),
                                      decontam.DEFAULT_N, 50, "local")]
    assert len(decontam.find_contaminated(train, as_ngrams)) >= 4 and not decontam.find_contaminated(train, index)


def test_short_changes_do_not_hide_a_copy(indexes, shared_datasets):
    item = _eval_texts("truthfulqa", shared_datasets)[10]
    variants = [item.upper(), item.replace(" ", "   "), item.replace(",", ""), "Q: " + item + " Thanks!"]
    assert set(decontam.find_contaminated(variants, indexes)) == set(range(len(variants)))


def test_build_drops_planted_rows_and_reports_per_source_and_eval_set(tmp_path, shared_datasets, bundled_checkpoint):
    rng = random.Random(1)
    mmlu = rng.sample(_eval_texts("mmlu", shared_datasets), 5)
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
