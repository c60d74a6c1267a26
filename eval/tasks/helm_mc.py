"""HELM-faithful multiple choice: HELM's prompt, HELM's request, HELM's exact-match scoring.

lm-eval scores multiple choice by comparing the log-likelihoods of the options; HELM, which
scores the challenge, *generates* and compares the answer letter. A fine-tune that changes how
answers start ("The answer is B.", a blank line) keeps its likelihood score and loses its HELM
score. The tasks built here measure what HELM measures, offline:

* **prompt**: HELM's ``multiple_choice_joint`` adapter (crfm-helm
  ``adaptation/adapters/multiple_choice_joint_adapter.py`` + ``in_context_learning_adapter.py``):
  the instructions block, in-context examples chosen by HELM's label-balanced sampler (seed 0),
  each example ``<input_prefix><input><input_suffix>A. <option>\\n...<output_prefix><letter>
  <output_suffix>``, blocks joined by ``"\\n"``, the test example ending in ``output_prefix.rstrip()``;
* **request**: greedy, the scenario's ``max_tokens`` (1 for MMLU / TruthfulQA / BBQ, 64 for
  BIG-bench) and stop sequences (``"\\n"``; none for BIG-bench, as HELM's run spec sends none);
* **scoring**: HELM's ``compute_reference_metrics``: the completion is stripped, mapped through
  the letter -> option table (``output_mapping``; anything but an exact letter maps to nothing),
  then ``exact_match`` / ``quasi_exact_match`` against the correct options. A completion that is
  not one of the question's letters is a **format failure**.

The scenario readers mirror HELM's scenario classes (splits, shuffles, reference order) on the
same upstream files, read from the local copies: MMLU ``dev`` -> in-context examples, ``test`` ->
evaluated; TruthfulQA ``mc_single`` from the 2023 CSV (first 20% train, rest evaluated; options
rotated as HELM does); BBQ (``random.seed(0)`` shuffle, last 1000 evaluated); BIG-bench tasks
whose metrics include ``multiple_choice_grade`` (shuffle, 20%/min-16 test split, the task's
prefixes). ``tests/test_eval_helm_mc.py`` checks prompts and scores against crfm-helm's own code.

For callers outside lm-eval (a training-time proxy, a data reweighter): ``score_completion`` scores a
completion exactly as the lm-eval tasks do; ``eval/tasks/items.py`` builds a small, fixed, seeded suite
of ``HelmItem``s from the rendered tasks and scores them.
"""

from __future__ import annotations

import csv
import json
import random
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Any

LETTERS = string.ascii_uppercase
BBQ_TEST_SIZE = 1000  # helm.benchmark.scenarios.scenario.DEFAULT_TEST_SIZE
BBQ_CATEGORIES = ("Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
                  "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation")
BIGBENCH_MIN_TEST = 16  # BIGBenchScenario.MIN_TEST_EXAMPLES
TRUTHFULQA_TRAIN_RATIO = 0.2


# ------------------------------------------------------------------------------------ format
@dataclass(frozen=True)
class JointFormat:
    """The fields of HELM's AdapterSpec that shape a multiple_choice_joint prompt and request."""

    instructions: str = ""
    input_prefix: str = "Input: "
    input_suffix: str = "\n"
    reference_prefix: str = "A. "
    reference_suffix: str = "\n"
    output_prefix: str = "Output: "
    output_suffix: str = "\n"
    instance_prefix: str = "\n"
    max_train_instances: int = 5
    max_tokens: int = 1
    stop: tuple[str, ...] = ("\n",)


def joint_format(instructions: str, input_noun: str | None, output_noun: str = "Answer", **kw: Any) -> JointFormat:
    """HELM's ``get_multiple_choice_adapter_spec`` (joint): instructions get a trailing newline."""
    return JointFormat(instructions=instructions + "\n" if instructions else "",
                       input_prefix=f"{input_noun}: " if input_noun is not None else "",
                       input_suffix="\n" if input_noun is not None else "",
                       output_prefix=f"{output_noun}: ", output_suffix="\n", **kw)


