"""Data stage throughput: 100k records through dedup + decontamination + tokenization.

The records are built from ../shared/datasets (NI, Flan CoT, GSM8K, Dolly, OASST, CNN/DM):
real rows, plus copies perturbed three ways until there are N: exact copies after normalisation
(case/spacing), near copies (a few words changed), and fresh variants (a new sentence appended).

onegpu's phases are timed on all N records; a straightforward baseline (sha256 per row, datasketch
MinHash updated shingle by shingle, a Python set of eval n-gram strings, tokenizer.encode per row)
runs on a slice of them and is reported as records/s, since it is far too slow for 100k.

    python benchmarks/data_throughput.py               # 100k records (goal: < 60 s on 2 cores)
    python benchmarks/data_throughput.py --n 20000 --baseline_n 2000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onegpu.data import decontam  # noqa: E402
from onegpu.data.build import _count_tokens, _similarity_words, _subset, load_tokenizer  # noqa: E402
from onegpu.data.filters import RowText, exact_duplicates, near_duplicates, row_text  # noqa: E402
from onegpu.data.sources import SOURCES, Reject, load_records  # noqa: E402
from onegpu.paths import shared_datasets_dir  # noqa: E402

EVAL_SETS = ("mmlu", "truthfulqa", "gsm8k_test", "bbq", "bigbench")


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


CPU: dict[str, float] = {}  # phase -> CPU seconds of this process (the machine is shared: wall time is noisy)


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    CPU["last"] = time.process_time() - cpu
    return value, time.perf_counter() - start


class Results(list):
    """Rows of (phase, records, wall s, CPU s, note); the CPU time of the last ``timed`` call."""

    def append(self, item):
        name, n, t, note = item
        super().append((name, n, t, CPU.get("last", 0.0), note))


def onegpu_phases(records: list[dict], data_dir: Path, tokenizer) -> list[tuple]:
    results = Results()
    texts, t = timed(lambda: [row_text(r) for r in records])
    words, t_norm = timed(lambda: RowText.of(texts))
    results.append(("normalise (word hashes)", len(records), t_norm, "xxh64 per word, memoised"))
    dups, t = timed(lambda: exact_duplicates(words))
    results.append(("exact dedup", len(records), t, f"{len(dups)} dropped"))
    keep = [i for i in range(len(words)) if i not in dups]
    near, t = timed(lambda: near_duplicates(_similarity_words(words, records), keep))
    results.append(("near dedup (MinHash/LSH)", len(keep), t, f"{len(near)} dropped, 64 perms, 5-word shingles"))
    indexes, t = timed(lambda: [decontam.load_index(name, data_dir) for name in EVAL_SETS])
    results.append(("decontam: load eval n-gram cache", sum(i.n_items for i in indexes), t,
                    f"{sum(len(i.grams) for i in indexes)} 8-grams"))
    kept_after_near = [i for i in keep if i not in near]
    survivors_text = _subset(words, kept_after_near)
    hits, t = timed(lambda: decontam.find_contaminated_words(survivors_text.words, survivors_text.starts, indexes))
    results.append(("decontam: check rows", len(kept_after_near), t, f"{len(hits)} contaminated"))
    # as in `onegpu data build`: only rows that survive dedup and decontamination are tokenized
    survivors = [records[i] for k, i in enumerate(kept_after_near) if k not in hits]
    counts, t = timed(lambda: _count_tokens(survivors, "smollm2", tokenizer))
    results.append(("tokenize survivors (render + batch encode)", len(survivors), t,
                    f"{sum(counts)} tokens, {sum(counts) / t:,.0f} tokens/s"))
    return results


def baseline_phases(records: list[dict], data_dir: Path, tokenizer) -> list[tuple]:
    from datasketch import MinHash, MinHashLSH

    from onegpu.data.schema import render

    norm = [" ".join(re.findall(r"\w+", row_text(r).lower())) for r in records]
    results = Results()

    def exact():
        seen, dups = set(), 0
        for t in norm:
            h = hashlib.sha256(t.encode()).hexdigest()
            dups += h in seen
            seen.add(h)
        return dups
    _, t = timed(exact)
    results.append(("exact dedup", len(records), t, "sha256 per row"))

    def near():
        lsh = MinHashLSH(threshold=0.8, num_perm=64)
        for i, t in enumerate(norm):
            m = MinHash(num_perm=64)
            w = t.split()
            for j in range(max(len(w) - 4, 1)):
                m.update(" ".join(w[j:j + 5]).encode())
            lsh.query(m)
            lsh.insert(i, m)
    _, t = timed(near)
    results.append(("near dedup (MinHash/LSH)", len(records), t, "MinHash.update per shingle"))

    def build_set():
        grams = set()
        for name in EVAL_SETS:
            e = decontam.EVAL_SETS[name]
            for f in decontam._files(e, data_dir):
                for text in e.read_local(f):
                    w = re.findall(r"\w+", text.lower())
                    grams.update(" ".join(w[j:j + 8]) for j in range(len(w) - 7))
        return grams
    grams, t = timed(build_set)
    results.append(("decontam: build eval n-gram set", 0, t, f"{len(grams)} 8-gram strings (every run)"))

    def check():
        hits = 0
        for t in norm:
            w = t.split()
            hits += any(" ".join(w[j:j + 8]) in grams for j in range(len(w) - 7))
        return hits
    _, t = timed(check)
    results.append(("decontam: check rows", len(records), t, "set lookup per n-gram"))

    def tokenize():
        return [len(tokenizer.encode("".join(render(r, "smollm2")), add_special_tokens=False).ids) for r in records]
    _, t = timed(tokenize)
    results.append(("tokenize (render + encode per row)", len(records), t, ""))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="records for onegpu")
    parser.add_argument("--baseline_n", type=int, default=5_000, help="records for the baseline (0: skip it)")
    parser.add_argument("--data_dir", type=Path, default=None, help="default: ../shared/datasets")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    data_dir = args.data_dir or shared_datasets_dir()
    if data_dir is None:
        sys.exit("no local datasets: pass --data_dir (a folder laid out like ../shared/datasets)")
    tokenizer, _ = load_tokenizer("bundled")
    rows = real_rows(data_dir)
    records = make_records(rows, args.n)
    print(f"{len(records)} records ({len(rows)} real rows + perturbed copies); eval sets: {', '.join(EVAL_SETS)}")
    # warm the eval n-gram cache first, so the table shows the steady state (and say what cold costs)
    cold = time.perf_counter()
    for name in EVAL_SETS:
        decontam.load_index(name, data_dir)
    cold = time.perf_counter() - cold

    ours = onegpu_phases(records, data_dir, tokenizer)
    print("\n| phase | impl | records | wall s | CPU s | records/s (wall) | note |\n|---|---|---:|---:|---:|---:|---|")
    for name, n, t, cpu, note in ours:
        rate = f"{n / t:,.0f}" if n and t > 0 else "-"
        print(f"| {name} | onegpu | {n} | {t:.2f} | {cpu:.2f} | {rate} | {note} |")
    total, total_cpu = sum(r[2] for r in ours), sum(r[3] for r in ours)
    print(f"| **total (dedup + decontam + tokenize)** | onegpu | {len(records)} | **{total:.1f}** | {total_cpu:.1f} | "
          f"{len(records) / total:,.0f} | eval n-gram cache built once (cold): {cold:.1f} s |")
    if args.baseline_n:
        base = baseline_phases(records[: args.baseline_n], data_dir, tokenizer)
        for name, n, t, cpu, note in base:
            rate = f"{n / t:,.0f}" if n and t > 0 else "-"
            print(f"| {name} | baseline | {n} | {t:.2f} | {cpu:.2f} | {rate} | {note} |")
        per_record = sum(r[2] for r in base if r[1]) / args.baseline_n
        fixed = sum(r[2] for r in base if not r[1])
        print(f"| **total, extrapolated to {len(records)}** | baseline | {len(records)} | "
              f"**{fixed + per_record * len(records):.1f}** | - | {1 / per_record:,.0f} | "
              f"measured on {args.baseline_n}, + {fixed:.1f} s eval set build |")


if __name__ == "__main__":
    main()
