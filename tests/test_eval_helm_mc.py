"""HELM-faithful multiple choice (eval/tasks/helm_mc.py): prompts, requests and scores equal crfm-helm's
own (its scenarios, run specs, adapter and metric code, run in the HELM env on the same local files);
the small seeded suite for callers outside lm-eval; and, on a real fine-tune of the bundled model, a
broken answer template that the HELM-faithful score catches and the likelihood score does not."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from onegpu.eval.tasks import helm_mc, items as helm_items, offline_include_dir
from onegpu.paths import REPO_ROOT

# What a fine-tuned model may answer to "...Answer:" when C is correct.
COMPLETIONS = ["C", " C", "C.", "c", "The answer is C.", "", "\n", "A", "E", " C\n", "(C)", "C) necessary"]


def _rows(include: Path, task: str) -> list[dict]:
    path = include / "data" / "helm" / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _request(include: Path, task: str) -> dict:
    return yaml.safe_load((include / f"{task}.yaml").read_text().replace("!function", ""))["generation_kwargs"]


@pytest.fixture(scope="module")
def helm_reference(shared_datasets, tmp_path_factory):
    from onegpu.eval.helm_env import helm_bin_dir

    work = tmp_path_factory.mktemp("helm-ref")
    out = work / "reference.json"
    proc = subprocess.run([str(helm_bin_dir() / "python"), str(REPO_ROOT / "tests" / "helm_mc_reference.py"),
                           str(shared_datasets), str(work / "helm"), str(out), json.dumps(COMPLETIONS)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("family,task", [("mmlu", "onegpu_helm_mmlu_philosophy"),
                                         ("truthfulqa", "onegpu_helm_truthfulqa_mc1"),
                                         ("bigbench", "onegpu_helm_bigbench_emoji_movie")])
@pytest.mark.slow
def test_task_prompts_requests_and_scores_equal_helms(helm_reference, family, task):
    include = offline_include_dir()
    ref = helm_reference[family]
    rows = _rows(include, task)
    assert [r["prompt"] for r in rows[:len(ref["prompts"])]] == ref["prompts"]
    request = _request(include, task)
    assert request["max_gen_toks"] == ref["max_tokens"] and request["until"] == ref["stop"]
    first = rows[0]
    for completion, helm_scores in zip(COMPLETIONS, ref["scores"]):
        ours = helm_mc.score_completion(completion, first["choices"], first["correct"])
        assert ours["exact_match"] == helm_scores["exact_match"], completion
        assert ours["quasi_exact_match"] == helm_scores["quasi_exact_match"], completion
        # a format failure is an answer HELM cannot map to an option at all
        assert ours["format_failure"] == float(completion.strip() not in list(helm_mc.LETTERS[:len(first["choices"])]))
    assert sum(s["exact_match"] for s in ref["scores"]) >= 1  # some answer was right: not all-zero scoring


@pytest.mark.slow  # runs HELM (its own env)
def test_bbq_prompts_equal_helms(helm_reference, shared_datasets):
    # HELM's subject=all needs two category files the local copy lacks; subject=Age checks the format
    records = [json.loads(line) for line in (shared_datasets / "bbq" / "data" / "Age.jsonl").read_text().splitlines()]
    train, evaluated = helm_mc.bbq_instances(records)
    fmt = helm_mc.bbq_format()
    shots = helm_mc.sample_train(train, fmt.max_train_instances)
    ours = [helm_mc.build_prompt(fmt, shots, inst) for inst in evaluated[:3]]
    assert ours == helm_reference["bbq"]["prompts"]


def test_small_seeded_suite_for_callers(shared_datasets):
    items = helm_items.helm_mc_items(per_task=3, seed=7)
    assert items == helm_items.helm_mc_items(per_task=3, seed=7)  # fixed: same items every call
    assert items != helm_items.helm_mc_items(per_task=3, seed=8)
    assert [i.task for i in items] == [t for t in helm_items.DEFAULT_ITEM_TASKS for _ in range(3)]
    include = offline_include_dir()
    for item in items:
        row = _rows(include, item.task)[item.doc_id]
        assert item.prompt == row["prompt"] and list(item.correct) == row["correct"]
        assert item.prompt.endswith("Answer:")
    mmlu = [i for i in items if "mmlu" in i.task]
    assert all(i.max_tokens == 1 and i.stop == ("\n",) for i in mmlu)
    assert all(i.max_tokens == 64 and i.stop == () for i in items if "bigbench" in i.task)
    # scored as the lm-eval tasks score: the right letter, a wrong letter, a preamble
    completions = [helm_mc.LETTERS[i.correct[0]] if k % 3 == 0 else "A" if k % 3 == 1 else "The answer is A."
                   for k, i in enumerate(items)]
    report = helm_items.score_items(items, completions)
    assert report["format_failures"] == len(items) // 3
    for r in report["tasks"].values():
        assert r["n"] == 3 and r["format_failures"] == 1
        assert 1 / 3 <= r["exact_match"] <= 2 / 3  # the right letter, and "A" when A is right
    with pytest.raises(Exception, match="unknown HELM-faithful task"):
        helm_items.helm_mc_items(["onegpu_mmlu_philosophy"])


# ------------------------------------------------------------------------------------ broken template
SUBJECT = "high_school_geography"  # short questions: cheap 5-shot prompts


def _qasc_rows(datasets: Path, n: int, preamble: bool) -> list[dict]:
    """QASC (FLAN CoT train file, 8 lettered options) as HELM-style MC instructions with a letter answer."""
    from onegpu.data.rows import make_row

    rows = []
    with open(datasets / "flan_cot_samples" / "qasc_train.tsv", encoding="utf-8") as fh:
        for question, answer, _rationale in csv.reader(fh, delimiter="\t"):
            stem, _, options = question.replace("\\n", "\n").partition("\nOptions:\n")
            choices = [o.split(") ", 1)[1] for o in options.splitlines() if ") " in o][:4]
            letter = answer.strip("()")
            if len(choices) < 4 or letter not in "ABCD":
                continue
            prompt = (f"The following are multiple choice questions (with answers).\n\nQuestion: {stem}\n"
                      + "".join(f"{helm_mc.LETTERS[i]}. {c}\n" for i, c in enumerate(choices)) + "Answer:")
            rows.append(make_row("qasc", prompt, f"The answer is {letter}." if preamble else letter,
                                 license="Apache-2.0", provenance="human"))
            if len(rows) == n:
                return rows
    return rows


def _data_dir(out: Path, rows: list[dict]) -> Path:
    out.mkdir(parents=True)
    for name, part in (("train", rows[4:]), ("val", rows[:4])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (out / "manifest.json").write_text(json.dumps({"name": "qasc-preamble", "prompt_style": "smollm2",
                                                   "max_seq_length": 256, "recipe_hash": "qasc-preamble"}))
    return out


def _onegpu(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "onegpu", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=timeout, env=env)


def _validate(checkpoint: Path, out: Path) -> dict:
    proc = _onegpu("eval", "val", "--checkpoint", str(checkpoint), "--out", str(out), "--num_threads", "2",
                   "--tasks", f"[onegpu_mmlu_{SUBJECT}, onegpu_helm_mmlu_{SUBJECT}]", "--limit", "16",
                   "--num_fewshot", "0", "--batch_size", "16", "--log_samples", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "helm EM" in proc.stdout and "fmt fail" in proc.stdout
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_broken_answer_template_drops_helm_score_not_likelihood(bundled_checkpoint, shared_datasets, tmp_path):
    # A fine-tune whose responses start with a preamble ("The answer is B.") ranks the options by likelihood
    # at least as well as before, but its generated answer is no longer a letter: HELM scores it zero.
    data = _data_dir(tmp_path / "data", _qasc_rows(shared_datasets, 28, preamble=True))
    ft = _onegpu("finetune", "--data", str(data), "--out_dir", str(tmp_path / "ft"), "--max_steps", "6",
                 "--micro_batch_size", "4", "--global_batch_size", "4", "--learning_rate", "3e-3",
                 "--warmup_steps", "0", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0",
                 "--packing", "false", "--eval_interval", "0", "--num_samples", "0", "--save_interval", "0",
                 "--precision", "32-true", "--num_threads", "2", "--budget", "20m")
    assert ft.returncode == 0, ft.stderr[-3000:]
    base = _validate(bundled_checkpoint, tmp_path / "val-base")
    broken = _validate(tmp_path / "ft" / "final", tmp_path / "val-broken")

    task, twin = f"onegpu_helm_mmlu_{SUBJECT}", f"onegpu_mmlu_{SUBJECT}"
    b, k = base["helm_gen"][task], broken["helm_gen"][task]
    assert b["likelihood_task"] == k["likelihood_task"] == twin and b["n"] == k["n"] == 16
    # the generation score falls and the answers stop being letters ...
    assert b["format_failures"] <= 4 and k["format_failures"] >= 12, (b, k)
    assert k["exact_match"] < b["exact_match"], (b, k)
    assert broken["format_failures"] == k["format_failures"] and broken["helm_gen_score"] == k["exact_match"]
    # ... while the likelihood score does not fall (the fine-tune did learn multiple choice; measured
    # on the bundled model: likelihood 0.375 -> 0.4375, HELM EM 0.125 -> 0, format failures 0 -> 15 of 16)
    assert k["likelihood"] >= b["likelihood"] - 2 / 16, (b, k)
    assert broken["tasks"][task]["format_failures"] == k["format_failures"]
