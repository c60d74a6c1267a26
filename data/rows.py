"""The one row schema every source is normalised to, and the shape of a rejected row.

Rows are plain dicts in JSONL (``train.jsonl`` / ``val.jsonl``), so every stage and any user
script can read them without importing onegpu. Fields:

    id          stable id: "<source>/<sha1 of the normalised content>[:16]"
    source      registry name of the dataset the row came from (e.g. "dolly")
    instruction the task / user turn
    input       optional context ("" when none)
    output      the reference response (what the loss is computed on)
    messages    optional multi-turn history [{"role": "user"|"assistant"|"system", "content": ...}];
                when present, instruction/input/output hold the *last* user turn and reply
    license     licence of the source, as stated by it
    provenance  "human" | "llm-generated" | "programmatic" (made by code, e.g. templates; no language model)
                | "mixed"  (the challenge forbids LLM-generated data)
    meta        free-form source details (category, task name, original index...)

How a row becomes a prompt and token ids is ``data/schema.py`` (it needs litgpt; this module needs
nothing, so the source registry and ``onegpu data sources`` load without it).
"""

from __future__ import annotations

import hashlib
from typing import Any

REQUIRED_FIELDS = ("id", "source", "instruction", "input", "output", "license", "provenance")
PROVENANCES = ("human", "llm-generated", "programmatic", "mixed")


def make_id(source: str, instruction: str, input: str, output: str) -> str:
    digest = hashlib.sha1("\x1f".join((instruction, input, output)).encode("utf-8")).hexdigest()[:16]
    return f"{source}/{digest}"


def make_row(source: str, instruction: str, output: str, *, input: str = "", license: str, provenance: str,
             messages: list[dict[str, str]] | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": make_id(source, instruction, input, output),
        "source": source,
        "instruction": instruction,
        "input": input,
        "output": output,
        "license": license,
        "provenance": provenance,
    }
    if messages:
        row["messages"] = messages
    if meta:
        row["meta"] = meta
    return row


def reject(stage: str, reason: str, source: str, row_id: str | None, detail: str, row: Any) -> dict:
    """One line of ``rejects.jsonl``: the filter stage that dropped a row, why, and the row (or raw record)."""
    return {"stage": stage, "reason": reason, "source": source, "id": row_id, "detail": detail, "row": row}
