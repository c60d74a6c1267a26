"""Optional output rules for ``onegpu serve --postprocess RULE,RULE`` (all off by default).

Each rule narrows the completion to a substring of itself — it never rewrites characters — so the
returned ``tokens`` stay consistent with the returned ``text``: tokens wholly outside the kept span
are dropped, a token cut by the span keeps its logprob but has its text trimmed, and ``logprob``
is the sum over the returned tokens. ``"".join(t["text"] for t in tokens) == text`` always holds.
Rules never touch ``echo_prompt`` responses (HELM uses those to score prompts, token by token).

Rules run in the fixed order below, whatever order they are named in, and which HELM metric each
one can move:

    drop_answer_prefix  leading "The answer is" / "Answer:" removed         exact_match, quasi_exact_match
                        (MMLU, TruthfulQA, BBQ); GSM8K is unaffected: its "The answer is N" is at the end
    mc_letter           for a multiple-choice prompt (option lines "A." "B." ...), keep only the answer
                        letter the completion starts with                    exact_match (MMLU, TruthfulQA)
    cut_blank_line      cut at the first blank line after the answer        exact_match, quasi_exact_match,
                        f1_score, ROUGE-2 (scenarios HELM sends without a "\\n" stop sequence, e.g. CNN/DM)
    strip               drop leading/trailing whitespace                    none of HELM's (they strip already);
                        for clients that compare raw text
"""

from __future__ import annotations

import re

from onegpu.errors import UserError

RULES = ("drop_answer_prefix", "mc_letter", "cut_blank_line", "strip")

_ANSWER_PREFIX = re.compile(r"\s*(?:the\s+(?:correct\s+)?answer\s+is|answer)\s*[:\-]?\s*", re.IGNORECASE)
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.)]\s", re.MULTILINE)
_LETTER = re.compile(r"\s*\(?([A-J])\)?(?![A-Za-z])")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def parse_rules(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"strip,cut_blank_line"`` (or a list) -> the rules in application order; unknown names are a UserError."""
    if spec is None:
        return []
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n and n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise UserError(f"unknown postprocess rule(s): {', '.join(unknown)}",
                        fix=f"use a comma-separated subset of: {', '.join(RULES)} (or none)")
    return [r for r in RULES if r in names]


def kept_span(text: str, rules: list[str], prompt: str = "") -> tuple[int, int]:
    """The ``[start, end)`` character span of ``text`` the rules keep."""
    start, end = 0, len(text)
    for rule in rules:
        part = text[start:end]
        if rule == "drop_answer_prefix":
            match = _ANSWER_PREFIX.match(part)
            if match:
                start += match.end()
        elif rule == "mc_letter":
            letters = set(_OPTION_LINE.findall(prompt))
            match = _LETTER.match(part)
            if len(letters) >= 2 and match and match.group(1) in letters:
                start, end = start + match.start(1), start + match.end(1)
        elif rule == "cut_blank_line":
            content = len(part) - len(part.lstrip())  # a blank line before the answer is not its end
            match = _BLANK_LINE.search(part, content)
            if match:
                end = start + match.start()
        elif rule == "strip":
            stripped = part.lstrip()
            start += len(part) - len(stripped)
            end = start + len(stripped.rstrip())
    return start, max(start, end)


def apply(result: dict, rules: list[str], prompt: str = "") -> dict:
    """``result`` (text, tokens, logprob, ...) narrowed by ``rules``; tokens/logprob follow the text."""
    if not rules:
        return result
    text = "".join(t["text"] for t in result["tokens"])
    start, end = kept_span(text, rules, prompt)
    kept, pos = [], 0
    for tok in result["tokens"]:
        tok_start, tok_end = pos, pos + len(tok["text"])
        pos = tok_end
        if tok_end <= start or tok_start >= end:
            if not (tok_start == tok_end and start <= tok_start < end):  # keep empty-text tokens inside
                continue
        piece = tok["text"][max(0, start - tok_start): max(0, min(end, tok_end) - tok_start)]
        kept.append(tok if piece == tok["text"] else dict(tok, text=piece))
    return dict(result, text="".join(t["text"] for t in kept), tokens=kept,
                logprob=float(sum(t["logprob"] for t in kept)))
