"""kill -9 anywhere: each stage verb SIGKILLed at three or more points of its own progress, then re-run.

Per verb: one uninterrupted reference run; then the same command in a fresh dir, killed at each of
its kill points in turn (each re-run of the command is the next attempt, so the later points also
exercise a re-run that follows a kill), and run once more to its end. At each kill (tests/killing.py):

* no half-written file under a final name: every file a reader can see is whole (parses as its
  format) and every output of a deterministic stage is byte-identical to the reference's, or absent;
* no process the command started outlives it (the verify / HELM server, helm-run, sweep trials).

After the last run: it exits 0; its outputs equal the reference's (byte for byte where the stage is
deterministic, else the equivalence the test states); no temp file is left; and every re-run said
what it reused (a stage that resumes) or that it started over and why (one that does not).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import FAKE_SECRETS, exportable_tiny, secret_hits
from killing import KillPoint, assert_whole, frozen_at, onegpu, run, temps_left, visible_files

pytestmark = [pytest.mark.slow, pytest.mark.spread]  # each test its own run: any worker may take it


@dataclass
class Stage:
    cmd: list[str]  # run in the attempt's base dir (outputs given relative to it)
    out: str  # the output path, relative to the base dir
    points: list[KillPoint]
    reruns: list[str]  # per kill point, what the re-run after it says (regex over its output)
    outputs: list[str]  # globs under ``out``: byte-identical to the reference's (and, at a kill, or absent)
    varies: tuple[str, ...] = ()  # globs among those that the test compares itself (not byte for byte)
    skip: tuple[str, ...] = ()  # globs (under base) of files another program writes in place (HELM's)
    while_frozen: Callable[[Path, int], None] | None = None  # more checks at kill point i


@dataclass
class Killed:
    reference: Path  # the reference run's output
    out: Path  # the killed and re-run command's output
    attempts: list = field(default_factory=list)  # every attempt; the last one ran to its end


def kill_everywhere(stage: Stage, tmp_path: Path, reference: Path | None = None) -> Killed:
    """The reference run (unless given), the kills, the last run, and the checks above."""
    env = kit_env(tmp_path)
    if reference is None:
        ref_base = tmp_path / "reference"
        ref_base.mkdir()
        done = run(stage.cmd, ref_base, tmp_path / "reference.log", env)
        assert done.returncode == 0, done.output[-4000:]
        reference = ref_base / stage.out
    base = tmp_path / "killed"
    base.mkdir()
    attempts = []
    for i, point in enumerate(stage.points):
        with frozen_at(stage.cmd, base, point, tmp_path / f"attempt-{i}.log", env) as attempt:
            for path in visible_files(base, stage.skip):
                try:
                    assert_whole(path)
                    _same_if_output(stage, reference, base, path)
                except FileNotFoundError:  # removed since it was listed (by a child that runs on): not half of one
                    continue
            if stage.while_frozen is not None:
                stage.while_frozen(base, i)
        attempts.append(attempt)
    last = run(stage.cmd, base, tmp_path / "last.log", env)
    attempts.append(last)
    assert last.returncode == 0, last.output[-4000:]
    for i, (expected, attempt) in enumerate(zip(stage.reruns, attempts[1:], strict=True)):
        assert re.search(expected, attempt.output, re.S), (f"re-run after kill point {stage.points[i].name!r} "
                                                           f"does not say /{expected}/:\n{attempt.output[-3000:]}")
    out = base / stage.out
    for pattern in stage.outputs:
        ref_files = sorted(p.relative_to(reference) for p in reference.glob(pattern) if p.is_file())
        assert ref_files, f"the reference has no {pattern}"
        assert sorted(p.relative_to(out) for p in out.glob(pattern) if p.is_file()) == ref_files, pattern
        for rel in ref_files:
            if not any(rel.match(v) for v in stage.varies):
                assert (out / rel).read_bytes() == (reference / rel).read_bytes(), f"{rel} differs from the reference"
    left = temps_left(base)
    assert not left, f"temp files left after the last run: {left}"
    found = secret_hits(tmp_path)  # every run's files, logs, W&B's offline runs and staging copies
    assert found == [], f"a token of the environment was written down: {found}"
    return Killed(reference, out, attempts)


def kit_env(tmp_path: Path) -> dict[str, str]:
    """Every run's environment: fake credentials (searched for in all it writes afterwards: none may be
    there), and W&B's own dirs (staging copies, settings) inside ``tmp_path`` so the search covers them."""
    return {**os.environ, **{k: v for k, v in FAKE_SECRETS.items() if not k.startswith("-")},
            "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            **{f"WANDB_{d.upper()}_DIR": str(tmp_path / f"wandb-{d}") for d in ("data", "config", "cache")}}


def _same_if_output(stage: Stage, reference: Path, base: Path, path: Path) -> None:
    out = base / stage.out
    if out not in path.parents and path != out:
        return
    rel = path.relative_to(out)
    if (any(rel.match(pattern) for pattern in stage.outputs) and not any(rel.match(v) for v in stage.varies)
            and (reference / rel).is_file()):
        assert path.read_bytes() == (reference / rel).read_bytes(), f"{rel} is visible but not the reference's"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


STARTS_OVER = r"did not finish: killed .*; "
REMOVED = r"removed \S+: an interrupted run \(pid \d+\) left it half-written; it is written again from the start"


# ------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bundled_checkpoint, shared_datasets):
    """A random-init 2-layer model with the bundled tokenizer and a small real mix (fast steps)."""
    from onegpu.finetune.tiny import make_data_dir, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {"ckpt": make_tiny_checkpoint(root / "ckpt", bundled_checkpoint),
            "data": make_data_dir(root / "data", shared_datasets, n_train=24, n_val=8, max_seq_length=64)}


def _finetune_args(tiny, **extra) -> list[str]:
    args = {"data": tiny["data"], "checkpoint_dir": tiny["ckpt"], "micro_batch_size": 2, "global_batch_size": 2,
            "max_seq_length": 64, "learning_rate": 3e-3, "warmup_steps": 1, "num_threads": 1, "eval_interval": 0,
            "eval_max_examples": 8, "num_samples": 0, "progress": False, "save_interval_minutes": 0,
            "lora_head": True, **extra}
    return [x for k, v in args.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["_step"]: r["loss"] for r in rows if "loss" in r}  # a step logged again after a resume: the later row


# ------------------------------------------------------------------------------------ the verbs
def test_finetune(tiny, tmp_path):
    """Killed mid-training, while merging, and after final/ landed: --resume auto continues each time; the
    losses and the merged weights are the uninterrupted run's."""
    stage = Stage(
        cmd=onegpu("finetune", *_finetune_args(tiny, out_dir="ft", max_steps=8, save_interval=2, resume="auto")),
        out="ft",
        points=[KillPoint("mid-training, after a checkpoint", file="ft/checkpoints/step-000004/state.pt"),
                KillPoint("while merging final/", op="write", path=r"/\.final\.[^/]+\.tmp/hyperparameters\.yaml$"),
                KillPoint("after final/ landed, before the run's end", op="write", path=r"training_curves\.png\.")],
        reruns=[r"--resume auto: found \S+step-00000[4-8]", r"removed \S+\.final\.\S+\.tmp.*--resume auto: found \S+step-000008",
                r"--resume auto: found \S+step-000008"],
        outputs=["final/lit_model.pth", "final/lit_model.pth.lora", "final/model_config.yaml", "final/tokenizer*"],
    )
    killed = kill_everywhere(stage, tmp_path)
    assert _losses(killed.out) == pytest.approx(_losses(killed.reference), rel=1e-6)
    assert sorted(_losses(killed.out)) == list(range(1, 9))
    assert _json(killed.out / "summary.json")["budget_segments"] == 4


RECIPE = {
    "name": "killed", "seed": 3, "tokenizer": "bundled", "prompt_style": "alpaca", "max_seq_length": 256,
    "min_tokens": 8, "budget_tokens": 3000, "val_rows_per_source": 2, "languages": ["en"],
    "decontamination": {"eval_sets": ["mmlu", "truthfulqa", "gsm8k_test"]},
    "sources": [{"name": "dolly", "weight": 1}, {"name": "natural_instructions", "weight": 1, "tasks": ["task307"],
                                                  "max_per_task": 80}],
}


def test_data_build(tmp_path, shared_datasets, bundled_checkpoint):
    """Killed in the filters, between its outputs (every JSONL landed, the manifest not) and before its plot
    and W&B artifact: it builds again, byte-identical. While the manifest is missing, `onegpu finetune`
    refuses the dir instead of reading new rows under an old manifest."""
    from onegpu.errors import UserError
    from onegpu.finetune.config import load_data

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))

    def while_frozen(base: Path, i: int) -> None:
        if i == 1:  # train, val and rejects are new; the manifest was removed first and is not back yet
            assert (base / "mix" / "train.jsonl").is_file() and not (base / "mix" / "manifest.json").exists()
            with pytest.raises(UserError, match="has no manifest.json"):
                load_data(str(base / "mix"))

    stage = Stage(
        cmd=onegpu("data", "build", recipe, "--out", "mix", "--data_dir", shared_datasets),
        out="mix",
        points=[KillPoint("in the filters (decontamination)", op="read", path=r"/decontam/mmlu-.*/index\.npz$"),
                KillPoint("train/val/rejects landed, the manifest not", op="rename", path=r"/mix/manifest\.json$"),
                KillPoint("the manifest landed, the plot and W&B artifact not", op="write",
                          path=r"/mix/\.composition\.png\.")],
        reruns=[STARTS_OVER + "building again from the recipe: a data build does not resume"] * 3,
        outputs=["train.jsonl", "val.jsonl", "rejects.jsonl", "manifest.json", "composition.png"],
        while_frozen=while_frozen,
    )
    killed = kill_everywhere(stage, tmp_path)
    load_data(str(killed.out))  # the rebuilt dir is one a fine-tune reads


