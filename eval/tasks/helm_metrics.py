"""HELM's generation metrics of the hidden eval, as crfm-helm computes them.

* ``math_equiv_chain_of_thought`` (MATH with chain of thought): the last ``\\boxed{...}`` of the reference
  solution and of the completion, each normalised by the MATH authors' rules (hendrycks/math, MIT, as HELM
  ships them in ``benchmark/scenarios/math_scenario.py``), must be equal. A completion without a
  ``\\boxed{}`` scores 0: that is its format failure. lm-eval's ``hendrycks_math`` utilities carry the
  same rules with different edge cases (``\\boxed 5`` without braces, an exception in ``a/b`` parsing),
  so HELM's are kept here; ``tests/test_eval_hidden.py`` checks them against crfm-helm's own function.
* ``rouge_2`` (SAMSum, CNN/DM): ``rouge_score``'s ROUGE-2 F-measure with stemming, the best over the
  references, on the stripped completion, leading ``{`` / trailing ``}`` removed as HELM's
  ``SummarizationMetric`` does; ``rouge_1`` and ``rouge_l`` beside it. An empty completion is a format
  failure.
"""

from __future__ import annotations

import functools
from typing import Sequence


# ------------------------------------------------------------------------------------ MATH
def remove_boxed(string: str) -> str | None:
    left = "\\boxed{"
    if string[: len(left)] == left and string[-1:] == "}":
        return string[len(left):-1]
    return None


def last_boxed_only_string(string: str) -> str | None:
    idx = string.rfind("\\boxed")
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):
        if string[i] == "{":
            depth += 1
        elif string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx:i + 1]
    return None


def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr[0] == "{":  # an empty remainder raises, as HELM's does (is_equiv then compares raw strings)
            new_str += substr
            continue
        if len(substr) < 2:
            return string
        a, b = substr[0], substr[1]
        if b != "{":
            new_str += "{" + a + "}{" + b + "}" + substr[2:]
        else:
            new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    if len(string.split("/")) != 2:
        return string
    a_str, b_str = string.split("/")
    try:
        a, b = int(a_str), int(b_str)
        assert string == f"{a}/{b}"
        return "\\frac{" + str(a) + "}{" + str(b) + "}"
    except Exception:
        return string


def _remove_right_units(string: str) -> str:
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        assert len(splits) == 2
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        new_string += ("\\sqrt{" + split[0] + "}" + split[1:]) if split[0] != "{" else "\\sqrt" + split
    return new_string


def strip_string(string: str) -> str:
    """The MATH authors' answer normalisation (HELM's ``_strip_string``), step for step."""
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def get_answer(solution: str | None) -> str | None:
    """The content of the last ``\\boxed{}`` of a solution, or None."""
    if solution is None:
        return None
    boxed = last_boxed_only_string(solution)
    return None if boxed is None else remove_boxed(boxed)


def is_equiv(str1: str | None, str2: str | None) -> float:
    if str1 is None and str2 is None:
        return 1.0
    if str1 is None or str2 is None:
        return 0.0
    try:
        return float(strip_string(str1) == strip_string(str2))
    except Exception:
        return float(str1 == str2)


def math_equiv_chain_of_thought(gold_solution: str, completion: str) -> float:
    return is_equiv(get_answer(gold_solution), get_answer(completion))


# ------------------------------------------------------------------------------------ ROUGE
@functools.lru_cache(maxsize=None)
def _scorer(kind: str):
    # rouge_score comes with lm-eval (the eval extra); the test proxy may score summaries without it installed
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=True)


def _remove_braces(text: str) -> str:
    if text.startswith("{"):
        text = text[1:]
    if text.endswith("}"):
        text = text[:-1]
    return text


def rouge(kind: str, references: Sequence[str], completion: str) -> float:
    """HELM's ROUGE (``rouge1`` / ``rouge2`` / ``rougeL`` F-measure, stemmed), the best over the references."""
    pred = _remove_braces(completion.strip())
    return max(_scorer(kind).score(_remove_braces(ref), pred)[kind].fmeasure for ref in references)


# ------------------------------------------------------------------------------------ one completion
def score_generation(completion: str, references: Sequence[str], metric: str) -> dict[str, float]:
    """A generation task's metrics for one completion, ``format_failure`` included."""
    text = completion.strip()  # HELM strips completions before any metric
    if metric == "math_equiv_chain_of_thought":
        return {metric: max(math_equiv_chain_of_thought(ref, text) for ref in references),
                "format_failure": float(get_answer(text) is None)}
    if metric == "rouge_2":
        return {"rouge_2": rouge("rouge2", references, text), "rouge_1": rouge("rouge1", references, text),
                "rouge_l": rouge("rougeL", references, text), "format_failure": float(not text)}
    raise ValueError(f"unknown generation metric {metric!r}")
