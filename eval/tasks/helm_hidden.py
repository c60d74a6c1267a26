"""HELM-faithful validation tasks for the hidden eval's families (2/3 of the challenge's score).

The organizers scored these with their fork of HELM (run specs and scenario classes mirrored here from
it; ``data/hidden.py`` holds the questions and files), so the tasks reproduce the fork's prompt, request
and metric on the same upstream files:

* ``onegpu_helm_ethics_<subset>`` (commonsense, deontology, justice, utilitarianism, virtue) and
  ``onegpu_helm_corr2cause``: the fork's scenario reads one file, shuffles it with ``random.seed(0)``,
  keeps the first 80% (utilitarianism 70%) as in-context examples and evaluates the rest; HELM's
  joint multiple choice (``helm_mc.py``) with the fork's instructions and answers, 5 examples (Corr2Cause
  1, as the hidden conf sets), 1 output token, exact match on the letter. Offline the file is the
  upstream test split; from the hub, the exact file the fork downloaded (``HELM_FORK_FILES``).
* ``onegpu_helm_math_<subject>``: HELM's MATH with chain of thought: the dataset sorted by problem and
  shuffled with seed 42 (as ``MATHScenario`` does), 8 in-context examples from the train split of the
  same subject and level (HELM's sampler, seed 0), ``###``-separated blocks, 400 tokens, stop
  ``###``, ``math_equiv_chain_of_thought`` (``helm_metrics.py``). The hidden conf runs levels 1 and 5;
  these tasks evaluate every level of the test split (each item with its level's examples), so a
  small local sample still has items for every subject.
* ``onegpu_helm_samsum`` (hub: the SAMSum file the fork scored) and ``onegpu_helm_dialogsum`` (offline
  stand-in: DialogSum's test split, 3 references each): the fork's ``sam_sum`` run spec, HELM's
  summarisation prompt (``###\\nArticle: <dialogue>\\n\\nSummarize the above article in 1 sentence.``),
  no in-context examples (the fork's file has no train split), 128 tokens, stop ``###``, ROUGE-2 as
  HELM's ``SummarizationMetric`` computes it. HELM samples at temperature 0.3 there; these tasks are
  greedy, so a score is repeatable.

Every task reports ``format_failure`` beside its metric: not one of the letters (multiple choice), no
``\\boxed{}`` answer (MATH), an empty summary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from onegpu.data import hidden
from onegpu.eval.tasks import helm_mc
from onegpu.eval.tasks.helm_metrics import score_generation

HIDDEN_TASK_PREFIXES = tuple(f"{helm_mc.HELM_TASK_PREFIX}{f}" for f in ("ethics_", "corr2cause", "math_", "samsum",
                                                                         "dialogsum"))


@dataclass(frozen=True)
class GenerationFormat:
    """The AdapterSpec fields that shape a HELM generation prompt and request, and the run spec's metric."""

    instructions: str
    input_prefix: str
    input_suffix: str
    output_prefix: str
    output_suffix: str
    instance_prefix: str
    max_train_instances: int
    max_tokens: int
    stop: tuple[str, ...]
    metric: str


MATH_COT = GenerationFormat(  # HELM's get_math_spec(use_chain_of_thought=True)
    "Given a mathematics problem, determine the answer. Simplify your answer as much as possible.\n", "Problem: ", "\n",
    "Answer: ", "\n", "###\n", 8, 400, ("###",), "math_equiv_chain_of_thought")
SAMSUM = GenerationFormat(  # the fork's get_sam_sum_spec: get_summarization_adapter_spec(num_sents=1, max_tokens=128)
    "", "###\nArticle: ", "\n\n", "Summarize the above article in 1 sentence.\n", "\n", "\n", 5, 128, ("###",), "rouge_2")


def generation_prompt(fmt: GenerationFormat, shots: list[tuple[str, str]], text: str) -> str:
    """HELM's ``Prompt.text`` for a generation adapter: instructions, examples, the test input, joined."""
    blocks = [fmt.instructions] if fmt.instructions else []
    blocks += [fmt.input_prefix + x + fmt.input_suffix + fmt.output_prefix + y + fmt.output_suffix for x, y in shots]
    blocks.append(fmt.input_prefix + text + fmt.input_suffix + fmt.output_prefix.rstrip())
    return fmt.instance_prefix.join(blocks)


# ------------------------------------------------------------------------------------ scenarios
def question_instances(question: hidden.Question, items: list[dict[str, Any]]
                       ) -> tuple[list[helm_mc.MCInstance], list[helm_mc.MCInstance]]:
    """The fork's classification scenarios: ``random.seed(0)`` shuffle, the first ``train_share`` as
    in-context examples, the rest evaluated; references in the fork's order."""
    items = list(items)
    random.Random(0).shuffle(items)
    split = int(len(items) * question.train_share)
    instances = [helm_mc.MCInstance(i["text"], question.answers, (i["label"],)) for i in items]
    return instances[:split], instances[split:]


def question_format(question: hidden.Question) -> helm_mc.JointFormat:
    return helm_mc.joint_format(question.instructions, question.input_noun, "Answer",
                                max_train_instances=question.shots)