VAL_TASKS = "[onegpu_mmlu_philosophy, onegpu_truthfulqa_mc1, onegpu_bbq]"


def _val_cmd(checkpoint: Path) -> list[str]:
    return onegpu("eval", "val", "--checkpoint", checkpoint, "--tasks", VAL_TASKS, "--limit", "2", "--num_fewshot",
                  "0", "--num_threads", "1", "--out", "val")


@pytest.fixture(scope="module")
def val_reference(tmp_path_factory, bundled_checkpoint, shared_datasets) -> Path:
    base = tmp_path_factory.mktemp("val-reference")
    done = run(_val_cmd(bundled_checkpoint), base, base / "run.log", kit_env(base))
    assert done.returncode == 0, done.output[-4000:]
    return base / "val"


def _scores(results: dict) -> dict:
    return {name: {k: v for k, v in task.items() if k != "wall_s"} for name, task in results["tasks"].items()}


def test_eval_val(tmp_path, bundled_checkpoint, val_reference):
    """Killed while loading the model, with one task's result landed and another's about to, and before
    results.json: each re-run reuses the tasks that landed; the scores are the reference's."""
    stage = Stage(
        cmd=_val_cmd(bundled_checkpoint), out="val",
        points=[KillPoint("loading the model for the first task", line=r"\[1/3\] onegpu_mmlu_philosophy"),
                KillPoint("task 1 landed, task 2 about to", op="rename", path=r"/tasks/onegpu_truthfulqa_mc1\.json$"),
                KillPoint("every task landed, results.json not", op="rename", path=r"/val/results\.json$")],
        reruns=[STARTS_OVER + "the tasks it finished are reused",
                r"onegpu_mmlu_philosophy: done in an earlier run, reusing",
                r"(done in an earlier run, reusing.*){3}"],
        outputs=["samples/*.jsonl"],
    )
    killed = kill_everywhere(stage, tmp_path, reference=val_reference)
    assert _scores(_json(killed.out / "results.json")) == _scores(_json(val_reference / "results.json"))