@dataclass(frozen=True)
class MCInstance:
    text: str
    choices: tuple[str, ...]
    correct: tuple[int, ...]  # indices of the correct options (HELM's CORRECT_TAG references)


def _letter_prefix(fmt: JointFormat, prefix: str, i: int) -> str:
    old = next(ch for ch in fmt.reference_prefix if ch.isalnum())
    return prefix.replace(old, chr(ord(old) + i))


def example_block(fmt: JointFormat, inst: MCInstance, include_output: bool) -> str:
    """``MultipleChoiceJointAdapter.construct_example_prompt``."""
    text = fmt.input_prefix + inst.text + fmt.input_suffix
    for i, choice in enumerate(inst.choices):
        text += _letter_prefix(fmt, fmt.reference_prefix, i) + choice + fmt.reference_suffix
    if not include_output:
        return text + fmt.output_prefix.rstrip()
    letter = _letter_prefix(fmt, "A", inst.correct[0]) if inst.correct else "n/a"
    return text + fmt.output_prefix + letter + fmt.output_suffix


def build_prompt(fmt: JointFormat, shots: Sequence[MCInstance], inst: MCInstance) -> str:
    """HELM's ``Prompt.text``: instructions, in-context examples and the test example, joined."""
    blocks = ([fmt.instructions] if fmt.instructions else []) + [example_block(fmt, s, True) for s in shots]
    return fmt.instance_prefix.join(blocks + [example_block(fmt, inst, False)])


def sample_train(train: Sequence[MCInstance], k: int, seed: int = 0) -> list[MCInstance]:
    """``InContextLearningAdapter.sample_examples``: label-balanced, most frequent labels first.

    Same random calls in the same order as HELM's (which seeds the global ``random``), so the
    same examples come out in the same order.
    """
    rng = random.Random(seed)
    remaining = min(len(train), k)
    unlabeled: list[MCInstance] = []
    by_label: dict[str, list[MCInstance]] = defaultdict(list)
    for inst in train:
        if inst.correct:
            by_label[inst.choices[inst.correct[0]]].append(inst)
        else:
            unlabeled.append(inst)
    by_count: dict[int, list[str]] = defaultdict(list)
    for label, insts in sorted(by_label.items()):
        by_count[len(insts)].append(label)
    ordered: list[str] = []
    for count in sorted(by_count, reverse=True):
        labels = by_count[count]
        rng.shuffle(labels)
        ordered.extend(labels)
    examples: list[MCInstance] = []
    labels_cycle = cycle(ordered)
    while remaining > 0:
        label = next(labels_cycle, None)
        if not label:
            break
        pool = by_label[label]
        if not pool:
            continue
        examples.append(pool.pop(rng.randrange(len(pool))))
        remaining -= 1
    return examples + rng.sample(unlabeled, remaining)


