"""Run inside the HELM env (crfm-helm): HELM's own code on the hidden eval's families, for
tests/test_eval_hidden.py to compare onegpu's tasks with.

    python helm_hidden_reference.py DATASETS_DIR WORK_DIR OUT.json INPUT.json

* MATH: crfm-helm's ``MATHScenario`` (its sort, seed-42 shuffle and subject/level filter) on the local
  MATH sample, served in place of the hub download; ``get_math_spec(use_chain_of_thought=True)``; the
  generation adapter and its in-context sampler (seed 0); ``math_equiv_chain_of_thought`` through
  ``compute_reference_metrics`` for each completion in INPUT's ``math_completions``.
* ETHICS and Corr2Cause: the challenge fork's run-spec arguments given to stock HELM's
  ``get_multiple_choice_adapter_spec``, instances built as the fork's scenario classes build them
  (``random.seed(0)`` shuffle, the first share as train) from INPUT's items, HELM's joint adapter.
* Summarisation: the fork's ``sam_sum`` adapter spec (``get_summarization_adapter_spec(num_sents=1,
  max_tokens=128)``) and HELM's generation adapter on DialogSum's test split; HELM's ROUGE functions
  (``SummarizationMetric._compute_rouge``: the best over the references, braces removed) for INPUT's
  ``summary_completions``.
"""

from __future__ import annotations

import glob
import json
import random
import sys
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict

import helm.benchmark.scenarios.math_scenario as math_scenario
from helm.benchmark.adaptation.adapters.generation_adapter import GenerationAdapter
from helm.benchmark.adaptation.adapters.multiple_choice_joint_adapter import MultipleChoiceJointAdapter
from helm.benchmark.adaptation.common_adapter_specs import get_multiple_choice_adapter_spec, get_summarization_adapter_spec
from helm.benchmark.adaptation.request_state import RequestState
from helm.benchmark.metrics.evaluate_reference_metrics import compute_reference_metrics, get_rouge_function
from helm.benchmark.run_specs.lite_run_specs import get_math_spec
from helm.benchmark.scenarios.scenario import CORRECT_TAG, TEST_SPLIT, TRAIN_SPLIT, VALID_SPLIT, Input, Instance, Output, Reference
from helm.common.request import GeneratedOutput, RequestResult


class WholeWindow:
    """Every prompt fits: the comparison is about the prompt text, not a tokenizer's window."""

    def fits_within_context_window(self, text: str, expected_completion_token_length: int = 0) -> bool:
        return True

    def truncate_from_right(self, text: str, expected_completion_token_length: int = 0) -> str:
        return text


def adapter(cls, spec):
    a = cls.__new__(cls)
    a.adapter_spec = spec
    a.window_service = WholeWindow()
    return a


def with_result(state: RequestState, text: str) -> RequestState:
    result = RequestResult(success=True, embedding=[], completions=[GeneratedOutput(text=text, logprob=0.0, tokens=[])],
                           cached=False)
    return RequestState(**{**state.__dict__, "result": result})


def math(datasets: Path, work: Path, completions: list[str]) -> dict:
    rows = {split: [json.loads(Path(f).read_text(encoding="utf-8"))
                    for f in sorted(glob.glob(str(datasets / "math" / "MATH" / split / "*" / "*.json")))]
            for split in ("train", "test")}
    math_scenario.load_dataset = lambda *args, **kwargs: DatasetDict({s: Dataset.from_list(r) for s, r in rows.items()})
    out = {}
    for subject in math_scenario.MATHScenario.subjects_mapping:
        for level in math_scenario.MATHScenario.levels:
            instances = math_scenario.MATHScenario(subject, level, use_chain_of_thought=True).get_instances(str(work))
            evaluated = [i for i in instances if i.split == TEST_SPLIT]
            if not evaluated:
                continue
            spec = get_math_spec(subject, level, use_chain_of_thought="True").adapter_spec
            gen = adapter(GenerationAdapter, spec)
            shots = gen.sample_examples([i for i in instances if i.split == TRAIN_SPLIT], seed=0)
            states = [gen.generate_requests(inst, 0, shots)[0] for inst in evaluated]
            scores = [compute_reference_metrics(["math_equiv_chain_of_thought"], spec, with_result(states[0], c), None)
                      for c in completions]
            out[f"{subject}/Level {level}"] = {
                "prompts": [s.request.prompt for s in states], "max_tokens": spec.max_tokens,
                "stop": list(spec.stop_sequences), "gold": evaluated[0].references[0].output.text,
                "scores": [next(s.mean for s in stats if s.name.name == "math_equiv_chain_of_thought") for stats in scores]}
    return out


def questions(spec_args: dict) -> dict:
    """The fork's scenario split and HELM's joint multiple-choice prompts."""
    out = {}
    for task, q in spec_args.items():
        data = [{"input": i["text"], "label": i["label"]} for i in q["items"]]
        random.seed(0)
        random.shuffle(data)
        split_k = int(len(data) * q["train_share"])

        def instance(d, split):
            refs = [Reference(Output(text=a), tags=[CORRECT_TAG] if k == d["label"] else []) for k, a in enumerate(q["answers"])]
            return Instance(input=Input(text=d["input"]), references=refs, split=split)

        train = [instance(d, TRAIN_SPLIT) for d in data[:split_k]]
        valid = [instance(d, VALID_SPLIT) for d in data[split_k:]]
        spec = get_multiple_choice_adapter_spec(method="multiple_choice_joint", instructions=q["instructions"],
                                                input_noun=q["input_noun"], output_noun="Answer", max_tokens=1,
                                                max_train_instances=q["shots"])
        mc = adapter(MultipleChoiceJointAdapter, spec)
        shots = mc.sample_examples(train, seed=0, sample_train=spec.sample_train)
        out[task] = {"prompts": [mc.generate_requests(inst, 0, shots)[0].request.prompt for inst in valid],
                     "max_tokens": spec.max_tokens, "stop": list(spec.stop_sequences)}
    return out


def summaries(datasets: Path, completions: list[str]) -> dict:
    records = [json.loads(line) for line in
               (datasets / "dialogsum" / "DialogSum_Data" / "dialogsum.test.jsonl").read_text(encoding="utf-8").splitlines()]
    spec = get_summarization_adapter_spec(num_sents=1, max_tokens=128, temperature=0.3)
    instances = [Instance(input=Input(text=r["dialogue"]), split=VALID_SPLIT,
                          references=[Reference(Output(text=r[k]), tags=[CORRECT_TAG]) for k in ("summary1", "summary2", "summary3")])
                 for r in records]
    gen = adapter(GenerationAdapter, spec)
    prompts = [gen.generate_requests(inst, 0, [])[0].request.prompt for inst in instances]

    def remove_braces(text: str) -> str:  # SummarizationMetric._remove_braces
        if text.startswith("{"):
            text = text[1:]
        if text.endswith("}"):
            text = text[:-1]
        return text

    refs = [remove_braces(r.output.text) for r in instances[0].references]
    fns = {name: get_rouge_function(kind) for name, kind in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL"))}
    scores = [{name: float(np.max([fn(ref, remove_braces(c.strip())) for ref in refs])) for name, fn in fns.items()}
              for c in completions]
    return {"prompts": prompts, "max_tokens": spec.max_tokens, "stop": list(spec.stop_sequences), "scores": scores}


def main(datasets: Path, work: Path, out: Path, given: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    result = {"math": math(datasets, work, given["math_completions"]), "questions": questions(given["questions"]),
              "summaries": summaries(datasets, given["summary_completions"])}
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), json.loads(Path(sys.argv[4]).read_text()))
