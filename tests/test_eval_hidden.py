"""The hidden eval's validation tasks (eval/tasks/helm_hidden.py): prompts, requests and scores equal
crfm-helm's own code on the same local files (MATH through HELM's own scenario class; ETHICS and
Corr2Cause through HELM's joint adapter with the challenge fork's run-spec arguments; summaries through
HELM's summarisation adapter and ROUGE); the shipped suites; `eval val` on the bundled model; the test
proxy accepting the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from onegpu.data import hidden
from onegpu.eval.tasks import helm_hidden, offline_include_dir
from onegpu.eval.tasks.helm_metrics import get_answer, score_generation
from onegpu.paths import REPO_ROOT

# What a model may write after "Answer:" to a MATH problem, beside answers built from each gold solution.
MATH_COMPLETIONS = ["", "no box here", "\\boxed 5", "\\fbox{5}", "\\boxed{\\frac12}", "\\boxed{1/2}", "\\boxed{0.5}",
                    "\\boxed{.5}", "\\boxed{x = 5}", "\\boxed{5^\\circ}", "\\boxed{\\$5}", "\\boxed{5\\%}",
                    "\\boxed{5 \\text{ cm}}", "\\boxed{\\sqrt3}", "\\boxed{\\left(1,2\\right)}", "\\boxed{a/b}",
                    "\\boxed{\\frac}", "\\boxed{\\sqrt}", "The answer is \\boxed{5}.\n###", "\\boxed{5} and then \\boxed{6}"]


def _rows(include, task):
    return [json.loads(line) for line in (include / "data" / "helm" / f"{task}.jsonl").read_text().splitlines()]


def _request(include, task):
    return yaml.safe_load((include / f"{task}.yaml").read_text().replace("!function", ""))["generation_kwargs"]


def _math_completions(shared_datasets) -> list[str]:
    out = list(MATH_COMPLETIONS)
    for f in sorted((shared_datasets / "math" / "MATH" / "test").glob("*/*.json")):
        gold = json.loads(f.read_text())["solution"]
        answer = get_answer(gold)
        out += [gold, f"So the answer is $\\boxed{{{answer}}}$.", f"\\boxed{{ {answer} }}",
                f"\\boxed{{{answer.replace('frac', 'dfrac')}}}", f"\\boxed{{{answer}}}\n\nProblem: next"]
    return out


def _questions(shared_datasets) -> dict:
    files = helm_hidden.LocalFiles(shared_datasets)
    out = {}
    for key, q in hidden.QUESTIONS.items():
        subset = key.removeprefix("ethics_")
        items = hidden.ethics_items(subset, files.ethics(subset)) if key.startswith("ethics_") else \
            [{"text": r["input"], "label": r["label"]} for r in files.corr2cause()]
        out[key] = {"instructions": q.instructions, "input_noun": q.input_noun, "answers": list(q.answers),
                    "train_share": q.train_share, "shots": q.shots, "items": items}
    return out


@pytest.fixture(scope="module")
def reference(shared_datasets, tmp_path_factory):
    from onegpu.eval.helm_env import helm_bin_dir

    work = tmp_path_factory.mktemp("helm-hidden-ref")
    summaries = [r["summaries"][0] for r in hidden.read_dialogues(
        shared_datasets / "dialogsum" / "DialogSum_Data" / "dialogsum.test.jsonl")][:1]
    given = {"math_completions": _math_completions(shared_datasets), "questions": _questions(shared_datasets),
             "summary_completions": summaries + [summaries[0][:40], "{" + summaries[0] + "}", "", "Nothing alike.",
                                                 summaries[0].upper() + "\n###"]}
    (work / "in.json").write_text(json.dumps(given))
    proc = subprocess.run([str(helm_bin_dir() / "python"), str(REPO_ROOT / "tests" / "helm_hidden_reference.py"),
                           str(shared_datasets), str(work / "helm"), str(work / "out.json"), str(work / "in.json")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return given, json.loads((work / "out.json").read_text())


@pytest.mark.slow
def test_math_prompts_requests_and_scores_equal_helms(reference):
    given, ref = reference
    include = offline_include_dir()
    assert len(ref["math"]) >= 7
    for key, r in ref["math"].items():
        subject, level = key.split("/")
        task = f"onegpu_helm_math_{subject}"
        ours = [row for row in _rows(include, task) if row["level"] == level]
        assert [row["prompt"] for row in ours] == r["prompts"], key
        assert ours[0]["references"] == [r["gold"]]
        request = _request(include, task)
        assert request["max_gen_toks"] == r["max_tokens"] == 400 and request["until"] == r["stop"] == ["###"]
        for completion, helm_score in zip(given["math_completions"], r["scores"]):
            assert score_generation(completion, [r["gold"]], "math_equiv_chain_of_thought")[
                "math_equiv_chain_of_thought"] == helm_score, (key, completion)
    # the gold answers score 1 (some completions were right: not all-zero scoring), and a missing box fails
    assert all(sum(r["scores"]) >= 3 for r in ref["math"].values())
    assert score_generation("The answer is 5.", ["\\boxed{5}"], "math_equiv_chain_of_thought")["format_failure"] == 1.0


@pytest.mark.slow  # runs HELM (its own env)
def test_ethics_and_corr2cause_prompts_equal_helms(reference):
    _, ref = reference
    include = offline_include_dir()
    assert set(ref["questions"]) == set(hidden.QUESTIONS)
    for key, r in ref["questions"].items():
        task = f"onegpu_helm_{key}"
        rows = _rows(include, task)
        assert [row["prompt"] for row in rows] == r["prompts"], key
        request = _request(include, task)
        assert request["max_gen_toks"] == r["max_tokens"] == 1 and request["until"] == r["stop"] == ["\n"]
        assert all(row["target"] in "AB" and row["choices"] == list(hidden.QUESTIONS[key].answers) for row in rows)


@pytest.mark.slow  # runs HELM (its own env)
def test_summary_prompts_and_rouge_equal_helms(reference):
    given, ref = reference
    include = offline_include_dir()
    rows = _rows(include, "onegpu_helm_dialogsum")
    assert [row["prompt"] for row in rows] == ref["summaries"]["prompts"]
    assert rows[0]["prompt"].endswith("\n\nSummarize the above article in 1 sentence.") and len(rows[0]["references"]) == 3
    request = _request(include, "onegpu_helm_dialogsum")
    assert request["max_gen_toks"] == ref["summaries"]["max_tokens"] == 128 and request["until"] == ["###"]
    for completion, helm in zip(given["summary_completions"], ref["summaries"]["scores"]):
        ours = score_generation(completion, rows[0]["references"], "rouge_2")
        assert {k: ours[k] for k in helm} == pytest.approx(helm, abs=1e-12), completion
    assert ref["summaries"]["scores"][0]["rouge_2"] == 1.0  # a reference itself: not all-zero scoring


def test_hidden_suite_covers_every_group_and_feeds_the_proxy(shared_datasets):
    from onegpu.data.families import SCORE_GROUPS, task_family
    from onegpu.eval.harness import check_task_names, task_manager
    from onegpu.eval.validate import load_suite
    from onegpu.finetune.proxy import load_proxy_items

    for suite in ("helm-hidden", "hidden-offline"):
        names = [t["task"] for t in load_suite(suite)["tasks"]]
        assert {task_family(n) for n in names} == set(SCORE_GROUPS["hidden"]), suite
        manager, include = task_manager(names)
        check_task_names(names, manager, include)  # every task exists offline
    assert len([n for n in load_suite("helm-hidden")["tasks"] if "math_" in n["task"]]) == 7
    items = load_proxy_items("helm-hidden", 2)
    assert {i.metric for i in items} == {"exact_match", "math_equiv_chain_of_thought", "rouge_2"}
    assert {task_family(i.task) for i in items} == set(SCORE_GROUPS["hidden"])


@pytest.mark.slow
def test_hidden_suite_runs_offline_on_the_bundled_model(bundled_checkpoint, shared_datasets, tmp_path):
    out = tmp_path / "val"
    proc = subprocess.run([sys.executable, "-m", "onegpu", "eval", "val", "--checkpoint", str(bundled_checkpoint),
                           "--suite", "hidden-offline", "--num_threads", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    tasks = results["tasks"]
    assert tasks["onegpu_helm_dialogsum"]["primary_metric"] == "rouge_2,none"
    assert tasks["onegpu_helm_math_algebra"]["primary_metric"] == "math_equiv_chain_of_thought,none"
    assert tasks["onegpu_helm_ethics_justice"]["primary_metric"] == "exact_match,none"
    for name, task in tasks.items():
        assert 0.0 <= task["primary"] <= 1.0 and task["format_failures"] is not None, name
    # the summaries are real text scored against the references: ROUGE-2 from the generated words
    samples = [json.loads(line) for line in (out / "samples" / "onegpu_helm_dialogsum.jsonl").read_text().splitlines()]
    for s in samples:
        assert s["resps"][0][0].strip()
        expected = score_generation(s["resps"][0][0], s["doc"]["references"], "rouge_2")["rouge_2"]
        assert s["rouge_2"] == pytest.approx(expected)
    assert "onegpu_helm_corr2cause" in results["helm_gen"] and "onegpu_helm_math_algebra" not in results["helm_gen"]
    assert "math_equiv_chain_of_thought" in proc.stdout and "fmt fail" in proc.stdout
