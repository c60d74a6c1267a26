"""What ``onegpu data check`` and ``onegpu data build`` find before any heavy work: every problem of a recipe
in one pass, in seconds.

For each source: where it is read from (its ``location:``: the data dir, the hub, or a path), whether it
is there, its rows and an estimate of its usable train tokens (its rows tokenized as training sees them,
a seeded sample of up to ``SAMPLE_ROWS`` for large sources; rows shorter than ``min_tokens`` or longer
than ``max_seq_length`` do not count). Then, for the mix: every weight, count and token cap the data
cannot meet and a budget larger than the data, each with the fix (the largest weight or budget that
fits). Estimates come before deduplication and decontamination, which only remove rows: a check that
passes can still fail at build time by the rows those filters drop, never the other way round.

Hub sources are probed, not downloaded: their dataset info (rows per split, where the hub states
them); ``data build`` loads them and checks again with their real rows. ``data build`` runs the same
loading and checks first, so it too reports every problem at once before the heavy filters.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import load_dataset_builder
from tqdm import tqdm

from onegpu.data.families import DEFAULT_AFFINITY, coverage_table, family_tokens, read_affinity
from onegpu.data.loading import load_file_records, load_records
from onegpu.data.recipe import load_recipe, resolve_file
from onegpu.data.rows import make_row, reject
from onegpu.data.sources import Reject, Source, get_source, local_files, selected_parts
from onegpu.data.tokens import count_tokens, load_tokenizer
from onegpu.errors import UserError, all_problems
from onegpu.paths import shared_datasets_dir
from onegpu.tables import text_table

SAMPLE_ROWS = 2000  # rows tokenized per source for the estimate; smaller sources are counted whole
HUB_HOST = ("huggingface.co", 443)


@dataclass
class SourceCheck:
    """What the check found for one source of a recipe."""

    name: str
    location: str  # "local: PATH", "file: PATH", "hub: ID"
    available: bool = False
    rows: int | None = None  # rows the converter made (before dedup/decontamination)
    usable_rows: int | None = None  # of them within [min_tokens, max_seq_length] (estimated from a sample)
    usable_tokens: int | None = None
    mean_tokens: float | None = None  # per usable row
    asks: str = ""  # what the recipe asks of it: "weight 3 = 12,000 tokens", "count 20", ...
    planned_tokens: int | None = None  # the train tokens the recipe sets it to give
    note: str = ""
    terms: str = ""
    problem: str = ""

    def row(self) -> list[str]:
        def fmt(v: Any) -> str:
            return "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)
        return [self.name, self.location, "yes" if self.available else "NO", fmt(self.rows), fmt(self.usable_rows),
                fmt(self.usable_tokens), self.asks or "-", self.problem or self.note or "ok"]


@dataclass
class Loaded:
    """One source's rows as ``data build`` uses them, with its drops so far."""

    rows: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


# ------------------------------------------------------------------------------------ data check
def check_recipe(recipe: Path, data_dir: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """``onegpu data check`` (``data/check.py``): the report ({sources, problems, families, seconds}), printed
    and written to ``out``; a UserError listing every problem when there are any."""
    started = time.time()
    problems: list[UserError] = []
    rec = load_recipe(recipe, problems=problems)
    data_dir = resolve_data_dir(data_dir)
    tokenizer, _ = load_tokenizer_or_problem(rec, problems)
    checks, _ = inspect_sources(rec, data_dir, tokenizer, problems, load_hub=False)
    problems += mix_problems(rec, checks)
    report = {"recipe": str(recipe), "data_dir": str(data_dir) if data_dir else "hub",
              "sources": [asdict(c) for c in checks.values()], "problems": [p.problem for p in problems],
              "families": family_report(checks), "seconds": round(time.time() - started, 2)}
    print(summary(rec, checks, report["families"]))
    if out is not None:
        Path(out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if problems:
        raise all_problems(problems)
    print(f"[onegpu data] {recipe}: no problem found in {report['seconds']} s (estimates before dedup and "
          f"decontamination; `onegpu data build` checks again with them)")
    return report


def resolve_data_dir(data_dir: Path | None) -> Path | None:
    """``--data_dir`` checked, or the default: $ONEGPU_DATA_DIR, else ../shared/datasets beside the checkout,
    else None (the hub)."""
    if data_dir is None:
        return shared_datasets_dir()
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} is not a directory",
                        fix="point it at a folder laid out like ../shared/datasets, or leave it out to use the hub")
    return data_dir