def test_eval_helm(tmp_path, bundled_checkpoint, helm_offline_run):
    """Killed as helm-run starts, once helm-run wrote a run's stats (its other files maybe not yet), and
    before results.json: the server and helm-run die with it; a re-run redoes a run helm-run left
    unfinished and reuses the finished ones; the scores are the reference's."""
    reference, done = helm_offline_run  # the same command, once per session
    assert done.returncode == 0, done.stderr[-4000:]
    runs = "helm/helm/runs/onegpu"
    stage = Stage(
        cmd=onegpu("eval", "helm", "--checkpoint", bundled_checkpoint, "--conf", "offline", "--max_eval_instances",
                   "1", "--out", "helm"),
        out="helm",
        points=[KillPoint("helm-run starting against the ready server", line=r"server ready at http"),
                KillPoint("a HELM run's stats.json written", file=f"{runs}/*/stats.json"),
                KillPoint("HELM done, results.json about to land", op="rename", path=r"/helm/results\.json$")],
        reruns=[STARTS_OVER + "the HELM runs it finished are reused",
                r"(a HELM run an interrupted helm-run left unfinished|reusing 1 HELM run\(s\))",
                r"reusing 2 HELM run\(s\) an earlier, interrupted helm-run finished"],
        outputs=["helm_scenarios.table.json", "helm_runs.table.json"],
        skip=(f"{runs}/**/*", "helm/helm/prod_env/**/*"),  # helm-run's own files, written in place
    )
    killed = kill_everywhere(stage, tmp_path, reference=reference)

    def scores(out: Path) -> dict:  # every metric but how long inference took
        results = _json(out / "results.json")
        for run in results["runs"].values():
            run["metrics"] = {k: v for k, v in run["metrics"].items() if "runtime" not in k}
        return {k: results[k] for k in ("runs", "scenarios", "test_score")}

    assert scores(killed.out) == scores(killed.reference)


