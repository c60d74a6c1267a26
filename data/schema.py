"""The one row schema every source is normalised to, and how a row becomes (prompt, response).

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
    provenance  "human" | "llm-generated" | "mixed"  (the challenge forbids LLM-generated data)
    meta        free-form source details (category, task name, original index...)

``render`` is the only place where a prompt template is applied to a row: the data stage uses it
to count tokens, the fine-tuning stage to build training examples, so both agree by construction.
"""

from __future__ import annotations

import hashlib
from typing import Any

from litgpt.prompts import PromptStyle

REQUIRED_FIELDS = ("id", "source", "instruction", "input", "output", "license", "provenance")
PROVENANCES = ("human", "llm-generated", "mixed")


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


def get_prompt_style(style: str | PromptStyle) -> PromptStyle:
    """A litgpt prompt style by name ("alpaca", "smollm2", "default" = raw...)."""
    if isinstance(style, PromptStyle):
        return style
    from litgpt.prompts import prompt_styles

    if style not in prompt_styles:
        from onegpu.errors import UserError

        raise UserError(f"unknown prompt style {style!r}",
                        fix=f"use one of litgpt's prompt styles: {', '.join(sorted(prompt_styles))}")
    return PromptStyle.from_name(style)


def render(row: dict[str, Any], style: str | PromptStyle) -> tuple[str, str]:
    """(prompt, response) for one row under a litgpt prompt style.

    Multi-turn rows: earlier turns are rendered with the same style, each followed by its reply, so
    the loss still falls on the last reply only (the earlier replies are context).
    """
    style = get_prompt_style(style)
    prefix = ""
    for turn_user, turn_reply in _earlier_turns(row.get("messages")):
        prefix += style.apply(turn_user) + turn_reply + "\n"
    if row.get("input"):
        prompt = style.apply(row["instruction"], input=row["input"])
        if prompt == style.apply(row["instruction"]):  # styles without an input slot: append it
            prompt = style.apply(f"{row['instruction']}\n\n{row['input']}")
    else:
        prompt = style.apply(row["instruction"])
    return prefix + prompt, row["output"]


def _earlier_turns(messages: list[dict[str, str]] | None) -> list[tuple[str, str]]:
    if not messages:
        return []
    pairs, pending_user = [], None
    for msg in messages[:-2] if len(messages) >= 2 else []:
        if msg["role"] == "user":
            pending_user = msg["content"]
        elif msg["role"] == "assistant" and pending_user is not None:
            pairs.append((pending_user, msg["content"]))
            pending_user = None
    return pairs