def load_tokenizer_or_problem(rec: dict, problems: list[UserError]):
    """(tokenizer, info), or (None, None) with the problem noted: the sources are still checked, without
    token estimates."""
    try:
        return load_tokenizer(rec["tokenizer"])
    except UserError as err:
        problems.append(err)
        return None, None


# ------------------------------------------------------------------------------------ sources
def locate(spec: dict, data_dir: Path | None, base: Path) -> Path | None:
    """Where a registered source is read from: a path (for ``local_files``), or None for the hub.

    No ``location``: the data dir, else the hub; ``local``: the data dir; ``hub``; or a path (relative
    to the recipe's folder): a data dir, a folder of the source's files, or one file."""
    location = spec.get("location")
    name = spec["name"]
    if location == "hub":
        return None
    if location in (None, "local"):
        if data_dir is None and location == "local":
            raise UserError(f"source {name!r}: location local, but there is no data dir",
                            fix="pass --data_dir / set ONEGPU_DATA_DIR, or set `location: hub`")
        return data_dir
    path = Path(location).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise UserError(f"source {name!r}: location {location} does not exist (looked at {path})",
                        fix="fix the path (relative paths are resolved against the recipe's folder), or use "
                            "`location: hub`")
    return path


def inspect_sources(rec: dict, data_dir: Path | None, tokenizer, problems: list[UserError],
                    load_hub: bool) -> tuple[dict[str, SourceCheck], dict[str, Loaded]]:
    """Locate and load every source (hub sources only probed unless ``load_hub``) and estimate its usable
    tokens; each problem goes to ``problems``, and the other sources are still checked."""
    base = Path(rec["_dir"])
    checks: dict[str, SourceCheck] = {}
    loaded: dict[str, Loaded] = {}
    hub_reachable: bool | None = None
    for spec in tqdm(rec["sources"], desc="load", unit="source", disable=not rec["sources"]):
        name = spec["name"]
        try:
            if "path" in spec:
                path = resolve_file(spec["path"], base)
                checks[name] = SourceCheck(name, f"file: {path}")
                loaded[name] = _load(spec, rec, path)
            else:
                src = get_source(name)
                where = locate(spec, data_dir, base)
                checks[name] = SourceCheck(name, f"local: {where}" if where else f"hub: {src.hub_name}",
                                           terms=src.terms)
                if where is not None:
                    files = local_files(src, where, spec.get("subsets")) if src.local else []
                    if not files:
                        raise _missing_local(src, where)
                    loaded[name] = _load(spec, rec, where)
                elif load_hub:
                    loaded[name] = _load(spec, rec, None)
                else:
                    if hub_reachable is None:
                        hub_reachable = _hub_reachable()
                    checks[name].rows = _probe_hub(src, spec, hub_reachable)
                    checks[name].available = True
                    checks[name].note = "hub: rows from its dataset info; loaded by `data build`"
                    continue
            checks[name].available = True
            _estimate(checks[name], loaded[name].rows, rec, spec, tokenizer)
        except UserError as err:
            checks.setdefault(name, SourceCheck(name, "?")).problem = err.problem
            problems.append(err)
    return checks, loaded


def _missing_local(src: Source, where: Path) -> UserError:
    looked = ", ".join(src.local["files"]) if src.local else "(no local layout: hub only)"
    return UserError(f"source {src.name!r}: no local copy in {where} (looked for {looked})",
                     fix=f"add the files there, point `location:` at a copy, or set `location: hub` to load "
                         f"{src.hub_name}")


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False  # offline mode: only what the datasets cache holds
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
        return True
    except OSError:
        return False


