"""Decontamination rule variants: false positives on clean rows vs recall on planted eval items.

Inputs (``onegpu.data.probes``, from ../shared/datasets): eval items of MMLU, TruthfulQA, GSM8K
test, BBQ and BIG-bench planted into training text (whole, prompt alone, answer alone), clean
GSM8K-train rows (a tuning half and a held-out half; rows that are the same problem as a test
question, by a shared 13-word run of the question, are set aside and reported), a clean
instruction mix (Dolly, OASST, LIMA, CNN/DM, Natural Instructions, Self-Instruct seeds, FLAN CoT),
and a real overlap: FLAN CoT's StrategyQA rows, which are BIG-bench's strategyqa task reworded.
Every variant uses the same 8-gram index (boilerplate n-grams held by > 50 eval items and
mostly-number n-grams dropped, as ``onegpu data build`` does); they differ in what makes a match.

A second table does the same for the hidden eval's test splits (MATH, ETHICS, Corr2Cause (whole items),
DialogSum) with the default rule: recall on every planted item of the local samples, and false
positives on each family's own train split (its closest clean text), on the clean instruction mix and
on held-out GSM8K-train rows.

    python benchmarks/decontam_precision.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onegpu.data import decontam
from onegpu.data.filters import RowText
from onegpu.data.probes import (HIDDEN_SETS, PLANTED_SETS, clean_mix, family_train_rows, flan_strategyqa,
                                gsm8k_train_probe, planted)
from onegpu.paths import shared_datasets_dir

NEVER = 10**9  # answer_matches that no row reaches: the answer side alone never decides
# (label, min_matches, answer_matches, short_prompts_too); answer_matches None = no side is weighed
VARIANTS = [
    ("any 3 n-grams, anywhere (the rule before)", 3, None, True),
    ("any 5 n-grams, anywhere", 5, None, True),
    ("any 8 n-grams, anywhere", 8, None, True),
    ("3, >= 1 in the prompt, short prompts too; answers never alone", 3, NEVER, False),
    ("3, >= 1 in the prompt; answers never alone", 3, NEVER, True),
    ("3, >= 1 in the prompt; or 4 of the answer", 3, 4, True),
    ("3, >= 1 in the prompt; or 6 of the answer", 3, 6, True),
    ("3, >= 1 in the prompt; or 8 of the answer (default)", 3, decontam.DEFAULT_ANSWER_MATCHES, True),
    ("3, >= 1 in the prompt; or 12 of the answer", 3, 12, True),
    ("3, >= 1 in the prompt; or 16 of the answer", 3, 16, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=None, help="default: ../shared/datasets")
    parser.add_argument("--show", type=int, default=3, help="print this many flagged held-out rows for the default rule")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    data_dir = args.data_dir or shared_datasets_dir()
    if data_dir is None:
        sys.exit("no local datasets: pass --data_dir (a folder laid out like ../shared/datasets)")
    start = time.perf_counter()
    indexes = [decontam.load_index(name, data_dir) for name in PLANTED_SETS]
    plants = planted(data_dir)
    tuning, held_out, same_problem = gsm8k_train_probe(data_dir)
    probes = {"tuning": tuning, "held_out": held_out, "same_problem": same_problem, "mix": clean_mix(data_dir),
              "strategyqa": flan_strategyqa(data_dir)}
    probes.update({f"planted_{kind}": [text for _, text in rows] for kind, rows in plants.items()})
    hashed = {name: RowText.of(texts) for name, texts in probes.items()}
    print(f"GSM8K train: {len(tuning)} tuning + {len(held_out)} held-out clean rows, {len(same_problem)} set aside "
          f"(question shares a 13-word run with a test question); clean mix: {len(probes['mix'])} rows; planted: "
          + ", ".join(f"{len(v)} {k}" for k, v in plants.items()) + f"; load average {os.getloadavg()[0]:.1f}\n")

    def flagged(name: str, min_matches: int, answer_matches: int | None, short_too: bool) -> dict[int, decontam.Hit]:
        text = hashed[name]
        return decontam.find_contaminated_words(text.words, text.starts, indexes, decontam.DEFAULT_N, min_matches,
                                                answer_matches, short_too)

    def rate(name, *rule) -> str:
        return f"{100 * len(flagged(name, *rule)) / len(probes[name]):.2f}%"

    print("| rule (8-grams shared with one eval item) | FP GSM8K-train tuning | FP GSM8K-train held-out | FP clean mix "
          "| flagged same-problem | recall: whole items | recall: prompt alone | recall: answer alone "
          "| found: FLAN StrategyQA |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, *rule in VARIANTS:
        recall = []
        for kind, rows in plants.items():
            hits = flagged(f"planted_{kind}", *rule)
            right = sum(1 for i, (origin, _) in enumerate(rows) if hits.get(i, ("",))[0] == origin)
            recall.append(f"{100 * right / len(rows):.1f}%")
        print(f"| {label} | {rate('tuning', *rule)} | {rate('held_out', *rule)} | {rate('mix', *rule)} | "
              f"{len(flagged('same_problem', *rule))}/{len(same_problem)} | {' | '.join(recall)} | "
              f"{len(flagged('strategyqa', *rule))}/{len(probes['strategyqa'])} |")
    hits = flagged("held_out", 3, decontam.DEFAULT_ANSWER_MATCHES, True)
    print(f"\nHeld-out rows the default rule flags ({len(hits)}), first {args.show}:")
    for i in list(hits)[: args.show]:
        eval_name, item, shared, asked = hits[i]
        print(f"- {eval_name} #{item}: {shared} shared 8-grams, {asked} in its question: {held_out[i][:160]!r}")
    hidden_table(data_dir, probes["mix"], held_out)
    print(f"\n{time.perf_counter() - start:.0f} s")


def hidden_table(data_dir: Path, mix: list[str], held_out: list[str]) -> None:
    """Recall and false positives of the default rule on the hidden eval's test splits."""
    print("\nThe hidden eval's test splits, default rule (Corr2Cause: whole items):\n")
    print("| eval set | items | recall: whole | recall: prompt alone | recall: answer alone "
          "| FP: its family's train rows | FP clean mix | FP GSM8K-train held-out |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    train = family_train_rows(data_dir)
    for name in HIDDEN_SETS:
        index = [decontam.load_index(name, data_dir)]
        plants = planted(data_dir, sets=(name,))

        def flagged(texts: list[str]) -> dict[int, decontam.Hit]:
            return decontam.find_contaminated(texts, index) if texts else {}

        recall = []
        for kind in ("whole", "prompt", "answer"):
            rows = plants[kind]
            found = flagged([text for _, text in rows])
            recall.append(f"{len(found)}/{len(rows)}" if rows else "-")
        fp = [f"{len(flagged(t))}/{len(t)}" for t in (train[name], mix, held_out)]
        print(f"| {name} | {index[0].n_items} | {' | '.join(recall)} | {' | '.join(fp)} |")
    # why Corr2Cause is matched whole: its items are one template over other variables
    items = decontam.read_items("corr2cause_test", data_dir)
    as_ngrams = [decontam.build_index("corr2cause_test", iter(items), decontam.DEFAULT_N, 50, "local")]
    rows = train["corr2cause_test"]
    print(f"\nCorr2Cause with the n-gram rule instead of whole items: {len(decontam.find_contaminated(rows, as_ngrams))}"
          f"/{len(rows)} of its train rows flagged (none of them is a test item)")


if __name__ == "__main__":
    main()
