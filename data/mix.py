"""The engine of ``onegpu data build`` (``data/build.py``): recipe YAML -> an auditable training mix.

Pipeline (every drop is counted per source and written to ``rejects.jsonl`` with its stage):

    load      registered sources (each from its location: the data dir, the hub or a path) and local
              files -> rows of data/rows.py; malformed records and OASST messages flagged
              synthetic -> rejects; then every problem of the recipe at once (data/inspection.py:
              availability, rows, weights, budget) before any heavy work
    filter    empty -> language -> exact duplicate -> near duplicate -> eval contamination
              -> token length (the target tokenizer on the rendered prompt + response)
    sample    per source, seeded: hold out val rows, then train rows by count / token cap /
              share of the budget (with or without replacement)
    write     train.jsonl, val.jsonl, rejects.jsonl, manifest.json (with train tokens per eval family
              and the families of the score the mix leaves uncovered), composition.png, and an
              offline W&B run that logs the dir as a ``dataset`` artifact

Same recipe + seed + inputs -> byte-identical train/val/rejects/manifest (no timestamps or
absolute output paths in them; everything iterates in a fixed order).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from matplotlib.figure import Figure
from tqdm import tqdm

from onegpu.contracts import (MANIFEST, artifact_name, atomic_path, atomic_write_text, dataset_content_hash,
                              write_manifest)
from onegpu.data import decontam
from onegpu.data.families import DEFAULT_AFFINITY, coverage_table, family_tokens, read_affinity
from onegpu.data.filters import (RowText, detect_script_language, exact_duplicates, near_duplicates, row_text,
                                 similarity_words)
from onegpu.data.inspection import (Loaded, family_report, inspect_sources, load_tokenizer_or_problem, mix_problems,
                                    resolve_data_dir, summary)
from onegpu.data.recipe import load_recipe, recipe_hash
from onegpu.data.rows import REQUIRED_FIELDS, reject
from onegpu.data.sources import get_source
from onegpu.data.tokens import TokenCounter
from onegpu.errors import UserError, all_problems
from onegpu.paths import runs_dir
from onegpu.tracking import Run, package_versions

FILTER_STAGES = ("loaded", "llm_generated", "malformed", "language", "exact_duplicate", "near_duplicate", "contaminated",
                 "too_long", "too_short")


def build_mix(recipe: Path, out: Path | None, data_dir: Path | None, seed: int | None, parallel: bool) -> Path:
    """``onegpu data build`` (its options: ``data/build.py``): the output directory, built in one tracked run."""
    # Every problem first, in one pass (data/inspection.py): recipe, tokenizer, locations, rows, weights and budget.
    problems: list[UserError] = []
    rec = load_recipe(recipe, seed=seed, problems=problems)
    data_dir = resolve_data_dir(data_dir)
    tokenizer, tok_info = load_tokenizer_or_problem(rec, problems)
    checks, loaded = inspect_sources(rec, data_dir, tokenizer, problems, load_hub=True)
    problems += mix_problems(rec, checks)
    if problems:
        if checks:  # what was found for the sources that could be checked, before the problems
            print(summary(rec, checks, family_report(checks)), file=sys.stderr)
        raise all_problems(problems)
    out = Path(out) if out is not None else runs_dir() / f"data-{rec['name']}"
    out.mkdir(parents=True, exist_ok=True)
    locations = {c.name: c.location for c in checks.values()}
    config = {"recipe": {k: v for k, v in rec.items() if not k.startswith("_")}, "recipe_path": str(recipe),
              "data_dir": str(data_dir) if data_dir else "hub", "locations": locations}
    with Run("data", out, config, after_interrupt="building again from the recipe: a data build does not resume (its "
             "steps take seconds to minutes and are deterministic, so the same recipe and seed rebuild the same "
             "files byte for byte)") as run:
        manifest = build_outputs(run, out, rec, data_dir, tokenizer, tok_info, loaded, locations, parallel)
    print_outcome(manifest, out)
    return out


def build_outputs(run: Run, out: Path, rec: dict, data_dir: Path | None, tokenizer, tok_info: dict,
                  loaded: dict[str, Loaded], locations: dict[str, str], parallel: bool) -> dict:
    """Filter, sample and write the mix into ``out``, logged to ``run`` (tables, plot, the dataset artifact);
    returns the manifest."""
    rows = [r for part in loaded.values() for r in part.rows]
    rejects = [r for part in loaded.values() for r in part.rejects]
    counts = {name: part.counts for name, part in loaded.items()}
    kept, token_counts = filter_rows(rec, rows, rejects, counts, data_dir, tokenizer, parallel)
    train, val, selection = _sample(rec, kept, token_counts)
    manifest = _write_outputs(out, rec, data_dir, tok_info, rows, kept, token_counts, train, val, rejects,
                              counts, selection, package_versions(), locations)
    plot = _plot(out / "composition.png", rec, selection, token_counts, kept, train)
    run.log_table("source_counts", ["source", *FILTER_STAGES, "available", "val", "train", "train_tokens"],
                  [[s, *(c.get(k, 0) for k in FILTER_STAGES), c["available"], c["val"], c["train"],
                    c["train_tokens"]] for s, c in manifest["counts"].items()])
    run.log_image("composition", plot)
    run.summary(train_rows=len(train), val_rows=len(val), rejects=len(rejects),
                train_tokens=manifest["tokens"]["train"]["total"], content_hash=manifest["content_hash"])
    run.log_artifact(out, artifact_name("dataset", rec["name"]), "dataset",
                     {k: manifest[k] for k in ("recipe_hash", "content_hash", "prompt_style", "max_seq_length", "seed")},
                     include=["*.jsonl", "manifest.json", "*.png"], digest=manifest["content_hash"])
    return manifest


def print_outcome(manifest: dict, out: Path) -> None:
    """Train tokens per eval family, the licence terms to weigh, and the rows written."""
    tr, val = manifest["tokens"]["train"], manifest["tokens"]["val"]
    print("train tokens per eval family (split by data/recipes/affinity.yaml):\n" + coverage_table(manifest["families"]))
    flagged = [f"{name} ({c['license_terms']})" for name, c in manifest["counts"].items() if c.get("license_terms")]
    if flagged:
        print("licence terms to weigh: " + "; ".join(flagged))
    print(f"[onegpu data] {tr['rows']} train rows ({tr['total']} tokens), {val['rows']} val rows, "
          f"{sum(manifest['rejects_by_reason'].values())} rejects -> {out}")


# ----------------------------------------------------------------------------------- filter
def filter_rows(rec: dict, rows: list[dict], rejects: list[dict], counts: dict[str, Counter], data_dir: Path | None,
                tokenizer, parallel: bool = True) -> tuple[list[dict], list[int]]:
    """The filter stage: (kept rows, their token counts); each drop goes to ``rejects`` and ``counts``.

    Reads the recipe keys ``languages``, ``dedup``, ``decontamination``, ``prompt_style``,
    ``max_seq_length`` and ``min_tokens``, and records the eval sets checked in ``rec["_eval_report"]``.
    """
    alive = list(range(len(rows)))

    def drop(positions: dict[int, str], stage: str, reason: str) -> None:
        nonlocal alive
        for p in sorted(positions):
            r = rows[p]
            counts[r["source"]][stage] += 1
            rejects.append(reject(stage, reason, r["source"], r["id"], positions[p], r))
        alive = [p for p in alive if p not in positions]

    if rec["languages"]:
        langs = set(rec["languages"])
        bad = {}
        for p in tqdm(alive, desc="language", unit="row", leave=False, mininterval=1.0):
            lang = (rows[p].get("meta") or {}).get("lang") or detect_script_language(row_text(rows[p]))
            if lang not in langs:
                bad[p] = f"language {lang} not in {sorted(langs)}"
        drop(bad, "language", "language")

    texts = RowText.of([row_text(rows[p]) for p in alive])
    if rec["dedup"]["exact"]:
        d = exact_duplicates(texts)
        drop({alive[i]: f"same normalised text as {rows[alive[j]]['id']}" for i, j in d.items()},
             "exact_duplicate", "exact_duplicate")
        texts = texts.subset([i for i in range(len(texts)) if i not in d])

    # Contamination is judged row by row, so it is checked before near-dedup on every row left: then a
    # row near-dedup keeps is final at once, and is tokenized while later rows are still compared.
    # Rows are dropped in stage order all the same (a near duplicate is never counted as contaminated).
    dc = rec["decontamination"]
    hits = _contamination(rec, data_dir, texts)
    candidates = alive
    with TokenCounter(tokenizer, rec["prompt_style"], parallel) as counter:
        def decided(kept: list[int]) -> None:
            counter.submit([candidates[i] for i in kept if dc["action"] != "drop" or i not in hits], rows)

        near: dict[int, tuple[int, float]] = {}
        if rec["dedup"]["near"]:
            near = near_duplicates(similarity_words(texts, [rows[p] for p in candidates]), list(range(len(texts))),
                                   rec["dedup"]["threshold"], rec["dedup"]["num_perm"], on_kept=decided)
        else:
            decided(list(range(len(texts))))
        n_tokens = counter.counts()
    drop({candidates[i]: f"near duplicate of {rows[candidates[j]]['id']} (estimated Jaccard {sim})"
          for i, (j, sim) in near.items()}, "near_duplicate", "near_duplicate")

    hits = {i: hit for i, hit in hits.items() if i not in near}
    per_eval: dict[str, Counter] = defaultdict(Counter)
    for i, (eval_name, *_) in hits.items():
        per_eval[eval_name][rows[candidates[i]]["source"]] += 1
    for name, by_source in per_eval.items():
        rec["_eval_report"][name]["contaminated_rows_by_source"] = dict(sorted(by_source.items()))
    if dc["action"] == "drop":
        drop({candidates[i]: f"{eval_name}: shares {shared} {dc['n']}-grams with eval item #{item} "
                             f"({asked} of them in what it asks)"
              for i, (eval_name, item, shared, asked) in hits.items()}, "contaminated", "contaminated")
    else:
        for i in hits:
            counts[rows[candidates[i]]["source"]]["contaminated_kept"] += 1

    too_long = {p: f"{n_tokens[p]} tokens > max_seq_length {rec['max_seq_length']}"
                for p in alive if n_tokens[p] > rec["max_seq_length"]}
    too_short = {p: f"{n_tokens[p]} tokens < min_tokens {rec['min_tokens']}"
                 for p in alive if n_tokens[p] < rec["min_tokens"]}
    drop(too_long, "too_long", "too_long")
    drop(too_short, "too_short", "too_short")
    return [rows[p] for p in alive], [n_tokens[p] for p in alive]


def _contamination(rec: dict, data_dir: Path | None, texts: RowText) -> dict[int, decontam.Hit]:
    """{row: (eval set, eval item, shared n-grams, on its prompt side)}; each set's status -> rec["_eval_report"]."""
    dc = rec["decontamination"]
    indexes, eval_report = [], {}
    for name in tqdm(dc["eval_sets"], desc="eval n-grams", unit="set", leave=False):
        try:
            idx = decontam.load_index(name, data_dir, dc["n"])
        except Exception as err:  # a hub eval set that cannot be downloaded
            raise UserError(f"eval set {name!r} could not be loaded from the hub: {type(err).__name__}: {err}",
                            fix="check the network, or leave it out of decontamination.eval_sets") from err
        if idx is None:
            eval_report[name] = {"status": f"skipped: no local copy in the data dir ({decontam.EVAL_SETS[name].local or 'hub only'})"}
            continue
        indexes.append(idx)
        eval_report[name] = {"status": "checked", "items": idx.n_items, "ngrams": int(len(idx.grams)),
                             "items_shorter_than_n": idx.short_items, "boilerplate_ngrams_ignored": idx.dropped_boilerplate}
    rec["_eval_report"] = eval_report
    return decontam.find_contaminated_words(texts.words, texts.starts, indexes, dc["n"], dc["min_matches"],
                                            dc["answer_matches"])


