"""Recipe YAML: what goes into a training mix. Parsed and validated before any data is loaded.

    name: quickstart              # artifact name (default: the file's stem)
    seed: 1234
    tokenizer: bundled            # bundled | <litgpt checkpoint dir> | <hub model id>
    prompt_style: smollm2         # a litgpt prompt style; tokens are counted on the rendered text
    max_seq_length: 512           # longer rows are dropped (reason too_long)
    min_tokens: 16                # shorter rows are dropped (reason too_short)
    budget_tokens: 20000          # total train tokens; `weight` sources share what is left
    val_rows_per_source: 4        # held out per source before sampling train rows
    allow_llm_generated: false    # the challenge forbids LLM-generated data
    languages: null               # e.g. [en]: keep only rows in these languages
    dedup: {exact: true, near: true, threshold: 0.8, num_perm: 64}
    decontamination: {eval_sets: [mmlu, ...], n: 8, min_matches: 3, answer_matches: 8, action: drop}
    sources:
      - {name: dolly, weight: 1}                 # share of the budget
      - {name: gsm8k, tokens: 4000}              # a token cap
      - {name: oasst1, count: 20, languages: [en]}   # a row count
      - {name: math, weight: 2, location: hub}   # where from: local (the data dir, default), hub, or a path
      - {name: my_qa, path: qa.jsonl, fields: {instruction: question, output: answer},
         license: CC-BY-4.0, provenance: human, replace: true}

Every problem of a recipe is reported at once (``onegpu.errors.all_problems``); ``data/inspection.py`` then
checks what needs the data (availability, rows, tokens, weights) in one pass too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from onegpu.contracts import read_yaml
from onegpu.data.decontam import DEFAULT_ANSWER_MATCHES, DEFAULT_N, EVAL_SETS
from onegpu.data.rows import PROVENANCES
from onegpu.data.schema import get_prompt_style
from onegpu.data.sources import CHALLENGE_RULE, FILE_FORMATS, SOURCES, get_source, selected_parts
from onegpu.errors import UserError, all_problems

DEFAULTS: dict[str, Any] = {
    "name": None,
    "seed": 1234,
    "tokenizer": "bundled",
    "prompt_style": "alpaca",
    "max_seq_length": 2048,
    "min_tokens": 8,
    "budget_tokens": None,
    "val_rows_per_source": 16,
    "allow_llm_generated": False,
    "languages": None,
    "dedup": {"exact": True, "near": True, "threshold": 0.8, "num_perm": 64},
    "decontamination": {"eval_sets": list(EVAL_SETS), "n": DEFAULT_N, "min_matches": 3,
                        "answer_matches": DEFAULT_ANSWER_MATCHES, "action": "drop"},
    "sources": [],
}
SOURCE_KEYS = {"name", "weight", "count", "tokens", "replace", "val_rows", "location"}
FILE_KEYS = {"path", "format", "fields", "license", "provenance", "description"}
FIELD_TARGETS = {"instruction", "output", "input", "messages"}


def _merge(defaults: dict, given: dict, where: str) -> dict:
    unknown = set(given) - set(defaults)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}", fix=f"use only: {', '.join(defaults)}")
    return {k: ({**defaults[k], **(given[k] or {})} if isinstance(defaults[k], dict) and k in given
                else given.get(k, defaults[k])) for k in defaults}


def load_recipe(path: str | Path, seed: int | None = None, problems: list[UserError] | None = None) -> dict[str, Any]:
    """The validated recipe with defaults filled in, plus ``_dir`` (for relative file paths).

    Every problem found is raised together. With a ``problems`` list, a problem of one source is
    appended to it instead and that source left out, so the caller can go on checking the others
    (``data check`` / ``data build`` report everything in one pass); recipe-wide problems still raise.
    """
    path = Path(path)
    raw = read_yaml(path, "recipe")
    recipe = _merge(DEFAULTS, raw, f"recipe {path.name}")
    recipe["name"] = recipe["name"] or path.stem
    if seed is not None:
        recipe["seed"] = seed
    recipe["dedup"] = _merge(DEFAULTS["dedup"], recipe["dedup"], "dedup")
    recipe["decontamination"] = _merge(DEFAULTS["decontamination"], recipe["decontamination"], "decontamination")
    recipe_wide, per_source = validate(recipe, path.parent)
    if recipe_wide or (per_source and problems is None):
        raise all_problems(recipe_wide + list(per_source.values()))
    if per_source:
        problems += per_source.values()
        recipe["sources"] = [s for i, s in enumerate(recipe["sources"]) if i not in per_source]
    recipe["_dir"] = str(path.parent.resolve())
    return recipe


def _positive(value: Any, what: str, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        raise UserError(f"{what} is {value!r}", fix=f"use a {'whole number' if integer else 'number'} > 0")


def validate(recipe: dict[str, Any], base: Path) -> tuple[list[UserError], dict[int, UserError]]:
    """Every problem of the recipe: (recipe-wide problems, {source index: its problem})."""
    problems: list[UserError] = []
    per_source: dict[int, UserError] = {}

    def check(fn, *args) -> None:
        try:
            fn(*args)
        except UserError as err:
            problems.append(err)

    check(get_prompt_style, recipe["prompt_style"])
    check(_positive, recipe["max_seq_length"], "max_seq_length", True)
    if recipe["budget_tokens"] is not None:
        check(_positive, recipe["budget_tokens"], "budget_tokens", True)
    if not isinstance(recipe["val_rows_per_source"], int) or recipe["val_rows_per_source"] < 0:
        problems.append(UserError(f"val_rows_per_source is {recipe['val_rows_per_source']!r}", fix="use a whole number >= 0"))
    check(_validate_decontamination, recipe["decontamination"])
    if not recipe["sources"]:
        problems.append(UserError("the recipe has no sources", fix="add a `sources:` list, e.g. `- {name: dolly, weight: 1}`"))
    names = []
    for i, spec in enumerate(recipe["sources"]):
        if not isinstance(spec, dict):
            per_source[i] = UserError(f"sources[{i}] is {spec!r}", fix="write each source as a mapping, e.g. `- {name: dolly}`")
            continue
        name = spec.get("name") or (Path(spec["path"]).stem if spec.get("path") else None)
        if not name:
            per_source[i] = UserError(f"sources[{i}] has neither `name` nor `path`",
                                      fix="name a registered source or give a file `path`")
            continue
        spec["name"] = name
        names.append(name)
        try:
            _validate_source(spec, recipe, base)
        except UserError as err:
            per_source[i] = err
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(UserError(f"source(s) {dupes} listed twice", fix="list each source once (use `name:` to tell files apart)"))
    return problems, per_source


def _validate_decontamination(dc: dict[str, Any]) -> None:
    unknown = [e for e in dc["eval_sets"] if e not in EVAL_SETS]
    if unknown:
        raise UserError(f"unknown eval set(s) {unknown} in decontamination.eval_sets", fix=f"use: {', '.join(EVAL_SETS)}")
    if dc["action"] not in ("drop", "report"):
        raise UserError(f"decontamination.action is {dc['action']!r}", fix="use drop (default) or report")
    _positive(dc["n"], "decontamination.n", integer=True)
    _positive(dc["min_matches"], "decontamination.min_matches", integer=True)
    if dc["answer_matches"] is not None:  # null: a match counts wherever it falls in the eval item
        _positive(dc["answer_matches"], "decontamination.answer_matches", integer=True)


def _validate_source(spec: dict[str, Any], recipe: dict[str, Any], base: Path) -> None:
    name = spec["name"]
    where = f"source {name!r}"
    if "path" in spec:
        _validate_file_source(spec, where, base)
        if spec["provenance"] == "llm-generated" and not recipe["allow_llm_generated"]:
            raise UserError(f"{where} is marked LLM-generated; {CHALLENGE_RULE}",
                            fix="remove it, or set `allow_llm_generated: true` for runs outside the challenge")
    else:
        src = get_source(name)
        allowed = SOURCE_KEYS | set(src.options) | ({"subsets"} if src.parts else set())
        if set(spec) - allowed:
            raise UserError(f"{where}: unknown key(s) {sorted(set(spec) - allowed)}", fix=f"use only: {', '.join(sorted(allowed))}")
        if src.provenance == "llm-generated" and not recipe["allow_llm_generated"]:
            raise UserError(f"{where} is LLM-generated ({src.description}); {CHALLENGE_RULE}",
                            fix="remove it from the recipe, or set `allow_llm_generated: true` for runs outside the challenge")
        location = spec.get("location", "local")
        if not isinstance(location, str) or not location:
            raise UserError(f"{where}: location is {location!r}",
                            fix="use `local` (the data dir), `hub`, or the path of a folder or file")
        if src.parts:
            selected_parts(src, spec.get("subsets"))
    sizing = [k for k in ("weight", "count", "tokens") if k in spec]
    if len(sizing) > 1:
        raise UserError(f"{where} sets {' and '.join(sizing)}", fix="give one of weight, count or tokens")
    for key in sizing:
        _positive(spec[key], f"{where}: {key}", integer=key != "weight")
    if "weight" in spec and recipe["budget_tokens"] is None:
        raise UserError(f"{where} has a weight but the recipe has no budget_tokens",
                        fix="set budget_tokens (weights share it), or use count/tokens per source")


def _validate_file_source(spec: dict, where: str, base: Path) -> None:
    allowed = SOURCE_KEYS | FILE_KEYS
    if set(spec) - allowed:
        raise UserError(f"{where}: unknown key(s) {sorted(set(spec) - allowed)}", fix=f"use only: {', '.join(sorted(allowed))}")
    if spec["name"] in SOURCES:
        raise UserError(f"{where}: a local file cannot take the registered name {spec['name']!r}",
                        fix="give the file source another `name:`")
    path = resolve_file(spec["path"], base)
    if path is None:
        raise UserError(f"{where}: file {spec['path']} not found (looked beside the recipe in {base} and in the current dir)",
                        fix="fix `path:` (relative paths are resolved against the recipe's folder)")
    fmt = spec.get("format") or path.suffix.lstrip(".").lower()
    if fmt not in FILE_FORMATS:
        raise UserError(f"{where}: unknown format {fmt!r}", fix=f"set `format:` to one of {', '.join(FILE_FORMATS)}")
    fields = spec.get("fields")
    if not isinstance(fields, dict) or "output" not in fields or not ({"instruction", "messages"} & set(fields)):
        raise UserError(f"{where}: `fields` must map instruction and output (or messages) to the file's columns, got {fields!r}",
                        fix="e.g. `fields: {instruction: question, input: context, output: answer}`")
    if set(fields) - FIELD_TARGETS:
        raise UserError(f"{where}: unknown field target(s) {sorted(set(fields) - FIELD_TARGETS)}",
                        fix=f"map only {', '.join(sorted(FIELD_TARGETS))}")
    if spec.get("provenance") not in PROVENANCES:
        raise UserError(f"{where}: provenance is {spec.get('provenance')!r}",
                        fix=f"state where the text comes from: provenance: {' | '.join(PROVENANCES)}")
    if not spec.get("license"):
        raise UserError(f"{where}: no license", fix="add `license:` (as stated by the data's owner)")


def resolve_file(path: str, base: Path) -> Path | None:
    for candidate in (base / path, Path(path)):
        if candidate.expanduser().is_file():
            return candidate.expanduser().resolve()
    return None


def recipe_hash(recipe: dict[str, Any]) -> str:
    """sha256 of the recipe's canonical JSON (defaults filled in, file paths as written)."""
    canonical = {k: v for k, v in recipe.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
