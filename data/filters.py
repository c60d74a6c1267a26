"""Row filters of the data stage: duplicates (exact and near), language, token length.

All text features come from one pass over the rows (``RowText``): normalised words (lower case,
``\\w+``) hashed once, reused by exact dedup (hash of the word sequence, so case, spacing and
punctuation changes still count as duplicates), near dedup (MinHash over 5-word shingles, LSH from
datasketch) and decontamination (8-grams, ``data/decontam.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.minhash import _fmix  # datasketch's own 32-bit mix, so the signatures equal MinHash's
from tqdm import tqdm

from onegpu.data.decontam import WordHasher, ngram_hashes

SHINGLE = 5  # words per MinHash shingle: long enough that shared boilerplate rarely makes rows "similar"
MINHASH_SEED = 1


def row_text(row: dict) -> str:
    """The text a row is judged by: every turn of a conversation, else instruction + input + output."""
    if row.get("messages"):
        return "\n".join(m["content"] for m in row["messages"])
    return "\n".join((row["instruction"], row["input"], row["output"]))


def similarity_text(row: dict) -> str | None:
    """What near-dedup compares when it differs from ``row_text``: input + output for rows with an input.

    Task datasets (Natural Instructions, FLAN) repeat one long task definition as the instruction of
    every instance; compared whole, two instances of a task look like near duplicates.
    Returns None when ``row_text`` is the right text.
    """
    if row.get("input") and not row.get("messages"):
        return "\n".join((row["input"], row["output"]))
    return None


@dataclass
class RowText:
    """Word hashes of many rows, concatenated: ``words[starts[i]:starts[i+1]]`` is row i."""
    words: np.ndarray
    starts: np.ndarray

    @classmethod
    def of(cls, texts: list[str], hasher: WordHasher | None = None, desc: str = "normalise") -> "RowText":
        hasher = hasher or WordHasher()
        parts, starts = [], [0]
        for t in tqdm(texts, desc=desc, unit="row", leave=False, mininterval=1.0):
            w = hasher.words(t)
            parts.append(w)
            starts.append(starts[-1] + len(w))
        words = np.concatenate(parts) if parts else np.empty(0, np.uint64)
        return cls(words, np.array(starts, dtype=np.int64))

    @classmethod
    def concat(cls, parts: list[np.ndarray]) -> RowText:
        starts = np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)]).astype(np.int64)
        return cls(np.concatenate(parts) if parts else np.empty(0, np.uint64), starts)

    def row(self, i: int) -> np.ndarray:
        return self.words[self.starts[i]:self.starts[i + 1]]

    def subset(self, keep: list[int]) -> RowText:
        return RowText.concat([self.row(i) for i in keep])

    def __len__(self) -> int:
        return len(self.starts) - 1


def similarity_words(full: RowText, rows: list[dict], hasher: WordHasher | None = None) -> RowText:
    """Word hashes near-dedup compares: ``full`` except rows whose ``similarity_text`` differs."""
    hasher = hasher or WordHasher()
    parts = []
    for i, r in enumerate(rows):
        t = similarity_text(r)
        parts.append(full.row(i) if t is None else hasher.words(t))
    return RowText.concat(parts)


def exact_duplicates(text: RowText) -> dict[int, int]:
    """{row: first row with the same normalised word sequence}."""
    seen: dict[int, int] = {}
    dups: dict[int, int] = {}
    for i in range(len(text)):
        key = xxhash.xxh64_intdigest(text.row(i).tobytes())
        if key in seen:
            dups[i] = seen[key]
        else:
            seen[key] = i
    return dups


def minhash_signatures(shingle_hashes: np.ndarray, bounds: np.ndarray, num_perm: int = 64,
                       seed: int = MINHASH_SEED) -> np.ndarray:
    """datasketch MinHash signatures (scheme affine32) of many rows at once, shape (rows, num_perm).

    Row i's shingles are ``shingle_hashes[bounds[i]:bounds[i+1]]`` (32-bit values, each row non-empty).
    Same values as ``MinHash(num_perm, seed, hashfunc=int).update_batch(shingles)`` (a test checks it),
    computed for a whole chunk of rows in numpy instead of one Python object per row.
    """
    a, b = MinHash(num_perm=num_perm, seed=seed, hashfunc=int).permutations
    a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    hv = _fmix(shingle_hashes.astype(np.uint32), 32).reshape(1, -1)
    out = np.empty((len(bounds) - 1, num_perm), dtype=np.uint32)
    # Blocks of rows with <= ~64k shingles: the (num_perm, shingles) work buffer stays small and is
    # reused (a fresh 100 MB array per chunk costs more in page faults than the arithmetic).
    block = 1 << 16
    buf = np.empty((num_perm, block), dtype=np.uint32)
    row = 0
    n_rows = len(bounds) - 1
    with np.errstate(over="ignore"):
        while row < n_rows:
            end = int(np.searchsorted(bounds, bounds[row] + block, side="right")) - 1
            end = max(end, row + 1)
            lo, hi = int(bounds[row]), int(bounds[end])
            work = buf[:, :hi - lo] if hi - lo <= block else np.empty((num_perm, hi - lo), dtype=np.uint32)
            np.multiply(a, hv[:, lo:hi], out=work)
            np.add(work, b, out=work)
            out[row:end] = np.minimum.reduceat(work, bounds[row:end] - lo, axis=1).T
            row = end
    return out


def near_duplicates(text: RowText, candidates: list[int], threshold: float = 0.8, num_perm: int = 64,
                    on_kept: Callable[[list[int]], None] | None = None) -> dict[int, tuple[int, float]]:
    """{row: (earlier similar row, estimated Jaccard)} among ``candidates`` (in order).

    MinHash over 5-word shingles, datasketch's LSH to find candidate pairs; an LSH hit is confirmed
    by the signatures' estimated Jaccard >= threshold, so LSH false positives are not dropped.
    ``on_kept`` is called after each chunk of candidates with the ones it kept: their fate is final,
    so the caller can start on them (the data build tokenizes them) while later chunks are checked.
    """
    grams, seg = ngram_hashes(text.words, text.starts, SHINGLE)
    grams = grams & np.uint64(0xFFFFFFFF)  # datasketch's affine32 scheme hashes 32-bit values
    bounds = np.searchsorted(seg, np.arange(len(text) + 1))
    # LSH bands tuned for recall (datasketch's default weighs misses and false candidates equally,
    # which finds only ~36% of pairs at exactly the threshold); false candidates are verified below.
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    sigs = np.zeros((len(text), num_perm), dtype=np.uint32)  # signatures of kept rows, by row
    dups: dict[int, tuple[int, float]] = {}
    chunk = 2048
    with tqdm(total=len(candidates), desc="near-dedup", unit="row", leave=False, mininterval=1.0) as bar:
        for start in range(0, len(candidates), chunk):
            ids = candidates[start:start + chunk]
            parts = []
            for i in ids:
                s = grams[bounds[i]:bounds[i + 1]]
                if not len(s):  # shorter than one shingle: the whole (short) text is its only shingle
                    s = np.array([xxhash.xxh64_intdigest(text.row(i).tobytes()) & 0xFFFFFFFF], dtype=np.uint64)
                parts.append(s)
            offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
            chunk_sigs = minhash_signatures(np.concatenate(parts), offsets, num_perm)
            for i, sig in zip(ids, chunk_sigs):
                lean = LeanMinHash(seed=MINHASH_SEED, hashvalues=sig, scheme="affine32")
                best = None
                found = lsh.query(lean)
                if found:
                    cands = np.array(sorted(found))
                    sims = (sigs[cands] == sig).sum(axis=1) / num_perm  # = MinHash.jaccard, all at once
                    ok = np.flatnonzero(sims >= threshold)
                    if len(ok):
                        best = (int(cands[ok[0]]), round(float(sims[ok[0]]), 3))
                if best is None:
                    lsh.insert(i, lean, check_duplication=False)
                    sigs[i] = sig
                else:
                    dups[i] = best
            if on_kept is not None:
                on_kept([i for i in ids if i not in dups])
            bar.update(len(ids))
    return dups


def detect_script_language(text: str) -> str:
    """A cheap language guess used when a source gives none: 'en' for Latin-script text, else 'other'.

    It tells English from, say, Chinese or Russian rows; it cannot tell English from French. Sources
    that carry a language tag (OASST) are filtered by their tag instead.
    """
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "en"
    latin = sum(c.isascii() for c in letters)
    return "en" if latin / len(letters) >= 0.8 else "other"
