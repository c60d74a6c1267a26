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
    provenance  "human" | "llm-generated" | "programmatic" (made by code, e.g. templates; no language model)
                | "mixed"  (the challenge forbids LLM-generated data)
    meta        free-form source details (category, task name, original index...)

``render`` is the only place where a prompt template is applied to a row, and ``encode_example`` the
only place where a rendered row becomes token ids: the fine-tuning stage trains on those ids and
the data stage counts them (``encode_examples``, the same ids for many rows at once), so the token
counts in a manifest are the lengths training sees, BOS included.
"""

from __future__ import annotations

import hashlib
from typing import Any

from litgpt.prompts import PromptStyle

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


def encode_example(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one training example: the one token rule of onegpu.

    litgpt's SFT recipe, through a litgpt ``Tokenizer``: the prompt with BOS when the tokenizer uses
    one (``tokenizer.use_bos``), the response without BOS and with EOS.
    """
    return tokenizer.encode(prompt).tolist(), tokenizer.encode(response, bos=False, eos=True).tolist()


def encode_examples(tokenizer: Any, examples: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """``encode_example`` for many (prompt, response) pairs, in two batch calls into the Rust tokenizer.

    The same ids (tests check it): the batch gives what ``tokenizer.encode`` gets from its processor,
    then BOS/EOS are settled exactly as ``tokenizer.encode`` settles them. Whether tokenizers' thread
    pool runs is the caller's choice (``TOKENIZERS_PARALLELISM``). SentencePiece tokenizers have no
    batch call and go row by row.
    """
    if tokenizer.backend != "huggingface":
        return [encode_example(tokenizer, prompt, response) for prompt, response in examples]
    prompts = tokenizer.processor.encode_batch_fast([prompt for prompt, _ in examples])
    responses = tokenizer.processor.encode_batch_fast([response for _, response in examples])
    return [(_bos_eos(tokenizer, p.ids, bos=None, eos=False), _bos_eos(tokenizer, r.ids, bos=False, eos=True))
            for p, r in zip(prompts, responses)]


def _bos_eos(tokenizer: Any, ids: list[int], bos: bool | None, eos: bool) -> list[int]:
    """What litgpt's ``Tokenizer.encode(text, bos=bos, eos=eos)`` does to its processor's ids."""
    if bos or (bos is None and tokenizer.use_bos):
        if tokenizer.bos_id is None:
            raise NotImplementedError("This tokenizer does not have a defined bos token.")
        if not ids or ids[0] != tokenizer.bos_id:
            ids = [tokenizer.bos_id, *ids]
    elif ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    # litgpt's rule, kept as is: asked for EOS, a text that already ends in EOS loses it
    if eos and (not ids or ids[-1] != tokenizer.eos_id):
        ids = [*ids, tokenizer.eos_id]
    elif ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return ids