def test_eval_compare(tmp_path, val_reference):
    """Killed as its run opens (run.json about to land), before its plot and its results.json land, and
    before its W&B run ends: it compares again, byte-identical."""
    stage = Stage(
        cmd=onegpu("eval", "compare", val_reference, "--out", "compare"), out="compare",
        points=[KillPoint("its run just opened", op="rename", path=r"/compare/run\.json$"),
                KillPoint("the plot about to land", op="rename", path=r"/compare/val_vs_test\.png$"),
                KillPoint("results.json about to land", op="rename", path=r"/compare/results\.json$"),
                KillPoint("before its W&B run ends", op="rename", path=r"/compare/summary\.json$")],
        reruns=[REMOVED, *[STARTS_OVER + "comparing again: compare does not resume"] * 3],
        outputs=["results.json", "val_vs_test.png", "compare.table.json"],
    )
    kill_everywhere(stage, tmp_path)


SWEEP = {
    "name": "killed", "program": "onegpu", "method": "grid", "metric": {"name": "val_loss", "goal": "minimize"},
    "parameters": {"learning_rate": {"values": [1e-2, 3e-3]}},
    "command": ["${env}", "${interpreter}", "-m", "onegpu", "finetune", "${args}"],
}


def test_sweep(tiny, tmp_path):
    """Killed during trial 0 and during trial 1 (each trial, SIGTERMed by the kernel, saves a checkpoint and
    stops) and before the sweep's summary lands: finished trials are kept, interrupted ones continue from
    their checkpoint; every trial's losses and metric are the uninterrupted sweep's."""
    flags = _finetune_args(tiny, max_steps=6, save_interval=2, eval_interval=3)
    constants = {flag[2:]: {"value": value} for flag, value in zip(flags[::2], flags[1::2]) if flag != "--learning_rate"}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SWEEP, "parameters": {**SWEEP["parameters"], **constants}}))
    kept = r"resuming from \S+sweep_state\.json: "
    stage = Stage(
        cmd=onegpu("sweep", config, "--out", "sweep"), out="sweep",
        points=[KillPoint("during trial 0", file="sweep/trial-000/checkpoints/step-000002/state.pt"),
                KillPoint("during trial 1", file="sweep/trial-001/checkpoints/step-000002/state.pt"),
                KillPoint("every trial done, the summary not", op="rename", path=r"/sweep/sweep_summary\.json$")],
        reruns=[kept + r"0 trial\(s\) done and kept; interrupted, they continue from their last checkpoint "
                       r"\(--resume=auto\): trial-000",
                kept + r"1 trial\(s\) done and kept \(trial-000\); interrupted, .*: trial-001",
                kept + r"2 trial\(s\) done and kept \(trial-000, trial-001\)"],
        outputs=["trial-*/final/lit_model.pth.lora"],
    )
    killed = kill_everywhere(stage, tmp_path)

    def rows(out: Path) -> list:
        return [row[:-2] for row in _json(out / "sweep_summary.json")["rows"]]  # but seconds and note

    assert rows(killed.out) == rows(killed.reference)
    assert [r[1] for r in rows(killed.out)] == ["finished", "finished"]
    for trial in ("trial-000", "trial-001"):
        assert _losses(killed.out / trial) == pytest.approx(_losses(killed.reference / trial), rel=1e-6)


