"""How a row of the mix (``data/rows.py``) becomes (prompt, response), and then token ids.

``render`` is the only place where a prompt template is applied to a row, and ``encode_example`` the
only place where a rendered row becomes token ids: the fine-tuning stage trains on those ids and
the data stage counts them (``encode_examples``, the same ids for many rows at once), so the token
counts in a manifest are the lengths training sees, BOS included. The row schema itself is
``data/rows.py``; its names are importable from here too.
"""

from __future__ import annotations

from typing import Any

from litgpt.prompts import PromptStyle, prompt_styles

from onegpu.data.rows import PROVENANCES, REQUIRED_FIELDS, make_id, make_row  # noqa: F401 - the row schema, here too
from onegpu.errors import UserError


def get_prompt_style(style: str | PromptStyle) -> PromptStyle:
    """A litgpt prompt style by name ("alpaca", "smollm2", "default" = raw...)."""
    if isinstance(style, PromptStyle):
        return style
    if style not in prompt_styles:
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
