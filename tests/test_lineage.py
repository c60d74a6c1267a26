"""Lineage and write-back on a real small pipeline, run as the quickstart runs it (the `onegpu` verbs,
offline W&B): data build -> fine-tune -> eval val -> eval helm -> submission pack.

Checks what the run files say, not what the code means to say: the fine-tune run names exactly the
dataset artifact (name + digest) that the data stage logged, in run.json and in its offline W&B
files; the evals name exactly the model artifact the fine-tune logged; the evals' scores land in
the fine-tune run's summary; and every key the W&B dashboard plots is one these runs logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from onegpu.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def _onegpu(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", ONEGPU_HELM_BIN=os.environ.get("ONEGPU_HELM_BIN", ""))
    proc = subprocess.run([sys.executable, "-m", "onegpu", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=900, env={k: v for k, v in env.items() if v})
    assert proc.returncode == 0, f"onegpu {' '.join(args)}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, shared_datasets, bundled_checkpoint) -> dict[str, Path]:
    """The quickstart's stages on a small mix: the quickstart's recipe and fine-tune config, fewer rows and steps."""
    from onegpu.eval.helm_env import helm_bin_dir

    helm_bin_dir()  # creates the HELM env on first use (the Makefile does it before tests)
    tmp = tmp_path_factory.mktemp("lineage")
    recipe = yaml.safe_load((REPO_ROOT / "data/recipes/quickstart.yaml").read_text())
    recipe.update(budget_tokens=1500, sources=[{"name": "dolly", "weight": 1}, {"name": "lima", "count": 1, "val_rows": 0}])
    (tmp / "mix.yaml").write_text(yaml.safe_dump(recipe))
    dirs = {name: tmp / name for name in ("data", "finetune", "eval-val", "eval-helm", "pack")}
    _onegpu("data", "build", str(tmp / "mix.yaml"), "--out", str(dirs["data"]))
    _onegpu("finetune", "--config", str(REPO_ROOT / "finetune/configs/cpu-quickstart.yaml"), "--data", str(dirs["data"]),
            "--checkpoint_dir", str(bundled_checkpoint), "--out_dir", str(dirs["finetune"]), "--max_steps", "2",
            "--eval_max_examples", "2", "--num_samples", "0", "--save_interval", "0", "--progress", "false",
            "--budget", "2h")  # the config's 4 minutes can run out on a loaded machine
    final = dirs["finetune"] / "final"
    _onegpu("eval", "val", "--checkpoint", str(final), "--tasks", "[onegpu_truthfulqa_mc1]", "--limit", "2",
            "--num_threads", "1", "--out", str(dirs["eval-val"]))
    _onegpu("eval", "helm", "--checkpoint", str(final), "--conf", "offline", "--max_eval_instances", "1",
            "--out", str(dirs["eval-helm"]))
    _onegpu("submission", "pack", "--model", str(final), "--out", str(dirs["pack"]), "--track", "rtx4090-24gb",
            "--verify", "false", "--zip", "false")
    return dirs


def _run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline W&B files (the protobuf stream `wandb sync` uploads).

    A ``.wandb`` file is a 7-byte header (``:W&B``, magic 0xBEE1, version) and LevelDB-log blocks of
    32 KiB: records of (crc32, length, type FULL/FIRST/MIDDLE/LAST) + a chunk of one ``Record``.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:  # a block's tail too short for a header is padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0:  # zero padding
                pos += left - 7 - length
                continue
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
    return records


def _wandb_config(records: list) -> dict:
    """The run config as the W&B files hold it: the run record's, then every later update."""
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in updates})
    return config


def _wandb_artifacts(records: list, type: str) -> list:
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == type]


