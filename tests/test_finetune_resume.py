"""Exact resume after SIGKILL, the budget clock stopping a run, the LR schedule anchored to the budget,
and bad configs failing before model load.

Uses a random-init 2-layer litgpt model with the bundled tokenizer (fast steps) on real Dolly /
Self-Instruct / LIMA rows from ../shared/datasets.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wandb_records
from onegpu.finetune.tiny import make_data_dir, make_tiny_checkpoint
from onegpu.errors import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bundled_checkpoint, shared_datasets):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "ckpt": make_tiny_checkpoint(root / "tiny-ckpt", bundled_checkpoint),
        "data": make_data_dir(root / "data", shared_datasets, max_seq_length=128),
    }


def _args(tiny, out: Path, **extra) -> list[str]:
    args = {"data": tiny["data"], "checkpoint_dir": tiny["ckpt"], "out_dir": out, "micro_batch_size": 2,
            "global_batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 2, "num_threads": 1, "eval_interval": 0,
            "num_samples": 0, "progress": False, "lora_mlp": True, "save_interval_minutes": 0, **extra}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def _metric(out: Path, key: str) -> dict[int, float]:
    """{step: value} of one logged metric (later lines, after a resume, win)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["_step"]: row[key] for row in rows if key in row}


def _losses(out: Path) -> dict[int, float]:
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["_step"]] = row["loss"]  # later lines (after a resume) win
    return losses


