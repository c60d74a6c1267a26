"""Eval families: the task groups the challenge scores, which eval tasks belong to each, and which training
sources serve each (the affinity table, ``data/recipes/affinity.yaml``).

A task's family is its name without ``onegpu_helm_`` / ``onegpu_``, up to the first ``_``
(``onegpu_helm_mmlu_philosophy`` -> ``mmlu``, ``ethics_cm`` -> ``ethics``), with the stand-ins named
after what they stand in for (``onegpu_helm_dialogsum`` -> ``samsum``, lm-eval's ``minerva_math_*``
-> ``math``). A source *serves* a family when its affinity to it is at least ``SERVES``; ``data build``
splits each source's train tokens across the families it serves (in proportion to affinity) and names
the families of the score a mix leaves without tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onegpu.contracts import read_yaml
from onegpu.errors import UserError
from onegpu.tables import text_table

DEFAULT_AFFINITY = Path(__file__).resolve().parent / "recipes" / "affinity.yaml"
SCORE_GROUPS = {"open": ("mmlu", "truthfulqa", "bbq", "bigbench", "gsm8k"),
                "hidden": ("samsum", "corr2cause", "ethics", "math")}
REPORTED = ("cnn",)  # HELM runs it beside the hidden eval; not part of the score
TASK_PREFIXES = ("onegpu_helm_", "onegpu_")
FAMILY_ALIASES = {"dialogsum": "samsum", "minerva": "math"}  # stand-ins and hub task names
SERVES = 2.0


def task_family(task: str) -> str:
    """``onegpu_helm_mmlu_philosophy`` -> ``mmlu``; ``onegpu_helm_dialogsum`` -> ``samsum``."""
    for prefix in TASK_PREFIXES:
        if task.startswith(prefix):
            task = task[len(prefix):]
            break
    family = task.split("_")[0]
    return FAMILY_ALIASES.get(family, family)


def group_of(family: str) -> str:
    return next((g for g, fams in SCORE_GROUPS.items() if family in fams), "reported" if family in REPORTED else "other")


def read_affinity(path: Path) -> dict[str, dict[str, float]]:
    """The task-family -> {source: affinity} table, checked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"affinity table {path} does not exist", fix=f"copy and edit {DEFAULT_AFFINITY}")
    table = read_yaml(path, "affinity table")
    ok = all(isinstance(row, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                           for v in row.values()) for row in table.values())
    if not ok:
        raise UserError(f"affinity table {path} must map task family -> {{source: number >= 0}}",
                        fix=f"see {DEFAULT_AFFINITY} for the format")
    return {str(f): {str(s): float(a) for s, a in row.items()} for f, row in table.items()}


def served_by(source: str, affinity: dict[str, dict[str, float]]) -> dict[str, float]:
    """{family: affinity} of the families a source serves (affinity >= SERVES)."""
    return {f: row[source] for f, row in affinity.items() if row.get(source, 0.0) >= SERVES}


def family_tokens(tokens_by_source: dict[str, int], affinity: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Train tokens per eval family: each source's tokens split across the families it serves in proportion to
    its affinity to them. ``uncovered``: the families of the score no source of the mix serves."""
    total = sum(tokens_by_source.values())
    families = {f: {"group": group_of(f), "tokens": 0.0, "sources": []}
                for f in [*SCORE_GROUPS["open"], *SCORE_GROUPS["hidden"], *REPORTED, *affinity]}
    unassigned = []
    for source, tokens in tokens_by_source.items():
        serves = served_by(source, affinity)
        if not serves:
            unassigned.append(source)
            continue
        for family, a in serves.items():
            families[family]["tokens"] += tokens * a / sum(serves.values())
            families[family]["sources"].append(source)
    for entry in families.values():
        entry["tokens"] = int(round(entry["tokens"]))
        entry["share"] = round(entry["tokens"] / total, 4) if total else 0.0
    scored = [*SCORE_GROUPS["open"], *SCORE_GROUPS["hidden"]]
    return {"families": families, "uncovered": [f for f in scored if not families[f]["tokens"]],
            "sources_serving_no_family": unassigned, "serves_at_affinity": SERVES}


def coverage_table(report: dict[str, Any]) -> str:
    """The per-family lines ``data build`` prints."""
    rows = [(name, f["group"], f["tokens"], f"{100 * f['share']:.1f}%", ", ".join(f["sources"]) or "-")
            for name, f in report["families"].items() if f["tokens"] or f["group"] in ("open", "hidden")]
    lines = [text_table(("family", "group", "tokens", "share", "sources"), rows, cell=str, indent="  ")]
    if report["uncovered"]:
        lines.append(f"  uncovered families of the score: {', '.join(report['uncovered'])} (no source of the mix "
                     f"serves them; `onegpu data sources` lists sources per family)")
    return "\n".join(lines)