# ------------------------------------------------------------------------------------ scoring
def normalize_text(text: str) -> str:
    """HELM's ``normalize_text`` (from the QuAC scorer): lower, drop punctuation and articles."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def score_completion(completion: str, choices: Sequence[str], correct: Sequence[int]) -> dict[str, float]:
    """HELM's exact_match / quasi_exact_match for a multiple_choice_joint request, + format failure."""
    mapping = {LETTERS[i]: choice for i, choice in enumerate(choices)}
    predicted = mapping.get(completion.strip())
    golds = [choices[i] for i in correct]
    em = float(bool(predicted) and any(g.strip() == predicted.strip() for g in golds))
    quasi = float(bool(predicted) and any(normalize_text(g) == normalize_text(predicted) for g in golds))
    return {"exact_match": em, "quasi_exact_match": quasi, "format_failure": float(predicted is None)}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook of the ``onegpu_helm_*`` tasks (``process_results: !function``)."""
    return score_completion(results[0], doc["choices"], doc["correct"])


# ------------------------------------------------------------------------------------ scenarios
def _instance(text: str, choices: Iterable[str], correct_texts: Iterable[str]) -> MCInstance:
    choices = tuple(choices)
    wanted = set(correct_texts)
    return MCInstance(text, choices, tuple(i for i, c in enumerate(choices) if c in wanted))


def mmlu_instances(dev_csv: Path, test_csv: Path) -> tuple[list[MCInstance], list[MCInstance]]:
    """``MMLUScenario``: dev -> train, test -> eval; options marked correct by text equality."""
    def read(path: Path) -> list[MCInstance]:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        out = []
        for r in rows:
            choices = [r[f"choice{i}"] for i in range(4)]
            out.append(_instance(r["question"], choices, [choices[int(r["answer"])]]))
        return out

    return read(dev_csv), read(test_csv)


def mmlu_format(subject: str) -> JointFormat:
    return joint_format(f"The following are multiple choice questions (with answers) about "
                        f"{subject.replace('_', ' ')}.", "Question")


def truthfulqa_format() -> JointFormat:
    return joint_format("", "Question")


def bbq_format() -> JointFormat:
    return joint_format("The following are multiple choice questions (with answers).", "Passage")


def truthfulqa_instances(csv_path: Path) -> tuple[list[MCInstance], list[MCInstance]]:
    """``TruthfulQAScenario`` task ``mc_single`` on the 7-column CSV (the 2023 one, data/v1)."""
    def fmt(s: str) -> str:
        s = s.strip()
        return s if s[-1] == "." else s + "."

    with open(csv_path, encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader)
        rows = [(q, best, incorrect) for _t, _c, q, best, _correct, incorrect, _s in reader]
    instances = []
    for question, best, incorrect in rows:
        best = fmt(best)
        refs = [fmt(a.strip()) for a in incorrect.split(";") if a.strip()] + [best]
        k = ord(best[0]) % len(refs)
        refs = refs[k:] + refs[:k]
        instances.append(MCInstance(question.strip(), tuple(refs), (refs.index(best),)))
    split = int(len(instances) * TRUTHFULQA_TRAIN_RATIO)
    return instances[:split], instances[split:]


def bbq_instances(records: Sequence[dict]) -> tuple[list[MCInstance], list[MCInstance]]:
    """``BBQScenario``: records in category order, ``random.seed(0)`` shuffle, the last 1000 evaluated."""
    lines = list(records)
    random.Random(0).shuffle(lines)
    n_train = len(lines) - BBQ_TEST_SIZE
    instances = []
    for r in lines:
        answers = [r["ans0"], r["ans1"], r["ans2"]]
        # PassageQuestionInput: passage + "\n" + "Question: " + question
        instances.append(_instance(f"{r['context']}\nQuestion: {r['question']}", answers, [answers[r["label"]]]))
    return instances[:n_train], instances[n_train:]


def bigbench_is_multiple_choice(spec: dict) -> bool:
    """HELM's big_bench run spec: joint multiple choice iff the task lists ``multiple_choice_grade``."""
    return "multiple_choice_grade" in (spec.get("metrics") or []) and \
        all("target_scores" in e for e in spec.get("examples") or [{}])


def bigbench_format(spec: dict, shots: int = 3) -> JointFormat:
    """HELM's ``get_big_bench_spec`` AdapterSpec (no stop sequence unless the task has one; 64 tokens)."""
    stop = (str(spec["stop_string"]),) if spec.get("stop_string") else ()
    return JointFormat(instructions=spec.get("task_prefix", ""),
                       input_prefix=spec.get("example_input_prefix", "Question: "),
                       output_prefix=spec.get("example_output_prefix", "Answer: "),
                       max_train_instances=shots, max_tokens=64, stop=stop)


