"""Run inside the HELM env (crfm-helm): HELM's own scenarios, run specs, adapter and metrics on the
local dataset copies, for tests/test_eval_helm_mc.py to compare onegpu's HELM-faithful tasks with.

    python helm_mc_reference.py DATASETS_DIR WORK_DIR OUT.json COMPLETIONS_JSON

For each family (MMLU philosophy, TruthfulQA mc_single, BBQ Age, BIG-bench emoji_movie) it writes the
first eval prompts HELM builds, the request's max_tokens and stop sequences, and HELM's
exact_match / quasi_exact_match of each given completion on the first eval instance.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

from helm.benchmark.adaptation.adapters.multiple_choice_joint_adapter import MultipleChoiceJointAdapter
from helm.benchmark.adaptation.request_state import RequestState
from helm.benchmark.metrics.evaluate_reference_metrics import compute_reference_metrics
from helm.benchmark.run_specs.classic_run_specs import get_bbq_spec, get_big_bench_spec, get_truthful_qa_spec
from helm.benchmark.run_specs.lite_run_specs import get_mmlu_spec
from helm.benchmark.runner import set_benchmark_output_path
from helm.benchmark.scenarios.bbq_scenario import BBQScenario
from helm.benchmark.scenarios.big_bench_scenario import BIGBenchScenario
from helm.benchmark.scenarios.mmlu_scenario import MMLUScenario
from helm.benchmark.scenarios.scenario import TEST_SPLIT, TRAIN_SPLIT, VALID_SPLIT
from helm.benchmark.scenarios.truthful_qa_scenario import TruthfulQAScenario
from helm.common.request import GeneratedOutput, RequestResult

N_PROMPTS = 3


class WholeWindow:
    """Every prompt fits: the comparison is about the prompt text, not a tokenizer's window."""

    def fits_within_context_window(self, text: str, expected_completion_token_length: int = 0) -> bool:
        return True


def adapter_for(spec) -> MultipleChoiceJointAdapter:
    adapter = MultipleChoiceJointAdapter.__new__(MultipleChoiceJointAdapter)
    adapter.adapter_spec = spec
    adapter.window_service = WholeWindow()
    return adapter


def run(spec, instances, eval_split: str, completions: list[str]) -> dict:
    adapter = adapter_for(spec)
    train = [i for i in instances if i.split == TRAIN_SPLIT]
    shots = adapter.sample_examples(train, seed=0, sample_train=spec.sample_train)
    evaluated = [i for i in instances if i.split == eval_split]
    states = [adapter.generate_requests(inst, 0, shots)[0] for inst in evaluated[:N_PROMPTS]]
    scores = []
    for text in completions:
        result = RequestResult(success=True, embedding=[], completions=[GeneratedOutput(text=text, logprob=0.0, tokens=[])],
                               cached=False)
        state = RequestState(**{**states[0].__dict__, "result": result})
        stats = compute_reference_metrics(["exact_match", "quasi_exact_match"], spec, state, None)
        scores.append({s.name.name: s.mean for s in stats if s.name.name != "max_prob"})
    return {"prompts": [s.request.prompt for s in states], "max_tokens": spec.max_tokens,
            "stop": list(spec.stop_sequences), "scores": scores}


def main(datasets: Path, work: Path, out: Path, completions: list[str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    families = {}

    subject = "philosophy"
    for split in ("dev", "test"):  # HELM reads data.tar's header-less CSVs with a letter answer
        target = work / "mmlu" / "data" / split / f"{subject}_{split}.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(datasets / "mmlu" / split / f"{subject}_{split}.csv", newline="", encoding="utf-8") as src, \
                open(target, "w", newline="", encoding="utf-8") as dst:
            writer = csv.writer(dst)
            for r in csv.DictReader(src):
                writer.writerow([r["question"], *[r[f"choice{i}"] for i in range(4)], "ABCD"[int(r["answer"])]])
    families["mmlu"] = run(get_mmlu_spec(subject).adapter_spec,
                           MMLUScenario(subject).get_instances(str(work / "mmlu")), TEST_SPLIT, completions)

    (work / "tqa" / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(datasets / "truthfulqa" / "data" / "v1" / "TruthfulQA.csv", work / "tqa" / "data" / "TruthfulQA.csv")
    families["truthfulqa"] = run(get_truthful_qa_spec("mc_single").adapter_spec,
                                 TruthfulQAScenario("mc_single").get_instances(str(work / "tqa")), VALID_SPLIT,
                                 completions)

    (work / "bbq" / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(datasets / "bbq" / "data" / "Age.jsonl", work / "bbq" / "data" / "Age")
    families["bbq"] = run(get_bbq_spec("Age").adapter_spec, BBQScenario("Age").get_instances(str(work / "bbq")),
                          TEST_SPLIT, completions)

    set_benchmark_output_path(str(work / "benchmark_output"))
    cache = work / "benchmark_output" / "scenarios" / "big_bench" / "emoji_movie"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(datasets / "bigbench" / "emoji_movie" / "task.json", cache / "task.json")
    spec = get_big_bench_spec("emoji_movie", "").adapter_spec
    spec = spec.__class__(**{**spec.__dict__, "max_train_instances": 3})  # the organizers' conf: 3 shots
    families["bigbench"] = run(spec, BIGBenchScenario("emoji_movie", "").get_instances(str(cache.parent)),
                               TEST_SPLIT, completions)
    out.write_text(json.dumps(families, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]))