def test_finetune_names_exactly_the_dataset_artifact_the_data_stage_logged(pipeline):
    [logged] = _run_json(pipeline["data"])["artifacts"]
    manifest = json.loads((pipeline["data"] / "manifest.json").read_text())
    assert logged["type"] == "dataset" and logged["digest"] == manifest["content_hash"]
    # in the data stage's offline W&B files: the artifact, under that name, with that digest
    [artifact] = _wandb_artifacts(_wandb_records(pipeline["data"]), "dataset")
    assert artifact.name == logged["name"] and json.loads(artifact.metadata)["digest"] == logged["digest"]

    [used] = _run_json(pipeline["finetune"])["lineage"]
    assert (used["artifact"], used["type"], used["digest"]) == (logged["name"], "dataset", logged["digest"])
    [in_wandb] = _wandb_config(_wandb_records(pipeline["finetune"]))["lineage"]
    assert (in_wandb["artifact"], in_wandb["digest"]) == (logged["name"], logged["digest"])
    model = json.loads((pipeline["finetune"] / "final" / "onegpu_model.json").read_text())
    assert (model["dataset_artifact"], model["dataset_digest"]) == (logged["name"], logged["digest"])


def test_evals_and_the_submission_name_exactly_the_model_artifact_the_finetune_logged(pipeline):
    [logged] = [a for a in _run_json(pipeline["finetune"])["artifacts"] if a["type"] == "model"]
    [artifact] = _wandb_artifacts(_wandb_records(pipeline["finetune"]), "model")
    assert artifact.name == logged["name"] and json.loads(artifact.metadata)["digest"] == logged["digest"]
    for stage in ("eval-val", "eval-helm"):
        [used] = _run_json(pipeline[stage])["lineage"]
        assert (used["artifact"], used["type"], used["digest"]) == (logged["name"], "model", logged["digest"]), stage
        [in_wandb] = _wandb_config(_wandb_records(pipeline[stage]))["lineage"]
        assert (in_wandb["artifact"], in_wandb["digest"]) == (logged["name"], logged["digest"]), stage
    packed = json.loads((pipeline["pack"] / "pack.json").read_text())["source"]["lineage"]
    assert (packed["artifact"], packed["digest"]) == (logged["name"], logged["digest"])


def test_eval_scores_are_written_back_to_the_finetune_run(pipeline):
    summary = json.loads((pipeline["finetune"] / "summary.json").read_text())
    val = json.loads((pipeline["eval-val"] / "results.json").read_text())
    helm = json.loads((pipeline["eval-helm"] / "results.json").read_text())
    assert summary["val/score"] == val["val_score"]
    assert summary["val/onegpu_truthfulqa_mc1"] == val["tasks"]["onegpu_truthfulqa_mc1"]["primary"]
    assert summary["test/score"] == helm["test_score"]
    assert summary["test/synthetic_reasoning"] == helm["scenarios"]["synthetic_reasoning"]["value"]
    assert summary["stopped_by"] == "max_steps"  # the training summary is kept, not replaced
    # the run table of `onegpu report` shows the scores with only the fine-tune dir given
    from onegpu.sweeps.report import load_runs, table_rows

    [row] = table_rows(load_runs([pipeline["finetune"]]))
    assert (row["val score"], row["test score"]) == (val["val_score"], helm["test_score"])
    # offline W&B: a segment with the fine-tune run's own id carries the scores (merged by `wandb sync`)
    wandb_id = _run_json(pipeline["finetune"])["wandb_id"]
    segments = list((pipeline["finetune"] / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(segments) == 3  # the training run, then one per eval
    summaries = {}
    for record in _wandb_records(pipeline["finetune"]):
        if record.WhichOneof("record_type") == "summary":
            summaries.update({item.key: json.loads(item.value_json) for item in record.summary.update})
    assert summaries["val/score"] == val["val_score"] and summaries["test/score"] == helm["test_score"]


def test_every_key_the_dashboard_plots_is_logged_by_the_runs(pipeline):
    import torch
    from onegpu.sweeps.dashboard import plotted_keys

    run_dir = pipeline["finetune"]
    logged = set(json.loads((run_dir / "summary.json").read_text()))
    for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        logged |= set(row)
    config = set(_run_json(run_dir)["config"])
    metrics, config_keys = plotted_keys()
    if not torch.cuda.is_available():  # CUDA memory is logged on CUDA only (peak RSS on the CPU)
        metrics = {k for k in metrics if not k.startswith("mem/cuda_")}
    assert metrics <= logged, sorted(metrics - logged)
    assert config_keys <= config, sorted(config_keys - config)