def _probe_hub(src: Source, spec: dict, reachable: bool) -> int | None:
    """The rows the hub states for the source's split(s) (None when it states none); a UserError when the
    dataset can be neither reached nor found in the local datasets cache."""
    rows: int | None = 0
    for part in selected_parts(src, spec.get("subsets")):
        kwargs = {k: v.format(part=part) if isinstance(v, str) else v for k, v in src.hub.items()}
        split = kwargs.pop("split", "train")
        try:
            info = load_dataset_builder(**kwargs).info
        except Exception as err:  # offline and not cached, gated, renamed...
            why = "the hub is not reachable from here" if not reachable else f"{type(err).__name__}: {err}"
            raise UserError(f"source {src.name!r} (hub: {src.hub_name}): not available: {why}, and it is not in "
                            f"the local datasets cache",
                            fix="connect to the hub (`huggingface-cli login` for gated sets), or point "
                                "`location:` at a local copy") from err
        stated = info.splits.get(split) if info.splits else None
        rows = rows + stated.num_examples if rows is not None and stated and stated.num_examples else None
    return rows


def _load(spec: dict, rec: dict, where: Path | None) -> Loaded:
    """A source's rows through its converter; malformed records and flagged messages become rejects."""
    name = spec["name"]
    out = Loaded()
    try:
        _convert_all(spec, rec, where, out)
    except UserError:
        raise
    except Exception as err:  # records are read lazily: offline, gated (LIMA), renamed on the hub...
        origin = f"the local copy in {where}" if where else f"the hub ({get_source(name).hub_name})"
        raise UserError(f"source {name!r} could not be loaded from {origin}: {type(err).__name__}: {err}",
                        fix="check the network / `huggingface-cli login` for gated sets, or point `location:` "
                            "at a local copy") from err
    if not out.rows:
        raise UserError(f"source {name!r} has no usable rows ({dict(out.counts)})",
                        fix="check its files and options (tasks/categories/subsets/languages), or drop it")
    return out


def _convert_all(spec: dict, rec: dict, where: Path | None, out: Loaded) -> None:
    """Every record of a source through its converter into ``out`` (a malformed record is a reject)."""
    name = spec["name"]
    if "path" in spec:
        records, convert = file_source(spec, where)
    else:
        src = get_source(name)
        records = load_records(src, where, subsets=spec.get("subsets"))
        opts = {k: spec[k] for k in src.options if k in spec}
        opts["_state"] = {}  # per-source converter state (e.g. instances seen per NI task)
        if "languages" in src.options and "languages" not in opts and rec["languages"]:
            opts["languages"] = rec["languages"]
        if spec.get("categories") and where is None:
            raise UserError(f"source {name!r}: `categories:` needs the NI task files (their Categories); the hub copy "
                            f"has none", fix="point `location:` at the task files, or pick tasks with `tasks:`")
        convert = lambda r, _src=src, _opts=opts: _src.convert(r, _src, **_opts)  # noqa: E731
    c = out.counts
    for i, raw in enumerate(tqdm(records, desc=f"load {name}", unit="rec", leave=False, mininterval=1.0)):
        try:
            produced = list(convert(raw))
        except Exception as err:  # a malformed record never stops the build
            c["loaded"] += 1
            c["malformed"] += 1
            out.rejects.append(reject("malformed", "malformed", name, None, f"record {i}: {type(err).__name__}: {err}",
                                      _jsonable(raw)))
            continue
        for item in produced:
            if isinstance(item, Reject):
                stage = {"language": "language", "llm-generated": "llm_generated"}.get(item.reason, "malformed")
                c[stage] += 1
                # "loaded" counts candidate rows; synthetic OASST messages are messages, not rows
                c["loaded"] += stage != "llm_generated"
                out.rejects.append(reject(stage, item.reason, name, None, item.detail, _jsonable(item.record)))
                continue
            c["loaded"] += 1
            if not item["instruction"].strip() or not item["output"].strip():
                c["malformed"] += 1
                out.rejects.append(reject("malformed", "empty", name, item["id"], "empty instruction or output", item))
                continue
            out.rows.append(item)