def _env():
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _wait_for(condition, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    assert condition(), "timed out"


def _segments(out: Path) -> list[dict]:
    from onegpu.budget import HEARTBEAT_FILE
    from onegpu.contracts import read_json

    return read_json(out / HEARTBEAT_FILE).get("segments", [])


def _wandb_history(out: Path, run_id: str) -> dict[int, dict]:
    """{step: logged values} from the offline W&B run ``run_id`` in ``out/wandb``."""
    (path,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history: dict[int, dict] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
    return history


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_uninterrupted_run(tiny, tmp_path):
    """Killed after a checkpoint, killed again before the next one, resumed: the losses match an
    uninterrupted run, the budget clock charges the true wall time of all three processes, and each
    segment's W&B run points to the one before it."""
    steps = 60
    ref = tmp_path / "ref"
    from onegpu.cli import main

    assert main(["finetune", *_args(tiny, ref, max_steps=steps, save_interval=0)]) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "onegpu", "finetune", *_args(tiny, out, max_steps=steps, save_interval=5)]
    wall = []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: (out / "checkpoints" / "step-000010").is_dir(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wall.append(time.monotonic() - t0)
    assert not (out / "final").exists(), "the run finished before it could be killed"
    killed_at = max(_losses(out))
    assert killed_at < steps

    # segment 2: killed as soon as its W&B run is open, before any checkpoint of its own
    t0 = time.monotonic()
    proc = subprocess.Popen([*cmd, "--resume", "auto"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: len(_segments(out)) == 2 and _segments(out)[-1].get("wandb_id"), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wall.append(time.monotonic() - t0)

    t0 = time.monotonic()
    resumed = subprocess.run([*cmd, "--resume", "auto"], env=_env(), capture_output=True, text=True, timeout=300)
    wall.append(time.monotonic() - t0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--resume auto: found" in resumed.stderr and "resumed from" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["budget_segments"] == 3
    ref_losses, got = _losses(ref), _losses(out)
    assert sorted(got) == sorted(ref_losses) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), step
    assert (out / "final" / "lit_model.pth").is_file()

    # The clock, from process start (imports included): each killed segment is charged up to its
    # last heartbeat (<= HEARTBEAT_INTERVAL_S lost); the finished one up to its last beat, after
    # W&B's shutdown. Not charged: the interpreter's own teardown after that (~1 s on an idle
    # machine, ~10 s measured with a load average of 12 on 2 cores).
    from onegpu.budget import HEARTBEAT_INTERVAL_S

    segments = _segments(out)
    assert [s["ended"] for s in segments] == [None, None, "max_steps"]
    charged = [s["elapsed_s"] for s in segments]
    print(f"wall per segment {wall}, charged {charged}, load average {os.getloadavg()}")
    for seconds, spent in zip(wall[:2], charged[:2]):
        assert seconds - HEARTBEAT_INTERVAL_S - 1.5 <= spent <= seconds + 1.0, (wall, charged)
    assert wall[2] - 20.0 <= charged[2] <= wall[2] + 1.0, (wall, charged)
    assert summary["budget_elapsed_s"] == pytest.approx(sum(charged), abs=0.01)

    # The chain: segment 3 continues segment 2 (which never saved a checkpoint), not segment 1.
    ids = [s["wandb_id"] for s in segments]
    assert len(set(ids)) == 3
    assert [s["resumed_from_wandb_id"] for s in segments] == [None, ids[0], ids[1]]
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["wandb_id"] == ids[2] and run_json["config"]["resumed_from_wandb_id"] == ids[1]

    # W&B history: the last segment's run holds every step, the killed segments' steps replayed from metrics.jsonl
    history = _wandb_history(out, ids[2])
    assert sorted(s for s, row in history.items() if "loss" in row) == list(range(1, steps + 1))
    assert all(history[s]["loss"] == pytest.approx(got[s], rel=1e-6) for s in got)


@pytest.mark.slow
def test_budget_clock_stops_the_run_and_still_merges(tiny, tmp_path):
    from onegpu.finetune.verbs import finetune

    out = tmp_path / "budget"
    budget = 30.0  # loading this tiny model takes ~5-15 s on a loaded 2-core machine; the rest trains
    t0 = time.monotonic()
    peak, floor = 3e-4, 0.1
    summary = finetune(**{**_kw(tiny, out), "max_steps": 100_000, "budget": f"{budget:.0f}s", "budget_reserve": "2s",
                          "learning_rate": peak, "min_lr_ratio": floor, "warmup_steps": 1000})
    assert summary["stopped_by"] == "budget"
    assert 0 < summary["steps"] < 100_000
    # the schedule ends with the budget: warm-up cut to a tenth of the training time, the last step at the floor
    lr, warmup = _metric(out, "lr"), _metric(out, "schedule/warmup_steps")
    last = max(lr)
    assert warmup[last] < min(1000, summary["steps"]) and lr[warmup[last] + 1] == pytest.approx(peak)
    assert lr[last] <= floor * peak + 0.05 * (1 - floor) * peak, (lr[last], summary["steps"])
    assert _metric(out, "schedule/bound_by_budget")[last] == 1.0
    assert summary["budget_elapsed_s"] < budget + summary["finalize_s"]
    assert "budget clock" in summary["budget_stop_reason"]
    assert (out / "final" / "lit_model.pth").is_file() and (out / "final" / "lit_model.pth.lora").is_file()
    assert time.monotonic() - t0 < 120
    # the clock survives a resume: a second segment starts with the first one's time spent
    summary2 = finetune(**{**_kw(tiny, out), "max_steps": 100_000, "budget": f"{budget:.0f}s", "budget_reserve": "2s",
                           "resume": "auto"})
    assert summary2["budget_segments"] == 2 and summary2["steps"] == summary["steps"]
    assert summary2["budget_elapsed_s"] > summary["budget_elapsed_s"]


def test_run_that_finishes_its_steps_follows_the_plain_step_schedule(tiny, tmp_path):
    """24 h of budget for a few steps: linear warm-up, then cosine over the planned steps to the floor."""
    from onegpu.finetune.verbs import finetune

    out, steps, warmup, peak, floor = tmp_path / "plain", 8, 3, 2e-3, 0.2
    finetune(**{**_kw(tiny, out), "max_steps": steps, "warmup_steps": warmup, "learning_rate": peak,
                "min_lr_ratio": floor})
    for step, lr in _metric(out, "lr").items():  # logged after optimizer step `step` (1-based)
        s = step - 1
        if s < warmup:
            expected = (s + 1) / (warmup + 1)
        else:
            expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        assert lr == pytest.approx(peak * expected, rel=1e-9), step
    assert set(_metric(out, "schedule/bound_by_budget").values()) == {0.0}


@pytest.mark.slow
def test_budget_bound_run_resumed_after_sigterm_continues_the_same_curve(tiny, tmp_path):
    """Stopped mid-decay, resumed with --resume auto: no second warm-up, the curve goes on from where the
    clock stands, and the run still ends at the floor when its budget does."""
    out, peak, floor = tmp_path / "curve", 2e-3, 0.1
    args = _args(tiny, out, max_steps=100_000, budget="60s", budget_reserve="2s", warmup_steps=1000,
                 learning_rate=peak, min_lr_ratio=floor, save_interval=0)
    proc = subprocess.Popen([sys.executable, "-m", "onegpu", "finetune", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and any(
        v > 0.1 for v in _metric(out, "schedule/progress").values()), proc)  # a tenth down the decay
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    first = _metric(out, "lr")
    stopped_at, warmup = max(first), _metric(out, "schedule/warmup_steps")[max(first)]
    done = subprocess.run([sys.executable, "-m", "onegpu", "finetune", *args, "--resume", "auto"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lr = _metric(out, "lr")
    resumed = sorted(s for s in lr if s > stopped_at)
    assert resumed and _metric(out, "schedule/warmup_steps")[resumed[-1]] == warmup  # the anchors came back
    decay = [lr[s] for s in sorted(lr) if s > warmup]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(decay, decay[1:]))  # one falling curve across both segments
    assert lr[resumed[-1]] <= floor * peak + 0.05 * (1 - floor) * peak
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "budget"


@pytest.mark.slow
def test_budget_too_small_to_train_exits_nonzero_and_publishes_nothing(tiny, tmp_path):
    """--budget 3s: loading alone uses it up (the auto reserve is sized from the measured load time).
    With --resume auto and nothing to resume, it says so."""
    out = tmp_path / "tiny-budget"
    cmd = [sys.executable, "-m", "onegpu", "finetune", *_args(tiny, out, max_steps=50, budget="3s", resume="auto")]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"--resume auto: no checkpoint in {out / 'checkpoints'}, starting fresh" in done.stderr
    assert "the budget ran out before the first training step" in done.stderr
    assert "fix:" in done.stderr and "larger --budget" in done.stderr
    assert not (out / "final").exists() and not list((out / "checkpoints").glob("step-*"))
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["exit_code"] == 2 and not run_json.get("artifacts")  # as the process: a UserError
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["stopped_by"] == "budget" and summary["final_dir"] is None
    assert summary["budget_segments"] == 1
    segment = _segments(out)[0]
    assert segment["reserve_s"] == pytest.approx(2.5 * segment["load_s"], rel=1e-3)  # RESERVE_MARGIN x 2 x load


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_why_it_stopped(tiny, tmp_path, monkeypatch):
    """Under `wandb agent` (WANDB_SWEEP_ID) SIGTERM is hyperband's early termination; elsewhere a preemption."""
    from onegpu.finetune.lora import SigtermFlag

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert SigtermFlag().stopped_by == "preempted"
    out = tmp_path / "term"
    env = {**_env(), "WANDB_SWEEP_ID": "abc123"}  # W&B itself stays offline here: WANDB_MODE wins
    cmd = [sys.executable, "-m", "onegpu", "finetune", *_args(tiny, out, max_steps=100_000, save_interval=0)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and _losses(out), proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "early_terminate" and summary["steps"] >= 1
    assert Path(summary["checkpoint"]).name == f"step-{summary['steps']:06d}"
    assert (Path(summary["checkpoint"]) / "state.pt").is_file() and not (out / "final").exists()
    assert _segments(out)[-1]["ended"] == "early_terminate"


def _kw(tiny, out):
    return dict(data=str(tiny["data"]), checkpoint_dir=tiny["ckpt"], out_dir=out, micro_batch_size=2,
                global_batch_size=2, num_threads=1, eval_interval=0, num_samples=0, progress=False)


@pytest.mark.parametrize("override, message", [
    ({"lora_r": 0}, "lora_r must be > 0"),
    ({"quantize": "bnb.nf4", "precision": "bf16-mixed"}, "cannot be combined with the mixed precision"),
    ({"checkpoint_dir": "/nonexistent/model"}, "is not a litgpt checkpoint"),
    ({"data": "/nonexistent/data"}, "does not exist"),
    ({"global_batch_size": 3}, "must be a positive multiple"),
    ({"budget": "soon"}, "cannot read the duration"),
])
def test_bad_config_fails_before_model_load(tiny, tmp_path, override, message, monkeypatch):
    import onegpu.finetune.lora as lora
    from onegpu.finetune.verbs import finetune

    def no_model(*a, **k):  # the check must come first: loading the model would be a failure
        raise AssertionError("model was loaded before validation")

    monkeypatch.setattr(lora, "build_model", no_model)
    with pytest.raises(UserError) as err:
        finetune(**{**_kw(tiny, tmp_path / "bad"), **override})
    assert message in err.value.problem and err.value.fix


def test_empty_dataset_and_cli_exit_code(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"prompt_style": "alpaca", "max_seq_length": 128}))
    (empty / "train.jsonl").write_text("")
    from onegpu.cli import main

    assert main(["finetune", "--data", str(empty), "--checkpoint_dir", str(tiny["ckpt"])]) == 2
    err = capsys.readouterr().err
    assert "is empty or missing" in err and "fix:" in err


def test_bf16_on_cpu_warns_loudly(tiny, tmp_path):
    from onegpu.finetune.config import resolve
    from onegpu.finetune.options import finetune_options

    with pytest.warns(UserWarning, match="32-true"):
        resolve(finetune_options(**_kw(tiny, tmp_path / "w"), precision="bf16-true", device="cpu"))


@pytest.mark.slow
def test_resume_from_a_checkpoint_in_the_previous_format_continues_exactly(tiny, tmp_path):
    """Checkpoints written before TrainState had a version (counters under "progress", RNG and
    clock beside them) still resume exactly; a newer TrainState version is refused, naming the fix."""
    import torch

    from onegpu.finetune.checkpoint import TrainState
    from onegpu.finetune.verbs import finetune
    from onegpu.budget import BudgetClock

    out = tmp_path / "legacy"
    finetune(**{**_kw(tiny, out), "max_steps": 4, "save_interval": 2, "keep_last": 3})
    reference = _losses(out)
    step2 = out / "checkpoints" / "step-000002"
    state = torch.load(step2 / "state.pt", weights_only=False)
    train_state = state.pop("train_state")
    assert train_state["version"] == TrainState.VERSION and train_state["step"] == 2
    legacy = {**state, "progress": {k: train_state[k] for k in ("step", "micro_index", "tokens", "loss_tokens",
                                                               "examples", "slots", "best_val_loss", "history")},
              "rng": train_state["rng"], "budget": train_state["budget"]}
    torch.save(legacy, step2 / "state.pt")

    summary = finetune(**{**_kw(tiny, out), "max_steps": 4, "resume": str(step2)})
    assert summary["steps"] == 4 and summary["budget_segments"] == 2
    resumed = _losses(out)  # steps 3 and 4 logged again by the resumed segment (later lines win)
    assert [resumed[s] for s in (3, 4)] == pytest.approx([reference[s] for s in (3, 4)], rel=1e-5, abs=1e-6)

    newer = {**train_state, "version": TrainState.VERSION + 1}
    with pytest.raises(UserError, match=f"version {TrainState.VERSION + 1}") as err:
        TrainState(clock=BudgetClock.from_spec("1h")).load_state_dict(newer)
    assert "start fresh" in err.value.fix