def math_rows(train: list[dict[str, Any]], test: list[dict[str, Any]], subject: str) -> list[dict[str, Any]]:
    """``MATHScenario`` (chain of thought) for one subject, every level: its sort and shuffle, then per level
    HELM's 8 sampled examples and one row per test problem."""
    def order(rows: list[dict]) -> list[dict]:  # HELM: datasets' .sort("problem").shuffle(seed=42)
        rows = sorted(rows, key=lambda r: r["problem"])
        return [rows[i] for i in np.random.default_rng(42).permutation(len(rows))]

    name = hidden.MATH_TYPES[subject]
    train, test = order(train), order(test)
    out = []
    for level in sorted({r["level"] for r in test if r["type"] == name}):
        pool = [helm_mc.MCInstance(r["problem"], (r["solution"],), (0,)) for r in train
                if r["type"] == name and r["level"] == level]
        shots = [(s.text, s.choices[0]) for s in helm_mc.sample_train(pool, MATH_COT.max_train_instances)]
        for r in test:
            if r["type"] == name and r["level"] == level:
                out.append(generation_row(MATH_COT, generation_prompt(MATH_COT, shots, r["problem"]), [r["solution"]],
                                          level=level))
    return out


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [generation_row(SAMSUM, generation_prompt(SAMSUM, [], r["dialogue"]), r["summaries"]) for r in records
            if r["summaries"]]


def generation_row(fmt: GenerationFormat, prompt: str, references: list[str], **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "references": references, "metric": fmt.metric, "max_tokens": fmt.max_tokens,
            "stop": list(fmt.stop), **extra}


# ------------------------------------------------------------------------------------ where the files are
class FamilyFiles(Protocol):
    """Where the families' records come from: ``LocalFiles`` (a data dir), or ``eval/tasks/hub.py``'s ``HubFiles``."""

    def ethics(self, subset: str) -> list[dict]: ...
    def corr2cause(self) -> list[dict]: ...
    def math(self, split: str, subject: str) -> list[dict]: ...
    def dialogsum(self) -> list[dict]: ...
    def samsum(self) -> list[dict]: ...


class LocalFiles:
    """The families' files in a data dir laid out like ../shared/datasets (upstream formats)."""

    def __init__(self, ds: Path):
        self.ds = ds

    def _glob(self, pattern: str) -> list[Path]:
        return sorted(self.ds.glob(pattern))

    def ethics(self, subset: str) -> list[dict]:
        # the fork scored the hard test sets where ETHICS has them (commonsense, justice)
        hard = self._glob(hidden.ETHICS_EVAL_FILES[1].format(subset=subset))
        return [row for f in hard or self._glob(hidden.ETHICS_EVAL_FILES[0].format(subset=subset))
                for row in hidden.read_ethics_csv(f, subset)]

    def corr2cause(self) -> list[dict]:
        return [r for f in self._glob(hidden.CORR2CAUSE_FILES.format(split="test")) for r in hidden.read_corr2cause_csv(f)]

    def math(self, split: str, subject: str) -> list[dict]:
        return [hidden.read_math_problem(f) for f in self._glob(hidden.MATH_FILES.format(split=split, subject=subject))]

    def dialogsum(self) -> list[dict]:
        return [r for f in self._glob(hidden.DIALOGSUM_FILES.format(split="test")) for r in hidden.read_dialogues(f)]

    def samsum(self) -> list[dict]:
        return []  # SAMSum's licence (no derivatives) keeps it out of local sample folders


# ------------------------------------------------------------------------------------ task files
def build(files: FamilyFiles, write: Callable[[str, list[dict], Any], None],
          wanted: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Render every hidden-family task the files allow (and ``wanted`` asks for) through ``write(name, rows,
    fmt)`` (fmt: a ``helm_mc.JointFormat`` for multiple choice, the ``GenerationFormat`` otherwise); returns
    the task names."""
    made = []
    for key, question in hidden.QUESTIONS.items():
        name = f"{helm_mc.HELM_TASK_PREFIX}{key}"
        if not wanted(name):
            continue
        subset = key.removeprefix("ethics_")
        items = hidden.ethics_items(subset, files.ethics(subset)) if key.startswith("ethics_") else \
            [{"text": r["input"], "label": r["label"]} for r in files.corr2cause()]
        train, evaluated = question_instances(question, items)
        if evaluated:
            fmt = question_format(question)
            write(name, helm_mc.task_rows(fmt, train, evaluated), fmt)
            made.append(name)
    for subject in hidden.MATH_SUBJECTS:
        name = f"{helm_mc.HELM_TASK_PREFIX}math_{subject}"
        if wanted(name):
            rows = math_rows(files.math("train", subject), files.math("test", subject), subject)
            if rows:
                write(name, rows, MATH_COT)
                made.append(name)
    for key, read in (("samsum", files.samsum), ("dialogsum", files.dialogsum)):
        name = f"{helm_mc.HELM_TASK_PREFIX}{key}"
        if wanted(name):
            rows = summary_rows(read())
            if rows:
                write(name, rows, SAMSUM)
                made.append(name)
    return made


def task_yaml(name: str, data_file: Path, rows: list[dict]) -> str:
    """The lm-eval task YAML of one generation task (its hook module sits beside it)."""
    metric = rows[0]["metric"]
    return helm_mc.generation_task_yaml(
        name, data_file, stop=rows[0]["stop"], max_tokens=rows[0]["max_tokens"], target="references[0]",
        hooks="helm_hidden_hooks", metrics=[metric, "rouge_1", "rouge_l"] if metric == "rouge_2" else [metric],
        about="HELM-faithful generation task of the hidden eval (eval/tasks/helm_hidden.py): HELM's prompt (in-context\n"
              "# examples included), greedy, HELM's max_tokens and stop sequences, HELM's metric.")


HOOKS_MODULE = "from onegpu.eval.tasks.helm_hidden import process_results  # noqa: F401\n"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook of the generation tasks (``process_results: !function``)."""
    return score_generation(results[0], doc["references"], doc["metric"])


def is_hidden_task(task: str) -> bool:
    return task.startswith(HIDDEN_TASK_PREFIXES)
