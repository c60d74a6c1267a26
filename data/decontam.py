"""Decontamination: word n-gram overlap between training rows and the challenge's evaluation sets.

Why n = 8 words (not GPT-3's 13): the open eval is full of short items. With 13-grams, most MMLU
questions, TruthfulQA questions and BIG-bench inputs have no complete 13-gram outside their answer
choices, so a copied item can slip through. 8-grams (PaLM's choice for its contamination study)
catch every planted item in ``tests/test_data_decontam.py``.
Eval n-grams shared by many eval items are template boilerplate ("which of the following is
..."); they say nothing about one item and are dropped from the index (``max_item_share``).

Where a match falls matters. Worked solutions share stock phrases ("multiply by 100 to express the
answer as a percentage"): a clean GSM8K-train row can share a 10-word run of one with a test
solution, 3 n-grams, and nothing of the question. So each indexed n-gram remembers whether it
starts in the item's prompt side (question, context, input, answer options) or in its reference
answer, and a row counts as a copy when it shares ``min_matches`` n-grams with the item *and one of
them is on the prompt side* (items whose prompt is too short to hold an n-gram of its own are
spared that condition), or when it shares ``answer_matches`` answer-side n-grams (a solution
copied without its question: a ~15-word run). ``benchmarks/decontam_precision.py`` measures the
rule against its variants (false positives on held-out clean GSM8K-train rows, recall on planted
eval items).

Template-generated sets are the exception: every Corr2Cause item is the same sentences over other
variables, so any two items share most of their n-grams and only a whole item is evidence. Those sets
(``match="exact"``) count a row as a copy when it holds an item's whole text (premise and hypothesis)
as one run of words: each item is indexed by the n-gram of it that the fewest items share (its
anchor) and the hash of its whole word sequence, and a row is checked only where it holds an anchor.

Text is normalised (lower case, ``\\w+`` words) so punctuation and spacing changes do not hide a
copy. Each eval set's n-grams are computed once and cached as a sorted uint64 array in
``$ONEGPU_CACHE/decontam`` (keyed by the files' sizes/mtimes, n and this module's version); a
batch of training rows is then checked with one vectorised ``searchsorted``.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import xxhash
from datasets import DownloadManager, load_dataset

from onegpu.contracts import staged_dir
from onegpu.data import hidden
from onegpu.data.loading import download, hub_dialogsum, hub_math
from onegpu.paths import cache_dir

INDEX_VERSION = "7"
DEFAULT_N = 8
DEFAULT_ANSWER_MATCHES = 8  # answer-side n-grams that alone make a copy (a ~15-word run)
_WORD = re.compile(r"\w+|[\u2190-\u2BFF\U0001F000-\U0001FAFF]")  # words, plus emoji/symbols (BIG-bench emoji tasks)
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier for the polynomial n-gram hash
_MASK = (1 << 64) - 1
_BITMAP_BITS = 26  # 64 MiB of bools; a few million eval grams fill ~5% of it


# ----------------------------------------------------------------------------------- hashing
class WordHasher:
    """Word -> stable 64-bit hash (xxh64), memoised: vocabularies are small, texts are long."""

    def __init__(self):
        self._cache: dict[str, int] = {}

    def words(self, text: str) -> np.ndarray:
        cache = self._cache
        out = []
        for w in _WORD.findall(text.lower()):
            h = cache.get(w)
            if h is None:
                h = cache[w] = xxhash.xxh64_intdigest(w.encode("utf-8"))
            out.append(h)
        return np.array(out, dtype=np.uint64)

    def numeric(self, text: str) -> np.ndarray:
        return np.array([w.isdigit() for w in _WORD.findall(text)], dtype=bool)


def ngram_hashes(words: np.ndarray, starts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """All n-gram hashes of concatenated word-hash arrays; returns (hashes, owning segment index).

    ``starts`` are the segment offsets into ``words`` (len = segments + 1). Grams crossing a
    segment boundary are dropped.
    """
    total = len(words)
    if total < n:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    m = total - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _MULT + words[k:k + m]
    seg = np.searchsorted(starts, np.arange(m), side="right") - 1
    valid = np.arange(m) + n <= starts[seg + 1]
    return h[valid], seg[valid]


def _valid_starts(starts: np.ndarray, n: int, total: int) -> np.ndarray:
    m = max(total - n + 1, 0)
    seg = np.searchsorted(starts, np.arange(m), side="right") - 1
    return np.arange(m) + n <= starts[seg + 1]


# ----------------------------------------------------------------------------------- eval sets
Item = tuple[str, str]  # (prompt side, answer side) of one eval item


@dataclass
class EvalSet:
    """One eval set; its readers yield each item as (what the model is asked, the reference answer)."""
    name: str
    description: str
    local: list[str]  # globs relative to the data dir
    read_local: Callable[[Path], Iterator[Item]]
    hub: Callable[[], Iterator[Item]] | None = None
    match: str = "ngram"  # "exact": template-generated items, a copy holds a whole item (module docstring)


def _read_mmlu_csv(path: Path) -> Iterator[Item]:
    with open(path, newline="", encoding="utf-8") as fh:
        for rec in csv.DictReader(fh):  # the choices are part of what the model is asked
            yield " ".join([rec.get("question", "")] + [rec.get(f"choice{i}", "") for i in range(4)]), ""


def _read_truthfulqa_csv(path: Path) -> Iterator[Item]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for rec in csv.DictReader(fh):
            yield rec.get("Question", ""), rec.get("Best Answer", "")


def _join(rec: dict, fields: tuple[str, ...]) -> str:
    return " ".join(str(rec.get(f, "")) for f in fields)


def _read_jsonl(prompt: tuple[str, ...], answer: tuple[str, ...]) -> Callable[[Path], Iterator[Item]]:
    def read(path: Path) -> Iterator[Item]:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    yield _join(rec, prompt), _join(rec, answer)
    return read


def _read_bbq(path: Path) -> Iterator[Item]:
    if path.suffix == ".json":
        recs = json.loads(path.read_text(encoding="utf-8"))["examples"]
    else:
        recs = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    for rec in recs:  # the answer options are part of the prompt
        yield _join(rec, ("context", "question", "ans0", "ans1", "ans2")), ""


def _read_bigbench(path: Path) -> Iterator[Item]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    for ex in doc.get("examples", []):
        target = ex.get("target", "")
        yield ex.get("input", ""), target if isinstance(target, str) else " ".join(map(str, target))


def _hub(path: str, prompt: tuple[str, ...], answer: tuple[str, ...], name: str | None = None,
         split: str = "test") -> Callable[[], Iterator[Item]]:
    def read() -> Iterator[Item]:
        for rec in load_dataset(path, name, split=split):
            yield _join(rec, prompt), _join(rec, answer)
    return read


def _read_math(path: Path) -> Iterator[Item]:
    rec = hidden.read_math_problem(path)
    yield rec["problem"], rec["solution"]


def _ethics_items(subset: str, rows: list[dict]) -> Iterator[Item]:
    for item in hidden.ethics_items(subset, rows):  # what the model is asked is the scenario; the answer is a label
        yield item["text"], ""


def _read_ethics(path: Path) -> Iterator[Item]:
    yield from _ethics_items(path.parent.name, hidden.read_ethics_csv(path))  # ethics/<subset>/<file>.csv


def _read_corr2cause(path: Path) -> Iterator[Item]:
    for rec in hidden.read_corr2cause_csv(path):
        yield rec["input"], ""


def _read_dialogues(path: Path) -> Iterator[Item]:
    for rec in hidden.read_dialogues(path):
        yield rec["dialogue"], " ".join(rec["summaries"])


def _hub_math() -> Iterator[Item]:
    for rec in hub_math("test"):
        yield rec["problem"], rec["solution"]


def _hub_ethics() -> Iterator[Item]:
    """The files the challenge's HELM fork scored (commonsense and justice: the hard test sets), and the
    upstream test splits."""
    for subset in hidden.ETHICS_SUBSETS:
        yield from _ethics_items(subset, hidden.read_ethics_csv(download(hidden.HELM_FORK_FILES[subset]), subset))
        yield from _ethics_items(subset, list(load_dataset(hidden.ETHICS_HUB, subset, split="test")))


def _hub_corr2cause() -> Iterator[Item]:
    yield from _read_corr2cause(download(hidden.HELM_FORK_FILES["corr2cause"]))
    for rec in load_dataset(hidden.CORR2CAUSE_HUB, split="test"):
        yield rec["input"], ""


def _hub_samsum() -> Iterator[Item]:
    yield from _read_dialogues(download(hidden.HELM_FORK_FILES["samsum"]))
    for rec in load_dataset(hidden.SAMSUM_HUB, split="test"):
        yield rec["dialogue"], rec["summary"]


def _hub_dialogsum() -> Iterator[Item]:
    for rec in hub_dialogsum("test"):
        yield rec["dialogue"], " ".join(rec["summaries"])


_BIGBENCH_URL = "https://raw.githubusercontent.com/google/BIG-bench/main/bigbench/benchmark_tasks"
_BBQ_URL = "https://raw.githubusercontent.com/nyu-mll/BBQ/main/data"


def _hub_urls(urls: list[str], reader: Callable[[Path], Iterator[Item]]) -> Callable[[], Iterator[Item]]:
    def read() -> Iterator[Item]:
        for local in DownloadManager().download(urls):
            yield from reader(Path(local))
    return read


EVAL_SETS: dict[str, EvalSet] = {e.name: e for e in [
    EvalSet("mmlu", "MMLU test + dev (5-shot examples)", ["mmlu/test/*.csv", "mmlu/dev/*.csv"], _read_mmlu_csv,
            hub=_hub("cais/mmlu", ("question", "choices"), (), "all")),
    EvalSet("truthfulqa", "TruthfulQA questions + best answers (2025 and v1)", ["truthfulqa/TruthfulQA.csv",
            "truthfulqa/data/v1/TruthfulQA.csv"], _read_truthfulqa_csv,
            hub=_hub("truthfulqa/truthful_qa", ("question",), ("best_answer",), "generation", "validation")),
    EvalSet("gsm8k_test", "GSM8K test (+ socratic)", ["gsm8k/test.jsonl", "gsm8k/test_socratic.jsonl"],
            _read_jsonl(("question",), ("answer",)), hub=_hub("openai/gsm8k", ("question",), ("answer",), "main")),
    EvalSet("bbq", "BBQ (9 categories incl. BBQ-lite stand-ins)", ["bbq/data/*.jsonl", "bbq/bbq_lite_from_bigbench/*.json"],
            _read_bbq, hub=_hub_urls([f"{_BBQ_URL}/{c}.jsonl" for c in (
                "Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance", "Race_ethnicity",
                "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation")], _read_bbq)),
    EvalSet("bigbench", "BIG-bench tasks of the challenge's open eval", ["bigbench/**/task.json"], _read_bigbench,
            hub=_hub_urls([f"{_BIGBENCH_URL}/{t}/task.json" for t in (
                "auto_debugging", "code_line_description", "emoji_movie", "formal_fallacies_syllogisms_negation",
                "known_unknowns", "linguistics_puzzles", "logic_grid_puzzle", "novel_concepts", "operators",
                "play_dialog_same_or_different", "repeat_copy_logic", "strategyqa", "vitaminc_fact_verification",
                "winowhy")], _read_bigbench)),
    EvalSet("cnn_dm_test", "CNN/DailyMail 3.0.0 test articles + highlights", [], _read_jsonl(("article",), ("highlights",)),
            hub=_hub("abisee/cnn_dailymail", ("article",), ("highlights",), "3.0.0")),
    # the hidden eval's families (data/hidden.py)
    EvalSet("math_test", "MATH test problems + worked solutions (7 subjects)", [hidden.MATH_FILES.format(
            split="test", subject="*")], _read_math, hub=_hub_math),
    EvalSet("ethics_test", "ETHICS test scenarios (5 subsets; hub: + the hard sets the hidden eval scored)",
            [f.format(subset="*") for f in hidden.ETHICS_EVAL_FILES], _read_ethics, hub=_hub_ethics),
    EvalSet("corr2cause_test", "Corr2Cause test (hub: + the file the hidden eval scored); whole items",
            [hidden.CORR2CAUSE_FILES.format(split="test")], _read_corr2cause, hub=_hub_corr2cause, match="exact"),
    EvalSet("samsum_test", "SAMSum test dialogues + summaries (the file the hidden eval scored)", [], _read_dialogues,
            hub=_hub_samsum),
    EvalSet("dialogsum_test", "DialogSum test dialogues + 3 summaries each (the offline SAMSum stand-in)",
            [hidden.DIALOGSUM_FILES.format(split="test")], _read_dialogues, hub=_hub_dialogsum),
]}


# ----------------------------------------------------------------------------------- the index
@dataclass
class EvalIndex:
    """Sorted n-gram hashes of one eval set, with the item each came from and the side it is on."""
    name: str
    grams: np.ndarray   # uint64, sorted, unique
    items: np.ndarray   # int32: index of one eval item holding that gram
    prompt_side: np.ndarray  # bool: the gram starts in that item's prompt (question, context, input)
    n_items: int
    short_items: int    # items with fewer than n words (cannot be checked by n-gram)
    dropped_boilerplate: int
    origin: str         # "local:<dir>" | "hub"
    item_ngrams: np.ndarray  # int32 per item: how many indexed grams it has
    item_answer_ngrams: np.ndarray  # int32 per item: how many of them are on its answer side
    item_prompt_ngrams: np.ndarray  # int32 per item: how many lie wholly inside its prompt
    # match="exact" sets (then ``grams`` holds the anchors): per item, its anchor n-gram, where the anchor
    # starts in it, its length in words and the hash of its whole word sequence
    anchor: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    anchor_offset: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    length: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    whole: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))


def _files(eval_set: EvalSet, data_dir: Path) -> list[Path]:
    out: list[Path] = []
    for pattern in eval_set.local:
        out += sorted(Path(p) for p in glob.glob(str(data_dir / pattern), recursive=True))
    return out


def read_items(name: str, data_dir: Path) -> list[Item]:
    """The (prompt, answer) items of one eval set from its local copy."""
    eval_set = EVAL_SETS[name]
    return [item for f in _files(eval_set, data_dir) for item in eval_set.read_local(f)]


def build_index(name: str, items: Iterator[Item], n: int, max_item_share: int, origin: str) -> EvalIndex:
    hasher = WordHasher()
    words, digits, starts, prompt_words, short = [], [], [0], [], 0
    for prompt, answer in items:
        asked = hasher.words(prompt)
        w = np.concatenate([asked, hasher.words(answer)])
        prompt_words.append(len(asked))
        short += len(w) < n
        words.append(w)
        digits.append(np.concatenate([hasher.numeric(prompt.lower()), hasher.numeric(answer.lower())]))
        starts.append(starts[-1] + len(w))
    n_items, starts = len(words), np.array(starts)
    allwords = np.concatenate(words) if words else np.empty(0, np.uint64)
    grams, seg = ngram_hashes(allwords, starts, n)
    at = np.flatnonzero(_valid_starts(starts, n, len(allwords)))  # where each gram starts
    offset, asked = at - starts[seg], np.array(prompt_words, dtype=np.int64)[seg]
    prompt, inside = offset < asked, offset + n <= asked  # starts among the prompt's words / lies wholly inside
    # Grams made mostly of numbers ("5 x 4 5 4 20 20", GSM8K's calculator notes) match any arithmetic.
    isdigit = np.concatenate(digits).astype(np.int64) if digits else np.empty(0, np.int64)
    csum = np.concatenate([[0], np.cumsum(isdigit)])
    wordy = (csum[at + n] - csum[at]) * 2 <= n
    grams, seg, prompt, inside = grams[wordy], seg[wordy], prompt[wordy], inside[wordy]
    # distinct (gram, item) pairs sorted by gram, then item, prompt side first; then how many items hold each gram
    order = np.lexsort((~inside, ~prompt, seg, grams))
    g, it, side, inside = grams[order], seg[order], prompt[order], inside[order]
    distinct = np.ones(len(g), bool)
    distinct[1:] = (g[1:] != g[:-1]) | (it[1:] != it[:-1])
    g, it, side, inside = g[distinct], it[distinct], side[distinct], inside[distinct]
    run_start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.empty(0, np.int64)
    counts = np.diff(np.r_[run_start, len(g)])
    keep = counts <= max_item_share
    held = np.repeat(keep, counts)
    return EvalIndex(name, g[run_start[keep]], it[run_start[keep]].astype(np.int32), side[run_start[keep]],
                     n_items, int(short), int((~keep).sum()), origin,
                     np.bincount(it[held], minlength=n_items).astype(np.int32),
                     np.bincount(it[held & ~side], minlength=n_items).astype(np.int32),
                     np.bincount(it[held & inside], minlength=n_items).astype(np.int32))


def horner(words: np.ndarray) -> int:
    """The hash ``ngram_hashes`` gives a run of words, for a run of any length."""
    h = 0
    for w in words.tolist():
        h = (h * int(_MULT) + w) & _MASK
    return h


def build_exact_index(name: str, items: Iterator[Item], n: int, origin: str) -> EvalIndex:
    """An index of whole items (``match="exact"``): each item's anchor (its n-gram the fewest items share),
    the anchor's offset, the item's length and whole-sequence hash. Only the prompt side is an item's
    text (its answer is a label)."""
    hasher = WordHasher()
    words = [hasher.words(prompt) for prompt, _ in items]
    long = [i for i, w in enumerate(words) if len(w) >= n]
    starts = np.concatenate([[0], np.cumsum([len(words[i]) for i in long])]).astype(np.int64)
    allwords = np.concatenate([words[i] for i in long]) if long else np.empty(0, np.uint64)
    grams, seg = ngram_hashes(allwords, starts, n)
    at = np.flatnonzero(_valid_starts(starts, n, len(allwords))) - starts[seg]
    pairs = np.unique(np.stack([grams, seg.astype(np.uint64)]), axis=1)  # distinct (gram, item)
    uniq, held_by = np.unique(pairs[0], return_counts=True)
    share = held_by[np.searchsorted(uniq, grams)]
    order = np.lexsort((at, share, seg))  # per item: rarest gram first, earliest among equals
    first = order[np.r_[True, seg[order][1:] != seg[order][:-1]]] if len(order) else order
    return EvalIndex(name, np.unique(grams[first]), np.empty(0, np.int32), np.empty(0, bool), len(words),
                     len(words) - len(long), 0, origin, *(np.zeros(len(words), np.int32) for _ in range(3)),
                     anchor=grams[first], anchor_offset=at[first].astype(np.int64),
                     length=np.array([len(words[i]) for i in long], np.int64),
                     whole=np.array([horner(words[i]) for i in long], np.uint64))


def load_index(name: str, data_dir: Path | None, n: int = DEFAULT_N, max_item_share: int = 50) -> EvalIndex | None:
    """The cached index of one eval set; None when it has no local copy in ``data_dir``."""
    eval_set = EVAL_SETS[name]
    if data_dir is not None:
        files = _files(eval_set, data_dir)
        if not files:
            return None
        key = "|".join(f"{f.relative_to(data_dir)}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
        origin = f"local:{data_dir}"
    else:
        files, key, origin = [], "hub", "hub"
    digest = hashlib.sha256(f"{INDEX_VERSION}|{name}|{n}|{max_item_share}|{key}".encode()).hexdigest()[:16]
    cached = cache_dir() / "decontam" / f"{name}-n{n}-{digest}"
    arrays = ("grams", "items", "prompt_side", "item_ngrams", "item_answer_ngrams", "item_prompt_ngrams",
              "anchor", "anchor_offset", "length", "whole")
    if (cached / "index.npz").is_file():
        z = np.load(cached / "index.npz")
        meta = json.loads(str(z["meta"]))
        return EvalIndex(name, z["grams"], z["items"], z["prompt_side"], meta["n_items"], meta["short_items"],
                         meta["dropped_boilerplate"], origin, *(z[a] for a in arrays[3:6]),
                         **{a: z[a] for a in arrays[6:]})
    items = (item for f in files for item in eval_set.read_local(f)) if files else eval_set.hub()
    index = build_exact_index(name, items, n, origin) if eval_set.match == "exact" else \
        build_index(name, items, n, max_item_share, origin)
    meta = {"n_items": index.n_items, "short_items": index.short_items, "dropped_boilerplate": index.dropped_boilerplate}
    with staged_dir(cached) as work:  # a build killed mid-write leaves no half index behind
        np.savez(work / "index.npz", meta=np.array(json.dumps(meta)), **{a: getattr(index, a) for a in arrays})
    return index


Hit = tuple[str, int, int, int]  # (eval set, eval item, shared n-grams, of them on the item's prompt side)


def find_contaminated(texts: list[str], indexes: list[EvalIndex], n: int = DEFAULT_N, min_matches: int = 3,
                      answer_matches: int | None = DEFAULT_ANSWER_MATCHES, short_prompts_too: bool = True,
                      hasher: WordHasher | None = None) -> dict[int, Hit]:
    """{row position: (eval set, eval item, shared n-grams, shared on its prompt side)} for contaminated texts.

    A text is a copy of an eval item when it shares ``min_matches`` distinct n-grams with it (all of
    them when the item has fewer) and at least one of them starts on the item's prompt side (its
    question, context, input or options), or when it shares ``answer_matches`` of the item's
    answer-side n-grams (a reference answer copied without its question; all of them when the answer
    has fewer). An item whose prompt holds no indexed n-gram of its own (fewer than n words, e.g.
    "Does Disney have an ice princess?") cannot show that evidence: any ``min_matches`` n-grams
    count for it (unless ``short_prompts_too=False``). ``answer_matches=None``: no side is weighed.
    The first eval set (in ``indexes`` order) that matches is reported.
    """
    hasher = hasher or WordHasher()
    words, starts = [], [0]
    for t in texts:
        w = hasher.words(t)
        words.append(w)
        starts.append(starts[-1] + len(w))
    if not texts:
        return {}
    return find_contaminated_words(np.concatenate(words), np.array(starts), indexes, n, min_matches, answer_matches,
                                   short_prompts_too)


def find_contaminated_words(words: np.ndarray, starts: np.ndarray, indexes: list[EvalIndex], n: int = DEFAULT_N,
                            min_matches: int = 3, answer_matches: int | None = DEFAULT_ANSWER_MATCHES,
                            short_prompts_too: bool = True) -> dict[int, Hit]:
    """``find_contaminated`` on pre-hashed words (``data.filters.RowText``)."""
    grams, seg = ngram_hashes(words, starts, n)
    place = np.flatnonzero(_valid_starts(starts, n, len(words)))  # where each gram starts in ``words``
    # A bitmap over the low hash bits of every eval gram rules out most training grams with one
    # lookup each; only the few that pass pay for a binary search in each index.
    bitmap = np.zeros(1 << _BITMAP_BITS, dtype=bool)
    low = np.uint64((1 << _BITMAP_BITS) - 1)
    for index in indexes:
        bitmap[(index.grams & low).astype(np.int64)] = True
    maybe = bitmap[(grams & low).astype(np.int64)]
    grams, seg, place = grams[maybe], seg[maybe], place[maybe]
    hits: dict[int, Hit] = {}
    for index in indexes:
        if not len(index.grams) or not len(grams):
            continue
        if len(index.anchor):
            for row, item in whole_item_copies(words, starts, grams, seg, place, index):
                hits.setdefault(row, (index.name, item, int(index.length[item]) - n + 1, int(index.length[item]) - n + 1))
            continue
        pos = np.searchsorted(index.grams, grams)
        pos[pos == len(index.grams)] = 0
        found = index.grams[pos] == grams
        # distinct (row, gram) first, then count grams per (row, item), and those on the prompt side
        rows, g = seg[found], grams[found]
        order = np.lexsort((g, rows))
        rows, g = rows[order], g[order]
        distinct = np.ones(len(g), bool)
        distinct[1:] = (g[1:] != g[:-1]) | (rows[1:] != rows[:-1])
        rows, g = rows[distinct], g[distinct]
        if not len(g):
            continue
        at = np.searchsorted(index.grams, g)
        items = index.items[at].astype(np.int64)
        keys, inverse, counts = np.unique(rows.astype(np.int64) * index.n_items + items, return_inverse=True,
                                          return_counts=True)
        on_prompt = np.bincount(inverse.ravel(), weights=index.prompt_side[at], minlength=len(keys)).astype(np.int64)
        row_of, item_of = keys // index.n_items, keys % index.n_items
        need = np.minimum(min_matches, np.maximum(index.item_ngrams[item_of], 1))
        if answer_matches is None:
            copied = counts >= need
        else:
            asked = (on_prompt > 0) | (short_prompts_too & (index.item_prompt_ngrams[item_of] == 0))
            need_answer = np.minimum(answer_matches, index.item_answer_ngrams[item_of])
            copied = (asked & (counts >= need)) | ((need_answer > 0) & (counts - on_prompt >= need_answer))
        for row, item, count, prompt_count in zip(row_of[copied].tolist(), item_of[copied].tolist(),
                                                  counts[copied].tolist(), on_prompt[copied].tolist()):
            if row not in hits or hits[row][0] == index.name and count > hits[row][2]:
                hits[row] = (index.name, item, count, prompt_count)
    return hits


def whole_item_copies(words: np.ndarray, starts: np.ndarray, grams: np.ndarray, seg: np.ndarray, at: np.ndarray,
                      index: EvalIndex) -> list[tuple[int, int]]:
    """(row, item) where a row holds an exact-match item's whole word sequence: at each place a row holds an
    item's anchor, the hash of the run the item would fill is compared with the item's."""
    order = np.argsort(index.anchor, kind="stable")
    anchors = index.anchor[order]
    lo, hi = np.searchsorted(anchors, grams, "left"), np.searchsorted(anchors, grams, "right")
    counts = hi - lo
    if not counts.sum():
        return []
    cand = np.repeat(np.arange(len(grams)), counts)  # one (place, item) pair per item with that anchor
    item = order[np.repeat(lo, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)]
    begin = at[cand] - index.anchor_offset[item]
    row = seg[cand]
    inside = (begin >= starts[row]) & (begin + index.length[item] <= starts[row + 1])
    cand, item, begin, row = cand[inside], item[inside], begin[inside], row[inside]
    if not len(item):
        return []
    # Horner hashes of the runs, from prefix sums over only the rows involved:
    # hash(w[b:b+L]) = M^(b+L-1) * (C[b+L] - C[b]), C[i] = sum_{j<i} w[j] * M^-j (all mod 2^64)
    rows = np.unique(row)
    lengths = starts[rows + 1] - starts[rows]
    local_start = np.concatenate([[0], np.cumsum(lengths)])
    sub = np.concatenate([words[starts[r]:starts[r + 1]] for r in rows.tolist()])
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(len(sub) + 1, _MULT, np.uint64))
        powers = np.concatenate([[np.uint64(1)], powers[:-1]])  # M^0 .. M^len
        inverse = np.cumprod(np.full(len(sub) + 1, np.uint64(pow(int(_MULT), -1, 1 << 64)), np.uint64))
        inverse = np.concatenate([[np.uint64(1)], inverse[:-1]])
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(sub * inverse[:-1], dtype=np.uint64)])
        b = begin - starts[row] + local_start[np.searchsorted(rows, row)]
        end = b + index.length[item]
        run = powers[end - 1] * (prefix[end] - prefix[b])
    same = run == index.whole[item]
    return sorted(set(zip(row[same].tolist(), item[same].tolist())))