def file_source(spec: dict, path: Path):
    """(records, converter) of a local file source with a field mapping."""
    ds, columns = load_file_records(path, spec.get("format"))
    fields = spec["fields"]
    missing = [f"{target}: {col}" for target, col in fields.items() if col not in columns]
    if missing:
        raise UserError(f"source {spec['name']!r}: field mapping names column(s) missing from {path.name}: {missing}",
                        fix=f"map to the file's fields: {', '.join(columns)}")
    name, lic, prov = spec["name"], spec["license"], spec["provenance"]

    def convert(r):
        if "_malformed" in r:
            raise ValueError(r["_malformed"])

        def text(key):
            v = r.get(fields[key]) if key in fields else ""
            if v is None:
                return ""
            if not isinstance(v, (str, int, float)):
                raise ValueError(f"field {fields[key]!r} is {type(v).__name__}, not text")
            return str(v).strip()
        msgs = r.get(fields["messages"]) if "messages" in fields else None
        if msgs:
            msgs = [{"role": m["role"], "content": str(m["content"])} for m in msgs]
            yield make_row(name, msgs[-2]["content"], msgs[-1]["content"], license=lic, provenance=prov, messages=msgs)
        else:
            yield make_row(name, text("instruction"), text("output"), input=text("input"), license=lic, provenance=prov)
    return ds, convert


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)[:2000]


def _estimate(check: SourceCheck, rows: list[dict], rec: dict, spec: dict, tokenizer) -> None:
    """Usable rows and tokens of a source: all its rows tokenized, or a seeded sample scaled up."""
    check.rows = len(rows)
    if tokenizer is None:
        check.note = "tokens not estimated: no tokenizer"
        return
    rng = np.random.default_rng([rec["seed"], len(rows)])
    sample = rows if len(rows) <= SAMPLE_ROWS else [rows[i] for i in sorted(rng.choice(len(rows), SAMPLE_ROWS, replace=False))]
    tokens = np.array(count_tokens(sample, rec["prompt_style"], tokenizer, parallel=False))
    usable = tokens[(tokens >= rec["min_tokens"]) & (tokens <= rec["max_seq_length"])]
    scale = len(rows) / len(sample)
    check.usable_rows = int(round(len(usable) * scale))
    check.usable_tokens = int(round(usable.sum() * scale))
    check.mean_tokens = round(float(usable.mean()), 1) if len(usable) else 0.0
    if len(sample) < len(rows):
        check.note = f"estimated from {len(sample)} of {len(rows)} rows"
    if check.usable_rows == 0:
        raise UserError(f"source {check.name!r}: none of its {len(rows)} rows fits min_tokens {rec['min_tokens']}.."
                        f"max_seq_length {rec['max_seq_length']} (median {int(np.median(tokens))} tokens)",
                        fix="raise max_seq_length, or drop the source")


