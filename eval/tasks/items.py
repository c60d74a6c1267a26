"""A small, fixed, seeded suite of HELM-faithful items (``HelmItem``), scored as the lm-eval tasks score them.

For callers that generate the answers themselves, e.g. the fine-tune's test proxy (``finetune/proxy.py``):
``helm_mc_items`` reads the rendered offline tasks (``eval/tasks/__init__.py``), ``score_items`` scores
completions by each task's HELM metric (``helm_mc.py``, ``helm_metrics.py``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onegpu.errors import UserError
from onegpu.eval.tasks import offline_include_dir
from onegpu.eval.tasks.helm_mc import HELM_TASK_PREFIX, is_helm_task, score_completion
from onegpu.eval.tasks.helm_metrics import score_generation


DEFAULT_ITEM_TASKS = ("onegpu_helm_mmlu_philosophy", "onegpu_helm_mmlu_high_school_biology",
                      "onegpu_helm_truthfulqa_mc1", "onegpu_helm_bbq", "onegpu_helm_bigbench_emoji_movie")


@dataclass(frozen=True)
class HelmItem:
    """One HELM request: send ``prompt`` (wrapped in the checkpoint's prompt style, as the server
    does), greedy, at most ``max_tokens`` new tokens, cut at the first of ``stop``. Multiple choice:
    ``choices`` and the ``correct`` ones, scored by exact match on the letter; generation (the hidden
    eval's MATH and summaries, ``helm_hidden.py``): ``references`` and the HELM ``metric``."""

    task: str
    doc_id: int
    prompt: str
    choices: tuple[str, ...]
    correct: tuple[int, ...]
    max_tokens: int
    stop: tuple[str, ...] = field(default=())
    references: tuple[str, ...] = field(default=())
    metric: str = "exact_match"


def helm_mc_items(tasks: Sequence[str] = DEFAULT_ITEM_TASKS, per_task: int = 8, seed: int = 1234,
                  datasets_dir: Path | None = None) -> list[HelmItem]:
    """A small, fixed, seeded HELM-faithful suite: ``per_task`` items of each task, same every call.

    Reads the rendered task files (``offline_include_dir``); raises ``UserError`` for an unknown
    task or when the local datasets are missing.
    """
    include = offline_include_dir(datasets_dir)
    if include is None:
        raise UserError("HELM-faithful tasks need the local dataset copies",
                        fix="put ../shared/datasets beside the checkout or set ONEGPU_DATA_DIR")
    items: list[HelmItem] = []
    for task in tasks:
        yaml_path, data_path = include / f"{task}.yaml", include / "data" / "helm" / f"{task}.jsonl"
        if not (is_helm_task(task) and yaml_path.is_file() and data_path.is_file()):
            known = sorted(p.stem for p in include.glob(f"{HELM_TASK_PREFIX}*.yaml"))
            raise UserError(f"unknown HELM-faithful task {task!r}", fix=f"use one of: {', '.join(known)}")
        rows = [json.loads(line) for line in data_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        picked = sorted(random.Random(f"{seed}:{task}").sample(range(len(rows)), min(per_task, len(rows))))
        items += [HelmItem(task, i, rows[i]["prompt"], tuple(rows[i].get("choices", ())), tuple(rows[i].get("correct", ())),
                           rows[i]["max_tokens"], tuple(rows[i]["stop"]), tuple(rows[i].get("references", ())),
                           rows[i].get("metric", "exact_match")) for i in picked]
    return items


def score_item(item: HelmItem, completion: str) -> dict[str, float]:
    """One completion's ``score`` (the task's HELM metric) and ``format_failure``, as the lm-eval tasks score it."""
    if item.metric == "exact_match":
        s = score_completion(completion, item.choices, item.correct)
    else:
        s = score_generation(completion, item.references, item.metric)
    return {**s, "score": s[item.metric]}


def score_items(items: Sequence[HelmItem], completions: Sequence[str]) -> dict[str, Any]:
    """Per task ``{exact_match, metric, format_failures, n}`` (multiple choice: ``quasi_exact_match`` too) and the
    mean over tasks. ``exact_match`` is each task's HELM metric: exact match, or for the hidden eval's
    generation tasks the one ``metric`` names (MATH equivalence, ROUGE-2)."""
    if len(items) != len(completions):
        raise ValueError(f"{len(items)} items but {len(completions)} completions")
    per_task: dict[str, dict[str, Any]] = {}
    for item, completion in zip(items, completions):
        s = score_item(item, completion)
        t = per_task.setdefault(item.task, {"exact_match": 0.0, "metric": item.metric, "format_failures": 0, "n": 0,
                                            **({"quasi_exact_match": 0.0} if item.metric == "exact_match" else {})})
        t["exact_match"] += s["score"]
        if "quasi_exact_match" in t:
            t["quasi_exact_match"] += s["quasi_exact_match"]
        t["format_failures"] += int(s["format_failure"])
        t["n"] += 1
    for t in per_task.values():
        t["exact_match"] /= t["n"]
        if "quasi_exact_match" in t:
            t["quasi_exact_match"] /= t["n"]
    ems = [t["exact_match"] for t in per_task.values()]
    return {"tasks": per_task, "exact_match": sum(ems) / len(ems) if ems else None,
            "format_failures": sum(t["format_failures"] for t in per_task.values())}
