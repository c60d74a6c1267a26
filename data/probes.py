"""What decontamination is measured on: eval items planted into training text, and clean probes.

``tests/test_data_decontam.py`` pins the numbers ``benchmarks/decontam_precision.py`` reports, on
the same inputs from ``../shared/datasets``:

* ``planted``: eval items as a training set could hold them: whole (prompt + answer) under four
  wrappers; the prompt alone with a made-up answer (only prompts of at least n + 2 words, which an
  n-gram rule can see); the reference answer alone (answers of at least 20 words).
* ``gsm8k_train_probe``: GSM8K-train rows as the data stage reads them (question + worked
  solution), split into a tuning half (even records) and a held-out half (odd records). Rows whose
  question shares a 13-word run with a GSM8K test question (GPT-3's contamination test) are set
  aside: those are the same problem with other numbers, not clean rows.
* ``clean_mix``: human-written instruction data that is not an eval set.
* ``flan_strategyqa``: a real overlap to find: FLAN's StrategyQA rows are BIG-bench's
  ``strategyqa`` task (the question, then the explanation without BIG-bench's leading "Yes."/"No.").
* the hidden eval's test splits (``HIDDEN_SETS``: MATH, ETHICS, Corr2Cause, DialogSum) are planted the
  same way (every item of the small local samples), and ``family_train_rows`` gives each family's own
  train split as the data stage makes its rows: the closest clean text there is to a test item.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from onegpu.data.decontam import DEFAULT_N, WordHasher, ngram_hashes, read_items
from onegpu.data.filters import RowText, row_text
from onegpu.data.loading import load_records
from onegpu.data.sources import SOURCES, Reject

WRAPPERS = ("{}", "Question: {}\nAnswer:", "### Instruction:\n{}\n\n### Response:", "{}  (from a quiz)")
PLANTED_SETS = ("mmlu", "truthfulqa", "gsm8k_test", "bbq", "bigbench")
HIDDEN_SETS = ("math_test", "ethics_test", "corr2cause_test", "dialogsum_test")
FAMILY_TRAIN = {"math_test": "math", "ethics_test": "ethics", "corr2cause_test": "corr2cause", "dialogsum_test": "dialogsum"}
SAME_PROBLEM_RUN = 13  # words a train question shares with a test question to be the same problem (GPT-3)


def planted(data_dir: Path, per_set: int = 150, seed: int = 0, n: int = DEFAULT_N,
            sets: tuple[str, ...] = PLANTED_SETS) -> dict[str, list[tuple[str, str]]]:
    """{"whole" | "prompt" | "answer": [(eval set, training text)]}: eval items copied into training text
    (``per_set`` of each set, or all of a smaller one)."""
    rng, partial_rng = random.Random(seed), random.Random(seed + 1)
    hasher = WordHasher()
    out: dict[str, list[tuple[str, str]]] = {"whole": [], "prompt": [], "answer": []}
    for name in sets:
        items = read_items(name, data_dir)
        for prompt, answer in rng.sample(items, min(per_set, len(items))):
            out["whole"].append((name, rng.choice(WRAPPERS).format(f"{prompt} {answer}")))
            if len(hasher.words(prompt)) >= n + 2:
                out["prompt"].append((name, partial_rng.choice(WRAPPERS).format(prompt) + " I think the answer is 42."))
            if len(hasher.words(answer)) >= 20:
                out["answer"].append((name, answer))
    return out


def gsm8k_train_probe(data_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """(tuning half, held-out half, set aside as the same problem as a test question) of GSM8K train."""
    hasher = WordHasher()
    test_questions = RowText.of([q for q, _ in read_items("gsm8k_test", data_dir)], hasher)
    test_runs = set(ngram_hashes(test_questions.words, test_questions.starts, SAME_PROBLEM_RUN)[0].tolist())
    tuning, held_out, same_problem = [], [], []
    src = SOURCES["gsm8k"]
    for i, rec in enumerate(load_records(src, data_dir)):
        row = next(iter(src.convert(rec, src)))
        words = hasher.words(row["instruction"])
        runs = ngram_hashes(words, np.array([0, len(words)]), SAME_PROBLEM_RUN)[0].tolist()
        if test_runs.intersection(runs):
            same_problem.append(row_text(row))
        else:
            (tuning if i % 2 == 0 else held_out).append(row_text(row))
    return tuning, held_out, same_problem


def clean_mix(data_dir: Path) -> list[str]:
    """Human-written training text that is not an eval set (FLAN's StrategyQA is: it is BIG-bench's)."""
    texts = []
    for name, opts in [("dolly", {}), ("oasst1", {}), ("lima", {}), ("cnn_dailymail", {}),
                       ("natural_instructions", {"max_per_task": 400}), ("self_instruct_seed", {})]:
        src = SOURCES[name]
        for rec in load_records(src, data_dir):
            texts += [row_text(row) for row in src.convert(rec, src, **opts) if not isinstance(row, Reject)]
    src = SOURCES["flan_cot"]
    for rec in load_records(src, data_dir, subsets=["aqua", "creak", "ecqa", "qasc", "sensemaking"]):
        texts.append(row_text(next(iter(src.convert(rec, src)))))
    return texts


def flan_strategyqa(data_dir: Path) -> list[str]:
    """FLAN CoT's StrategyQA rows: BIG-bench's strategyqa items, reworded around the answer."""
    src = SOURCES["flan_cot"]
    return [row_text(next(iter(src.convert(rec, src)))) for rec in load_records(src, data_dir, subsets=["strategyqa"])]


def family_train_rows(data_dir: Path) -> dict[str, list[str]]:
    """{hidden eval set: the row texts of its family's train split}, as ``data build`` makes them."""
    out = {}
    for eval_set, name in FAMILY_TRAIN.items():
        src = SOURCES[name]
        out[eval_set] = [row_text(row) for rec in load_records(src, data_dir) for row in src.convert(rec, src)
                         if not isinstance(row, Reject)]
    return out