# ------------------------------------------------------------------------------------ the mix
def mix_problems(rec: dict, checks: dict[str, SourceCheck]) -> list[UserError]:
    """Every count, token cap, weight and budget the sources' usable rows cannot meet, with the fix.

    Val rows come off first (``val_rows`` / ``val_rows_per_source``); ``replace: true`` sources can
    repeat rows, so only their having a row matters."""
    problems: list[UserError] = []
    known = {s["name"]: s for s in rec["sources"] if checks.get(s["name"]) and checks[s["name"]].usable_tokens is not None}
    available: dict[str, tuple[int, int]] = {}  # name -> (train rows, train tokens) left after val
    for name, spec in known.items():
        c = checks[name]
        n_val = min(spec.get("val_rows", rec["val_rows_per_source"]), c.usable_rows)
        rows_left = c.usable_rows - n_val
        available[name] = (rows_left, int(c.usable_tokens - n_val * (c.mean_tokens or 0)))
        if rows_left <= 0:
            problems.append(UserError(f"source {name!r} has about {c.usable_rows} usable rows, none left for training "
                                      f"after {n_val} val rows", fix="lower val_rows for it (`val_rows: 0`), or drop it"))
    budget = rec["budget_tokens"]
    fixed = 0.0
    for name, spec in known.items():
        rows_left, tokens_left = available[name]
        if "count" in spec:
            checks[name].asks = f"count {spec['count']}"
            checks[name].planned_tokens = int(spec["count"] * (checks[name].mean_tokens or 0))
            fixed += checks[name].planned_tokens
            if spec["count"] > rows_left and not spec.get("replace") and rows_left > 0:
                problems.append(UserError(f"source {name!r} cannot meet its count: it needs {spec['count']} rows, has "
                                          f"about {rows_left} usable after val",
                                          fix=f"lower its count to {rows_left} or less, or set `replace: true`"))
        elif "tokens" in spec:
            checks[name].asks = f"tokens {spec['tokens']:,}"
            checks[name].planned_tokens = spec["tokens"]
            fixed += spec["tokens"]
            if spec["tokens"] > tokens_left and not spec.get("replace") and rows_left > 0:
                problems.append(UserError(f"source {name!r} cannot meet its token cap: it needs {spec['tokens']:,} "
                                          f"tokens, has about {tokens_left:,} usable after val",
                                          fix=f"lower its tokens to {tokens_left:,} or less, or set `replace: true`"))
    if budget is None:
        for name in known:
            if checks[name].planned_tokens is None:
                checks[name].asks, checks[name].planned_tokens = "all rows", checks[name].usable_tokens
        return problems
    weighted = [s for s in rec["sources"] if not ({"count", "tokens"} & set(s))]
    weight_sum = sum(s.get("weight", 1.0) for s in weighted)
    left = budget - fixed
    if weighted and left <= 0:
        problems.append(UserError(f"count/tokens sources already take about {int(fixed):,} of budget_tokens {budget:,}, "
                                  f"nothing is left for {[s['name'] for s in weighted]}",
                                  fix="raise budget_tokens or lower the counts/token caps"))
        return problems
    total = sum(t for _, t in available.values())
    if len(known) == len(rec["sources"]) and budget > total and not any(s.get("replace") for s in rec["sources"]):
        problems.append(UserError(f"budget_tokens {budget:,} is larger than the data: about {total:,} usable train "
                                  f"tokens in all sources", fix=f"lower budget_tokens to {total:,} or less, add sources, "
                                                                f"or set `replace: true` on a source"))
    fits = []  # per weighted source: the largest budget its share fits in
    for spec in weighted:
        name, weight = spec["name"], spec.get("weight", 1.0)
        target = left * weight / weight_sum
        if name not in known:
            continue
        checks[name].asks = f"weight {weight:g} = {int(target):,} tokens"
        checks[name].planned_tokens = int(target)
        tokens_left = available[name][1]
        if spec.get("replace") or available[name][0] <= 0:
            continue
        fits.append(fixed + tokens_left * weight_sum / weight)
        if target > tokens_left:
            others = weight_sum - weight
            max_weight = tokens_left * others / (left - tokens_left) if left > tokens_left else float("inf")
            problems.append(UserError(
                f"source {name!r} cannot meet its weight: {weight:g} of {weight_sum:g} of {int(left):,} tokens is "
                f"{int(target):,}, it has about {tokens_left:,} usable after val",
                fix=f"lower its weight to {max_weight:.3g} or less, raise the other weights, set `replace: true` on it"
                    + (f", or lower budget_tokens to {int(min(fits)):,}" if fits else "")))
    return problems


def family_report(checks: dict[str, SourceCheck]) -> dict[str, Any]:
    """Planned train tokens per eval family (``data/families.py``, from the affinity table)."""
    planned = {c.name: c.planned_tokens for c in checks.values() if c.planned_tokens is not None}
    return family_tokens(planned, read_affinity(DEFAULT_AFFINITY))


def summary(rec: dict, checks: dict[str, SourceCheck], families: dict[str, Any]) -> str:
    header = ["source", "location", "there", "rows", "usable rows", "usable tokens", "recipe asks", "verdict"]
    lines = [f"recipe {rec['name']}: budget_tokens {rec['budget_tokens'] or '-'}, max_seq_length {rec['max_seq_length']}, "
             f"min_tokens {rec['min_tokens']}, tokenizer {rec['tokenizer']}, prompt style {rec['prompt_style']}",
             text_table(header, [c.row() for c in checks.values()], cell=str)]  # locations whole: they are what to check
    flagged = [f"{c.name} ({c.terms})" for c in checks.values() if c.terms]
    if flagged:
        lines.append("licence terms to weigh: " + "; ".join(flagged))
    lines.append("planned tokens per eval family (the recipe's targets, split by data/recipes/affinity.yaml):")
    lines.append(coverage_table(families))
    return "\n".join(lines)