def test_submission_pack(tiny, tmp_path):
    """Killed while copying the weights into the folder, while its server answers the health request, and
    with the folder landed but its zip not: the folder is packed again (or, once whole, reused) and is the
    reference's byte for byte, but for the sampled text of the health probe in pack.json."""
    stage = Stage(
        cmd=onegpu("submission", "pack", "--model", tiny["ckpt"], "--track", "rtx4090-24gb", "--out", "sub",
                   "--max_batch_size", "2", "--max_seq_length", "128", "--prefix_cache_mb", "8"),
        out="sub",
        points=[KillPoint("copying the weights in", op="write", path=r"/\.sub\.[^/]+\.tmp/model/lit_model\.pth$"),
                KillPoint("its verify server running", process=r"onegpu serve --config"),
                KillPoint("the folder landed, the zip about to", op="rename", path=r"/sub\.zip$")],
        reruns=[REMOVED, REMOVED, r"already holds this pack .*reusing it"],
        outputs=["**/*"], varies=("pack.json",),
    )
    killed = kill_everywhere(stage, tmp_path)

    def pack_json(text: bytes) -> dict:  # the health probe samples (temperature 0.8, no seed): its text varies
        doc = json.loads(text)
        return {**doc, "verify": {k: v for k, v in doc["verify"].items() if k not in ("text", "n_tokens")}}

    assert pack_json((killed.out / "pack.json").read_bytes()) == pack_json((killed.reference / "pack.json").read_bytes())
    archives = [zipfile.ZipFile(path.with_name("sub.zip")) for path in (killed.reference, killed.out)]
    assert sorted(archives[0].namelist()) == sorted(archives[1].namelist())
    for name in archives[0].namelist():
        same = pack_json if name.endswith("/pack.json") else bytes
        assert same(archives[0].read(name)) == same(archives[1].read(name)), name


def test_model_push_dry_run(tmp_path, bundled_checkpoint):
    """Killed in the HF export, before the model card and as the folder is about to land: written again
    from the start, byte-identical."""
    checkpoint = exportable_tiny(tmp_path / "exportable", bundled_checkpoint)
    stage = Stage(
        cmd=onegpu("model", "push", checkpoint, "--repo", "team/tiny-test", "--dry_run", "push"),
        out="push",
        points=[KillPoint("in the HF export", op="rmtree", path=r"\.litgpt-export$"),
                KillPoint("the weights written, the card not", op="write", path=r"/\.push\.[^/]+\.tmp/README\.md$"),
                KillPoint("the folder about to land", op="rename", path=r"/push$")],
        reruns=[REMOVED] * 3,
        outputs=["*"],
    )
    kill_everywhere(stage, tmp_path)


def test_model_prepare(tmp_path, bundled_checkpoint):
    """Killed with the GGUF de-quantized, with the checkpoint converted but not moved, and verified but not
    landed: converted again from the start, byte-identical to the session's bundled checkpoint."""
    stage = Stage(
        cmd=onegpu("model", "prepare", "--checkpoint_dir", "ckpt"), out="ckpt",
        points=[KillPoint("the GGUF de-quantized", op="write", path=r"/\.ckpt-hf\.[^/]+\.tmp/hf/tokenizer_config\.json$"),
                KillPoint("converted, not yet moved", op="rename", path=r"/\.ckpt\.[^/]+\.tmp/lit_model\.pth$"),
                KillPoint("verified, about to land", op="rename", path=r"/ckpt$")],
        reruns=[REMOVED] * 3,
        outputs=["*"],
    )
    kill_everywhere(stage, tmp_path, reference=bundled_checkpoint)


