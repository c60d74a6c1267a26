"""`onegpu eval val` end to end on the bundled model with the offline suite, resume, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from onegpu.paths import REPO_ROOT

pytestmark = pytest.mark.slow
MC_TASKS = {"onegpu_mmlu_philosophy", "onegpu_truthfulqa_mc1", "onegpu_bbq", "onegpu_bigbench_emoji_movie"}
HELM_TASKS = {"onegpu_helm_" + t[len("onegpu_"):] for t in MC_TASKS}
OFFLINE_TASKS = MC_TASKS | HELM_TASKS | {"onegpu_gsm8k"}


def _onegpu(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "onegpu", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=timeout, env=env)


def test_offline_suite_on_bundled_model_then_resume(bundled_checkpoint, shared_datasets, tmp_path):
    out = tmp_path / "val"
    proc = _onegpu("eval", "val", "--checkpoint", str(bundled_checkpoint), "--suite", "offline", "--limit", "2",
                   "--num_threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == OFFLINE_TASKS
    for name, task in results["tasks"].items():
        assert task["n"] == 2, name
        assert 0.0 <= task["primary"] <= 1.0, name
    assert results["tasks"]["onegpu_gsm8k"]["primary_metric"] == "exact_match,flexible-extract"
    assert results["val_score"] == pytest.approx(
        sum(t["primary"] for t in results["tasks"].values()) / len(OFFLINE_TASKS))
    # each HELM-faithful twin is reported beside the likelihood score of the task it mirrors
    assert set(results["helm_gen"]) == HELM_TASKS
    for name, gen in results["helm_gen"].items():
        task = results["tasks"][name]
        assert gen["likelihood_task"] == "onegpu_" + name[len("onegpu_helm_"):]
        assert gen["likelihood"] == results["tasks"][gen["likelihood_task"]]["primary"]
        assert task["primary_metric"] == "exact_match,none" and gen["exact_match"] == task["primary"]
        assert gen["format_failures"] == task["format_failures"] == round(task["metrics"]["format_failure,none"] * 2)
    assert results["format_failures"] == sum(g["format_failures"] for g in results["helm_gen"].values())
    assert results["helm_gen_score"] == pytest.approx(sum(g["exact_match"] for g in results["helm_gen"].values()) / 4)
    samples = [json.loads(line) for line in (out / "samples" / "onegpu_helm_mmlu_philosophy.jsonl").read_text().splitlines()]
    assert all(s["arguments"][0][0].endswith("Answer:") for s in samples)  # HELM's prompt, as sent
    # the per-task summary table is printed, samples are kept, tracking files exist
    assert "val_score (mean)" in proc.stdout and "onegpu_bbq" in proc.stdout and "fmt fail" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format_failures"] == results["format_failures"]
    assert summary["val/onegpu_helm_bbq/format_failures"] == results["helm_gen"]["onegpu_helm_bbq"]["format_failures"]
    samples = [json.loads(line) for line in (out / "samples" / "onegpu_gsm8k.jsonl").read_text().splitlines()]
    assert {s["doc_id"] for s in samples} == {0, 1}  # one row per doc and filter (strict, flexible)
    assert all(s["resps"][0][0].strip() for s in samples)
    run = json.loads((out / "run.json").read_text())
    assert run["lineage"][0]["type"] == "model" and run["lineage"][0]["path"] == str(bundled_checkpoint)
    assert (out / "summary.json").is_file() and list((out / "wandb").glob("offline-run-*"))

    # same command again: every task is reused from tasks/*.json, the model is not even loaded
    again = _onegpu("eval", "val", "--checkpoint", str(bundled_checkpoint), "--suite", "offline", "--limit", "2",
                    "--num_threads", "1", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done in an earlier run") == len(OFFLINE_TASKS)
    assert json.loads((out / "results.json").read_text())["tasks"] == results["tasks"]


def test_bad_input_is_a_clear_error(shared_datasets, tmp_path):
    # Input is validated before any model is loaded: a dir that merely looks like a checkpoint will do.
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for name in ("lit_model.pth", "model_config.yaml", "tokenizer.json"):
        (checkpoint / name).write_text("")
    missing = _onegpu("eval", "val", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "fix:" in missing.stderr

    suite = _onegpu("eval", "val", "--checkpoint", str(checkpoint), "--suite", "no-such-suite",
                    "--out", str(tmp_path / "o"))
    assert suite.returncode == 2
    assert "unknown suite" in suite.stderr and "offline" in suite.stderr and "helm-open" in suite.stderr

    task = _onegpu("eval", "val", "--checkpoint", str(checkpoint), "--tasks", "[onegpu_gsm8kk]",
                   "--out", str(tmp_path / "o"))
    assert task.returncode == 2
    assert "unknown lm-eval task" in task.stderr and "onegpu_gsm8k" in task.stderr  # the did-you-mean hint
    assert not (tmp_path / "o" / "results.json").exists()