# ----------------------------------------------------------------------------------- sample
def _sample(rec: dict, kept: list[dict], token_counts: list[int]):
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(kept):
        by_source[r["source"]].append(i)
    budget = rec["budget_tokens"]
    fixed = 0
    plans = {}
    problems: list[UserError] = []  # every source that falls short after the filters, reported together
    for spec in rec["sources"]:
        name = spec["name"]
        pool = by_source.get(name, [])
        rng = np.random.default_rng([rec["seed"], xxhash.xxh32_intdigest(name.encode())])
        order = [pool[i] for i in rng.permutation(len(pool))]
        n_val = min(spec.get("val_rows", rec["val_rows_per_source"]), len(order))
        if len(order) - n_val <= 0:
            problems.append(UserError(f"source {name!r} has {len(order)} rows left after filters, none for training "
                                      f"(val takes {n_val})", fix="lower val_rows for it, relax the filters, or drop the source"))
        plans[name] = {"spec": spec, "val": order[:n_val], "pool": order[n_val:], "rng": rng}
        plans[name]["available_tokens"] = sum(token_counts[i] for i in order[n_val:])
        if "tokens" in spec:
            fixed += spec["tokens"]
        elif "count" in spec:
            fixed += sum(token_counts[i] for i in order[n_val:n_val + spec["count"]])
    if problems:
        raise all_problems(problems)
    weighted = [p for p in plans.values() if not ({"tokens", "count"} & set(p["spec"]))]
    weight_sum = sum(p["spec"].get("weight", 1.0) for p in weighted)
    if budget is not None:
        left = budget - fixed
        if weighted and left <= 0:
            raise UserError(f"count/tokens sources already take {fixed} of budget_tokens {budget}, nothing is left for "
                            f"{[p['spec']['name'] for p in weighted]}", fix="raise budget_tokens or lower the counts/token caps")
        total_available = sum(p["available_tokens"] for p in plans.values())
        if budget > total_available and not any(p["spec"].get("replace") for p in plans.values()):
            problems.append(UserError(f"budget_tokens {budget} is larger than the data: {total_available} train tokens "
                                      f"left after filters", fix="lower budget_tokens, add sources, or set `replace: true` "
                                                                 "on a source"))
    selection = {}
    train_ids: list[int] = []
    for name, p in plans.items():
        spec, pool = p["spec"], p["pool"]
        if "count" in spec:
            target, unit = spec["count"], "rows"
        elif "tokens" in spec:
            target, unit = spec["tokens"], "tokens"
        elif budget is not None:
            target, unit = int(round((budget - fixed) * spec.get("weight", 1.0) / weight_sum)), "tokens"
        else:
            target, unit = None, "all"
        have = len(pool) if unit == "rows" else p["available_tokens"]
        if target is not None and target > have and not spec.get("replace"):
            what = "weight" if "weight" in spec or unit == "tokens" and "tokens" not in spec else unit
            problems.append(UserError(f"source {name!r} cannot meet its {what}: it needs {target} {unit} but has {have} "
                                      f"after filters and val", fix=f"lower its {'weight' if what == 'weight' else what}, "
                                      f"raise the other sources' weights, or set `replace: true` on it (sampling with replacement)"))
            continue
        chosen = _take(pool, target, unit, token_counts, p["rng"], bool(spec.get("replace")))
        train_ids += chosen
        selection[name] = {"target": target, "unit": unit, "replace": bool(spec.get("replace")),
                           "train_rows": len(chosen), "train_tokens": sum(token_counts[i] for i in chosen),
                           "val_rows": len(p["val"]), "val_tokens": sum(token_counts[i] for i in p["val"]),
                           "available_rows": len(pool), "available_tokens": p["available_tokens"]}
    if problems:
        raise all_problems(problems)
    mix_rng = np.random.default_rng([rec["seed"], 0])
    train_ids = [train_ids[i] for i in mix_rng.permutation(len(train_ids))]
    val_ids = [i for p in plans.values() for i in p["val"]]
    return train_ids, val_ids, selection


