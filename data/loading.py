"""Reading data through Hugging Face ``datasets`` (Arrow, cached): a registered source's raw records from
its local files or the hub, a user's own file, and the hidden eval's files on the hub.

The registry (``data/sources.py``) says where each source lives and how a record becomes a row; this
module reads the records, so the registry and ``onegpu data sources`` load without ``datasets``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from datasets import DownloadManager, load_dataset

from onegpu.data import hidden
from onegpu.data.sources import FILE_FORMATS, Source, local_files, selected_parts
from onegpu.errors import UserError


# ------------------------------------------------------------------------------------ sources
def load_records(src: Source, where: Path | None, subsets: list[str] | None = None) -> Iterable[dict]:
    """Raw records of a registered source: its local files under ``where`` (``local_files``), or the hub when
    ``where`` is None. Records of a source with parts carry ``_part``; local records carry ``_file``."""
    if where is None:
        if src.name == "oasst1":
            return _group_oasst_trees(load_dataset(**src.hub))
        return _tagged((part, load_dataset(**{k: v.format(part=part) if isinstance(v, str) else v
                                             for k, v in src.hub.items()}))
                       for part in selected_parts(src, subsets))
    files = local_files(src, where, subsets)
    builder = src.local["builder"]
    if builder == "ni_json":
        # NI task files are single JSON objects with heterogeneous example structs, which Arrow's
        # JSON reader rejects; read each file whole, keep the fields we use.
        return _ni_task_records(files)
    if builder in LOCAL_READERS:
        return _tagged(((part, [{**r, "_file": f.name} for r in LOCAL_READERS[builder](f)]) for part, f in files))
    kwargs = {k: v for k, v in src.local.items() if k not in ("builder", "files")}
    # one dataset per file, so records know their file and part
    return _tagged((part, _with_file(f, load_dataset(builder, data_files=str(f), split="train", **kwargs)))
                   for part, f in files)


# Local formats Arrow's readers cannot take as they are: a JSON object per file (MATH), CSVs whose header
# differs per subset or is missing (ETHICS).
LOCAL_READERS = {"math_json": lambda f: [hidden.read_math_problem(f)], "ethics_csv": hidden.read_ethics_csv}


def _group_oasst_trees(ds) -> Iterator[dict]:
    """oasst1 on the hub is one row per message; the converter wants one record per tree."""
    trees: dict[str, list[dict]] = {}
    for msg in ds:
        trees.setdefault(msg["message_tree_id"], []).append(msg)
    for tree_id in sorted(trees):
        yield {"message_tree_id": tree_id, "messages": trees[tree_id]}


def _with_file(f: Path, ds) -> Iterator[dict]:
    for rec in ds:
        rec["_file"] = f.name
        yield rec


def _tagged(parts) -> Iterator[dict]:
    for part, records in parts:
        for rec in records:
            if part:
                rec["_part"] = part
            yield rec


def _ni_task_records(files: list[tuple[str, Path]]) -> Iterator[dict]:
    for _, f in files:
        doc = json.loads(f.read_text(encoding="utf-8"))
        yield {"_file": f.name, "Definition": doc.get("Definition", ""), "Categories": doc.get("Categories") or [],
               "Instances": doc.get("Instances", [])}


def load_file_records(path: Path, fmt: str | None = None) -> tuple[Any, list[str]]:
    """A user's local json/jsonl/csv/tsv/parquet file: (records, column names).

    Loaded as a ``datasets.Dataset``. A JSON Lines file that Arrow cannot parse (a broken line,
    mixed types) is read line by line instead, so the good lines still load and each broken one
    becomes a record that the converter rejects, never a crash.
    """
    fmt = fmt or path.suffix.lstrip(".").lower()
    if fmt not in FILE_FORMATS:
        raise UserError(f"cannot tell the format of {path}", fix=f"add `format:` ({', '.join(FILE_FORMATS)})")
    kwargs = {"delimiter": "\t"} if fmt == "tsv" else {}
    try:
        ds = load_dataset(FILE_FORMATS[fmt], data_files=str(path), split="train", **kwargs)
        return ds, list(ds.column_names)
    except Exception as err:
        if FILE_FORMATS[fmt] != "json":
            raise UserError(f"could not read {path}: {type(err).__name__}: {err}",
                            fix=f"check that it is a valid {fmt} file") from err
    records, columns = [], {}
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"line is a {type(rec).__name__}, not an object")
            columns.update(dict.fromkeys(rec))
        except ValueError as err:
            rec = {"_malformed": f"line {i + 1}: {err}", "_text": line[:2000]}
        records.append(rec)
    return records, list(columns)


# ------------------------------------------------------------------------------------ the hidden eval's hub files
def download(url: str) -> Path:
    """A file by URL into the ``datasets`` download cache (once)."""
    return Path(DownloadManager().download(url))


def hub_math(split: str, subjects: tuple[str, ...] = hidden.MATH_SUBJECTS) -> Iterator[dict[str, Any]]:
    """MATH problems of ``split`` from the hub, subject by subject (``hidden.math_problem`` records)."""
    for subject in subjects:
        for rec in load_dataset(hidden.MATH_HUB, subject, split=split):
            yield hidden.math_problem(rec, subject)


def hub_dialogsum(split: str) -> list[dict[str, Any]]:
    return hidden.read_dialogues(download(hidden.DIALOGSUM_URL.format(split=split)))