@pytest.fixture
def parent_wandb_service():
    """This process's W&B service, its address in WANDB_SERVICE as wandb leaves it after a run in a
    notebook or script: every command started from here inherits it."""
    import wandb

    wandb.setup()
    assert os.environ.get("WANDB_SERVICE")
    yield
    wandb.teardown()


def test_a_crash_without_a_resume_shows_in_the_report_and_in_wandb(tiny, tmp_path, parent_wandb_service):
    """A fine-tune SIGKILLed and never resumed: `onegpu report` and its W&B run show how far it got and
    that it crashed, instead of a run that stays "running" forever; also when it was started from a
    process with a W&B service of its own (the stage's stream must not stay open in the parent's)."""
    from conftest import wandb_records
    from onegpu.contracts import RunDir

    base = tmp_path / "crash"
    base.mkdir()
    cmd = onegpu("finetune", *_finetune_args(tiny, out_dir="ft", max_steps=40, save_interval=4))
    env = kit_env(tmp_path)
    with frozen_at(cmd, base, KillPoint("after a checkpoint", file="ft/checkpoints/step-000004/state.pt"),
                   tmp_path / "killed.log", env):
        assert RunDir.load(base / "ft").status().state == "running"  # alive, only stopped
    status = RunDir.load(base / "ft").status()
    assert status.state == "crashed" and 4 <= status.last_step < 40 and status.total_steps == 40

    report = run(onegpu("report", "ft", "--out", "report"), base, tmp_path / "report.log", env)
    assert report.returncode == 0, report.output[-3000:]
    assert f"the finetune run was killed after step {status.last_step} of 40" in report.output
    (row,) = _json(base / "report" / "report.json")["runs"]
    assert row["status"] == f"crashed after step {status.last_step} of 40"
    assert row["steps"] == status.last_step and row["stopped by"] == "crash"
    summary = _json(base / "ft" / "summary.json")
    assert summary["state"] == "crashed" and summary["last_step"] == status.last_step

    # W&B: a closing segment of the same run carries the crash and ends with exit code 1 (failed, not running)
    run_id = _json(base / "ft" / "run.json")["wandb_id"]
    segments = sorted((base / "ft" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2
    # the closing segment is the one that ends with an exit record (the killed segment's own file may not
    # have been written yet when the kill came, on a busy machine)
    (records,) = [records for segment in segments if (segment / f"run-{run_id}.wandb").is_file()
                  for records in [wandb_records(segment / f"run-{run_id}.wandb")]
                  if any(r.WhichOneof("record_type") == "exit" for r in records)]
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds and records[kinds.index("exit")].exit.exit_code == 1
    summary_items = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary"
                     for item in r.summary.update}
    assert summary_items["state"] == "crashed" and summary_items["last_step"] == status.last_step
    again = run(onegpu("report", "ft", "--out", "report"), base, tmp_path / "again.log", env)
    assert again.returncode == 0 and "marked crashed" not in again.output  # recorded once
    assert len(list((base / "ft" / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert secret_hits(tmp_path) == []


def test_a_second_run_in_a_dir_another_run_still_writes_to_is_warned(tmp_path, capfd, monkeypatch):
    from onegpu.tracking import Run

    monkeypatch.setenv("WANDB_MODE", "disabled")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from onegpu.tracking import Run; "
                               f"Run('data', {str(tmp_path)!r}, {{}}); print('open', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        assert holder.stdout.readline().strip() == "open"
        Run("data", tmp_path, {}).finish()
    finally:
        holder.kill()
        holder.wait()
    assert f"a data run (pid {holder.pid}) is still writing to {tmp_path}" in capfd.readouterr().err