def _take(pool: list[int], target, unit: str, token_counts: list[int], rng, replace: bool) -> list[int]:
    if unit == "all":
        return list(pool)
    chosen, total, epoch_order = [], 0, list(pool)
    while True:
        for i in epoch_order:
            if (len(chosen) if unit == "rows" else total) >= target:
                return chosen
            chosen.append(i)
            total += token_counts[i]
        if not replace or not pool:
            return chosen
        epoch_order = [pool[j] for j in rng.permutation(len(pool))]  # next pass: repeat rows in a new order


# ----------------------------------------------------------------------------------- outputs
def _dump_jsonl(path: Path, items: list[dict]) -> str:
    text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    atomic_write_text(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stats(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"rows": 0, "total": 0}
    a = np.array(values)
    return {"rows": len(values), "total": int(a.sum()), "mean": round(float(a.mean()), 1),
            "p50": int(np.percentile(a, 50)), "p95": int(np.percentile(a, 95)), "max": int(a.max())}


def _write_outputs(out: Path, rec, data_dir, tok_info, rows, kept, token_counts, train, val, rejects, counts,
                   selection, versions, locations: dict[str, str]) -> dict:
    train_rows = [kept[i] for i in train]
    val_rows = [kept[i] for i in val]
    for r in train_rows + val_rows:
        assert all(k in r for k in REQUIRED_FIELDS)
    # The manifest goes first and comes back last: a build killed in between leaves a dir that
    # `onegpu finetune` refuses (no manifest), never new rows under an old manifest.
    (out / MANIFEST).unlink(missing_ok=True)
    train_sha = _dump_jsonl(out / "train.jsonl", train_rows)
    val_sha = _dump_jsonl(out / "val.jsonl", val_rows)
    rejects_sha = _dump_jsonl(out / "rejects.jsonl", rejects)
    per_source = {}
    for spec in rec["sources"]:
        name = spec["name"]
        c = counts[name]
        sel = selection[name]
        per_source[name] = {**{k: c.get(k, 0) for k in FILTER_STAGES}, "available": sel["available_rows"] + sel["val_rows"],
                            "val": sel["val_rows"], "train": sel["train_rows"], "train_tokens": sel["train_tokens"]}
        remaining, after = c.get("loaded", 0), {}
        for stage in FILTER_STAGES[2:]:  # rows left after each filter, in pipeline order
            remaining -= c.get(stage, 0)
            after[stage] = remaining
        per_source[name]["remaining_after"] = after
        if c.get("contaminated_kept"):
            per_source[name]["contaminated_kept"] = c["contaminated_kept"]
        if "path" in spec:
            per_source[name]["file"] = spec["path"]
        else:
            src = get_source(name)
            per_source[name].update(license=src.license, provenance=src.provenance, url=src.url,
                                    location=locations[name].split(":")[0])
            if src.terms:
                per_source[name]["license_terms"] = src.terms
    manifest = {
        "name": rec["name"],
        "recipe": {k: v for k, v in rec.items() if not k.startswith("_")},
        "recipe_hash": recipe_hash(rec),
        "seed": rec["seed"],
        "prompt_style": rec["prompt_style"],
        "max_seq_length": rec["max_seq_length"],
        "tokenizer": tok_info,
        "data_dir": str(data_dir) if data_dir else "hub",
        "counts": per_source,
        "selection": selection,
        "decontamination": {**{k: rec["decontamination"][k] for k in ("n", "min_matches", "answer_matches", "action")},
                            "eval_sets": rec["_eval_report"]},
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "families": family_tokens({name: sel["train_tokens"] for name, sel in selection.items()},
                                  read_affinity(DEFAULT_AFFINITY)),
        "tokens": {"train": _stats([token_counts[i] for i in train]), "val": _stats([token_counts[i] for i in val]),
                   "by_source": {name: _stats([token_counts[i] for i in train if kept[i]["source"] == name])
                                 for name in selection}},
        "files": {"train.jsonl": train_sha, "val.jsonl": val_sha, "rejects.jsonl": rejects_sha},
        "content_hash": dataset_content_hash(train_sha, val_sha),
        "versions": versions,
    }
    write_manifest(out, manifest)
    return manifest


def _plot(path: Path, rec, selection, token_counts, kept, train) -> Path:
    names = list(selection)
    fig = Figure(figsize=(12, 4.5))  # no pyplot: a file, never a window, whatever backend is set
    ax1, ax2 = fig.subplots(1, 2)
    tokens = [selection[n]["train_tokens"] for n in names]
    ax1.barh(names, tokens, color="tab:blue")
    for y, (n, t) in enumerate(zip(names, tokens)):
        ax1.text(t, y, f" {selection[n]['train_rows']} rows", va="center", fontsize=8)
    ax1.set_xlabel("train tokens")
    ax1.set_title(f"composition of {rec['name']} ({sum(tokens)} tokens)")
    ax1.invert_yaxis()
    lengths = [[token_counts[i] for i in train if kept[i]["source"] == n] for n in names]
    bins = np.linspace(0, rec["max_seq_length"], 33)
    ax2.hist([lv for lv in lengths if lv], bins=bins, stacked=True, label=[n for n, lv in zip(names, lengths) if lv])
    ax2.axvline(rec["max_seq_length"], color="k", ls="--", lw=1)
    ax2.set_xlabel(f"tokens per row ({rec['prompt_style']} template, max_seq_length {rec['max_seq_length']})")
    ax2.set_ylabel("rows")
    ax2.set_title("length distribution (train)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    return path
