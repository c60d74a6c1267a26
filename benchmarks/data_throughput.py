"""Data stage throughput: 100k records through dedup + decontamination + tokenization.

The records are built from ../shared/datasets (NI, Flan CoT, GSM8K, Dolly, OASST, CNN/DM, LIMA):
real rows, plus copies perturbed three ways until there are N: exact copies after normalisation
(case/spacing), near copies (a few words changed), and fresh variants (a new sentence appended).

Two tables, one run:

1. Where the time goes (``--profile``, on by default): each phase of the filter stage timed on its
   own, one after the other, tokenization both on one thread and on tokenizers' thread pool.
2. Side by side, in alternation (``--rounds``): ``onegpu.data.mix.filter_rows`` (the code
   ``onegpu data build`` runs) on the same records with ``parallel=False`` (one thread, one stage
   after the other) and ``parallel=True`` (tokenization on the pool, overlapped with near-dedup).
   Both must give the same kept rows, token counts and rejects; the script checks it.

The machine may be shared: each row shows the 1-minute load average before and after it, and CPU
seconds (all threads of this process) beside wall seconds. With the kernel's autogroup scheduling
(Linux desktops and many VMs), a busy machine gives everything started from one terminal a fixed share
of the cores, however many threads it runs; then only the CPU seconds shrink, not the wall time.

    python benchmarks/data_throughput.py                 # 100k records, 2 rounds (goal: < 30 s wall on 2 cores)
    python benchmarks/data_throughput.py --n 20000 --rounds 3 --profile false
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onegpu.data import decontam
from onegpu.data.mix import filter_rows
from onegpu.data.filters import RowText, exact_duplicates, near_duplicates, row_text, similarity_words
from onegpu.data.schema import render
from onegpu.data.loading import load_records
from onegpu.data.sources import SOURCES, Reject
from onegpu.data.tokens import count_tokens, load_tokenizer
from onegpu.paths import shared_datasets_dir

EVAL_SETS = ("mmlu", "truthfulqa", "gsm8k_test", "bbq", "bigbench")
STYLE = "smollm2"
# The filter-stage settings of data/recipes/quickstart.yaml, without the length filters (every
# survivor is tokenized and kept, so the token counts of both paths can be compared).
RECIPE = {"languages": None, "prompt_style": STYLE, "max_seq_length": 10**9, "min_tokens": 0,
          "dedup": {"exact": True, "near": True, "threshold": 0.8, "num_perm": 64},
          "decontamination": {"eval_sets": list(EVAL_SETS), "n": decontam.DEFAULT_N, "min_matches": 3,
                              "answer_matches": decontam.DEFAULT_ANSWER_MATCHES, "action": "drop"}}


def real_rows(data_dir: Path) -> list[dict]:
    rows = []
    for name in ("natural_instructions", "flan_cot", "gsm8k", "dolly", "oasst1", "cnn_dailymail", "lima"):
        src = SOURCES[name]
        for rec in load_records(src, data_dir):
            rows += [r for r in src.convert(rec, src, max_per_task=2000) if not isinstance(r, Reject)]
    return rows


def make_records(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = list(rows[:n])
    filler = ["Please answer briefly.", "Think step by step.", "Explain your reasoning.", "Be concise."]
    while len(out) < n:
        r = dict(rng.choice(rows))
        kind = rng.random()
        if kind < 0.2:  # exact duplicate after normalisation
            r["instruction"] = "  " + r["instruction"].upper()
        elif kind < 0.4:  # near duplicate: change a couple of words of the output
            words = r["output"].split()
            for _ in range(min(2, len(words))):
                words[rng.randrange(len(words))] = rng.choice(["indeed", "perhaps", "also"])
            r["output"] = " ".join(words)
        else:  # a fresh variant
            r["instruction"] = f"{r['instruction']} {rng.choice(filler)} (variant {len(out)})"
            r["output"] = f"{r['output']}\nReference {rng.randrange(10**9)}."
        out.append(r)
    return out


def timed(fn):
    """(value, wall s, CPU s of every thread of this process, load average before, after)."""
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - start, time.process_time() - cpu, load, os.getloadavg()[0]


def profile(records: list[dict], data_dir: Path, tokenizer) -> None:
    """Each phase on its own, one thread unless it says pool."""
    rows: list[tuple] = []

    def phase(name, n, fn, note=""):
        value, wall, cpu, before, after = timed(fn)
        rows.append((name, n, wall, cpu, before, after, note(value) if callable(note) else note))
        return value

    words = phase("normalise (word hashes)", len(records), lambda: RowText.of([row_text(r) for r in records]))
    dups = phase("exact dedup", len(records), lambda: exact_duplicates(words), lambda d: f"{len(d)} dropped")
    keep = [i for i in range(len(words)) if i not in dups]
    texts = words.subset(keep)
    sim = similarity_words(texts, [records[i] for i in keep])
    near = phase("near dedup (MinHash/LSH)", len(keep), lambda: near_duplicates(sim, list(range(len(keep)))),
                 lambda d: f"{len(d)} dropped")
    indexes = phase("decontam: load eval n-gram cache", 0, lambda: [decontam.load_index(e, data_dir) for e in EVAL_SETS])
    unique = [i for i in range(len(keep)) if i not in near]  # positions in `texts`
    survivors = texts.subset(unique)
    hits = phase("decontam: check rows", len(unique), lambda: decontam.find_contaminated_words(
        survivors.words, survivors.starts, indexes), lambda h: f"{len(h)} contaminated")
    left = [records[keep[i]] for k, i in enumerate(unique) if k not in hits]
    phase(f"render ({STYLE} template)", len(left), lambda: [render(r, STYLE) for r in left])
    for pool in (False, True):
        phase(f"tokenize: render + encode, {'pool' if pool else 'one thread'}", len(left),
              lambda pool=pool: count_tokens(left, STYLE, tokenizer, parallel=pool), lambda c: f"{sum(c)} tokens")
    print("\nWhere the time goes (each phase alone)\n")
    print("| phase | records | wall s | CPU s | load before/after | note |\n|---|---:|---:|---:|---|---|")
    for name, n, wall, cpu, before, after, note in rows:
        print(f"| {name} | {n} | {wall:.2f} | {cpu:.2f} | {before:.1f} / {after:.1f} | {note} |")


def side_by_side(records: list[dict], data_dir: Path, tokenizer, rounds: int) -> None:
    results, reference = [], None
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)  # alternate which path goes first
        for parallel in order:
            rejects: list[dict] = []
            counts: dict[str, Counter] = defaultdict(Counter)
            rec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in RECIPE.items()}
            (kept, tokens), wall, cpu, before, after = timed(
                partial(filter_rows, rec, records, rejects, counts, data_dir, tokenizer, parallel=parallel))
            outcome = ([k["id"] for k in kept], tokens, [(x["stage"], x["id"], x["detail"]) for x in rejects])
            if reference is None:
                reference = outcome
            assert outcome == reference, "the parallel and plain paths disagree"
            results.append((r, parallel, len(kept), sum(tokens), wall, cpu, before, after))
    print(f"\nSide by side: filter_rows on {len(records)} records (dedup + decontamination + tokenization), "
          f"{rounds} rounds in alternation\n")
    print("| round | path | rows kept | tokens | wall s | CPU s | load before/after |\n|---:|---|---:|---:|---:|---:|---|")
    for r, parallel, kept, tokens, wall, cpu, before, after in results:
        path = "parallel (pool, overlapped with near-dedup)" if parallel else "plain (one thread, stage after stage)"
        print(f"| {r} | {path} | {kept} | {tokens} | {wall:.1f} | {cpu:.1f} | {before:.1f} / {after:.1f} |")
    for parallel in (False, True):
        mine = [x for x in results if x[1] == parallel]
        print(f"| median | {'parallel' if parallel else 'plain'} | | | {median(x[4] for x in mine):.1f} | "
              f"{median(x[5] for x in mine):.1f} | |")
    wall = {(r, parallel): w for r, parallel, _, _, w, *_ in results}
    ratios = [wall[r, False] / wall[r, True] for r in range(rounds)]
    print(f"\nplain/parallel wall per round: {', '.join(f'{x:.2f}x' for x in ratios)}; outputs identical in every run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="records")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of plain vs parallel")
    parser.add_argument("--profile", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                        help="also time each phase on its own first")
    parser.add_argument("--data_dir", type=Path, default=None, help="default: ../shared/datasets")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the CLI sets it; the data stage opts in
    import datasets

    datasets.disable_progress_bars()
    data_dir = args.data_dir or shared_datasets_dir()
    if data_dir is None:
        sys.exit("no local datasets: pass --data_dir (a folder laid out like ../shared/datasets)")
    tokenizer, _ = load_tokenizer("bundled")
    rows = real_rows(data_dir)
    records = make_records(rows, args.n)
    print(f"{len(records)} records ({len(rows)} real rows + perturbed copies); eval sets: {', '.join(EVAL_SETS)}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    for name in EVAL_SETS:  # build the eval n-gram caches first: the tables show the steady state
        decontam.load_index(name, data_dir)
    if args.profile:
        profile(records, data_dir, tokenizer)
    side_by_side(records, data_dir, tokenizer, args.rounds)


if __name__ == "__main__":
    main()