def bigbench_instances(spec: dict) -> tuple[list[MCInstance], list[MCInstance]]:
    """``BIGBenchScenario``: ``random.seed(0)`` shuffle; train, then test (evaluated), then valid."""
    examples = list(spec["examples"])
    random.Random(0).shuffle(examples)
    n_test = max(int(0.2 * len(examples)), BIGBENCH_MIN_TEST)
    n_train = len(examples) - 2 * n_test
    train, test = [], []
    for i, e in enumerate(examples):
        best = max(e["target_scores"].values())
        inst = _instance(e["input"], e["target_scores"], [t for t, s in e["target_scores"].items() if s == best])
        if i < n_train:
            train.append(inst)
        elif i < n_train + n_test:  # HELM's test split (valid follows; HELM reports test)
            test.append(inst)
    return train, test


# ------------------------------------------------------------------------------------ task files
def task_rows(fmt: JointFormat, train: Sequence[MCInstance], evaluated: Sequence[MCInstance]) -> list[dict]:
    """One JSONL row per evaluated instance: the full HELM prompt, options, correct indices."""
    shots = sample_train(train, fmt.max_train_instances)
    return [{"prompt": build_prompt(fmt, shots, inst), "choices": list(inst.choices), "correct": list(inst.correct),
             "target": LETTERS[inst.correct[0]] if inst.correct else "", "max_tokens": fmt.max_tokens,
             "stop": list(fmt.stop)} for inst in evaluated]


def task_yaml(name: str, data_file: Path, fmt: JointFormat) -> str:
    """The lm-eval task YAML of one HELM-faithful task (its hook module sits beside it)."""
    return generation_task_yaml(
        name, data_file, stop=list(fmt.stop), max_tokens=fmt.max_tokens, target="target", hooks="helm_mc_hooks",
        metrics=["exact_match", "quasi_exact_match"],
        about="HELM-faithful generation variant (eval/tasks/helm_mc.py): HELM's multiple_choice_joint prompt\n"
              "# (in-context examples included), greedy, HELM's max_tokens and stop sequences, HELM's exact match.")


def generation_task_yaml(name: str, data_file: Path, *, stop: list[str], max_tokens: int, target: str, hooks: str,
                         metrics: list[str], about: str) -> str:
    """One HELM-faithful generation task for lm-eval: greedy, HELM's stop sequences and max_tokens, scored
    by ``hooks.process_results`` (higher-is-better ``metrics``, then the format failures)."""
    return GENERATION_TASK.format(
        about=about, name=name, data_file=json.dumps(str(data_file)), until=json.dumps(stop), max_tokens=max_tokens,
        target=target, hooks=hooks,
        metrics="".join(f"  - {{metric: {m}, aggregation: mean, higher_is_better: true}}\n" for m in metrics))


GENERATION_TASK = """\
# {about}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
output_type: generate_until
test_split: test
num_fewshot: 0
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{{target}}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: {max_tokens}
  do_sample: false
  temperature: 0.0
process_results: !function {hooks}.process_results
metric_list:
{metrics}  - {{metric: format_failure, aggregation: mean, higher_is_better: false}}
metadata:
  version: 1.0
"""
HOOKS_MODULE = "from onegpu.eval.tasks.helm_mc import process_results  # noqa: F401\n"
HELM_TASK_PREFIX = "onegpu_helm_"


def likelihood_twins(task: str) -> list[str]:
    """The likelihood tasks a HELM-faithful task mirrors: the offline one, then lm-eval's hub one.

    ``onegpu_helm_mmlu_philosophy`` -> ``onegpu_mmlu_philosophy``, ``mmlu_philosophy``;
    ``onegpu_helm_bigbench_snarks`` -> ``onegpu_bigbench_snarks``, ``bigbench_snarks_multiple_choice``.
    """
    if not task.startswith(HELM_TASK_PREFIX):
        return []
    name = task[len(HELM_TASK_PREFIX):]
    hub = f"{name}_multiple_choice" if name.startswith("bigbench_") else name
    return ["onegpu_" + name, hub]


def is_helm_task(task: str) -> bool:
    return task.startswith(HELM_TASK_PREFIX)
