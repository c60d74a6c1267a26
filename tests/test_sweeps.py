"""Sweeps: W&B-schema validation, command rendering, offline grid/bayes sweeps, resume, hyperband,
the HTML report in headless Chromium, and the W&B dashboard spec.

The fine-tuning sweep runs real ``onegpu finetune`` trials on a random-init 2-layer litgpt model with
the bundled tokenizer (``finetune.tiny``) so each trial takes seconds; the runner mechanics
(resume, hyperband, bayes) use a small real program that logs through ``onegpu.tracking``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import default_sigint
from onegpu.errors import UserError
from onegpu.paths import REPO_ROOT
from onegpu.sweeps import runner, schema
from onegpu.sweeps.runner import render_command, sweep

SWEEP_YAMLS = sorted((REPO_ROOT / "sweeps").glob("*.yaml"))

# A real trial program: parses its flags, logs `score` per iteration through onegpu.tracking.Run.
TOY = textwrap.dedent('''
    import argparse, json, os, sys, time
    from pathlib import Path
    p = argparse.ArgumentParser()
    p.add_argument("--x", type=float, required=True)
    p.add_argument("--tag", default="ok")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--sleep", type=float, default=0.0)  # per iteration, times the distance from the optimum x=2
    a = p.parse_args()
    out = Path(os.environ["ONEGPU_TRIAL_DIR"])
    with open(out / "invocations.txt", "a") as fh:  # how often the runner started this trial
        fh.write("x\\n")
    from onegpu.tracking import Run
    run = Run("toy", out, {"x": a.x, "tag": a.tag})
    for i in range(a.iters):
        run.log({"score": (a.x - 2.0) ** 2 + 1.0 / (i + 1)}, step=i)
        time.sleep(a.sleep * abs(a.x - 2.0))
    run.summary(score=(a.x - 2.0) ** 2)
    run.finish()
    sys.exit(3 if a.tag == "crash" else 0)
''')


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    program = tmp_path / "toy.py"
    program.write_text(TOY)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # runner mechanics only: skip W&B start-up per trial
    monkeypatch.chdir(tmp_path)
    return program


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ------------------------------------------------------------------------------ validation / render
@pytest.mark.parametrize("path", SWEEP_YAMLS, ids=lambda p: p.name)
def test_shipped_yamls_validate_against_wandb_schema_and_parse_with_finetune(path):
    cfg = schema.load_sweep_config(path)
    assert cfg["method"] in ("grid", "random", "bayes") and cfg["metric"]["name"] == "val_loss"
    target = runner.check_command(cfg, runner.validation_points(cfg), str(path))
    assert target is not None and target.words == ("finetune",)
    argv = render_command(cfg, runner.validation_points(cfg)[0])
    assert argv[:3] == ["/usr/bin/env", "onegpu", "finetune"]
    assert all(a.startswith("--") and "=" in a for a in argv[3:])


def test_quickstart_yaml_is_a_step_bounded_learning_rate_grid_that_keeps_little():
    cfg = schema.load_sweep_config(REPO_ROOT / "sweeps/quickstart.yaml")
    points = schema.grid_points(cfg)
    rates = sorted(p["learning_rate"] for p in points)
    assert len(points) == 3 and rates[0] * 10 < rates[1] < rates[2] / 10  # too low, good, too high
    for p in points:
        assert p["precision"] == "32-true" and p["max_steps"] <= 20 and "budget" not in p
        assert p["merge"] is False and p["final_checkpoint"] is False
        assert p["save_interval"] == 0 and p["save_interval_minutes"] == 0


def test_render_command_follows_wandb_agent_macros(monkeypatch):
    monkeypatch.setenv("MY_DATA", "/data/mix")
    cfg = {"method": "grid", "program": "train.py", "parameters": {"a": {"value": 1}},
           "command": ["${env}", "${interpreter}", "${program}", "--data=${envvar:MY_DATA}", "${args}",
                       "${args_no_hyphens}", "${args_json}", "${args_no_boolean_flags}"]}
    argv = render_command(cfg, {"lr": 0.001, "mix.dolly": 0.5, "mix.lima": 0.5, "flag": False, "name": "x"})
    assert argv[:4] == ["/usr/bin/env", sys.executable, "train.py", "--data=/data/mix"]
    rest = argv[4:]
    # ${args}: --key=value, nested parameters arrive as one dict (W&B's behaviour)
    assert rest[:4] == ["--lr=0.001", "--mix={'dolly': 0.5, 'lima': 0.5}", "--flag=False", "--name=x"]
    assert rest[4:8] == ["lr=0.001", "mix={'dolly': 0.5, 'lima': 0.5}", "flag=False", "name=x"]
    assert json.loads(rest[8]) == {"lr": 0.001, "mix": {"dolly": 0.5, "lima": 0.5}, "flag": False, "name": "x"}
    assert rest[9:] == ["--lr=0.001", "--mix={'dolly': 0.5, 'lima': 0.5}", "--name=x"]  # false booleans dropped
    # the default command is W&B's: ${env} ${interpreter} ${program} ${args}
    assert render_command({"program": "t.py"}, {"a": 1}) == ["/usr/bin/env", sys.executable, "t.py", "--a=1"]
    with pytest.raises(UserError, match=r"unknown macro \$\{argz\}"):
        render_command({"command": ["${argz}"]}, {"a": 1})


@pytest.mark.parametrize("where", ["parameter", "command"])
def test_sweep_values_override_a_config_file_whatever_their_names(tmp_path, capsys, where):
    """W&B renders parameters sorted by name (``--budget`` before ``--config``); the sweep's own values
    must still win over the file's, as must anything after a ``--config`` written into ``command``."""
    from onegpu import cli

    day = _write(tmp_path / "day.yaml", {"budget": "24h", "lora_r": 64, "learning_rate": 1.0e-4})
    cfg = {**BASE, "parameters": {"budget": {"value": "45m"}, "lora_r": {"values": [8, 16]}}}
    if where == "parameter":
        cfg["parameters"]["config"] = {"value": str(day)}
    else:
        cfg["command"] = ["${env}", "onegpu", "finetune", "${args}", f"--config={day}"]
    for point in schema.grid_points(cfg):
        argv = render_command(cfg, point)
        assert argv.index("--budget=45m") < next(i for i, a in enumerate(argv) if a.startswith("--config="))
        with pytest.raises(SystemExit):
            cli.main(argv[2:] + ["--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        assert (printed["budget"], printed["lora_r"]) == ("45m", point["lora_r"])  # the sweep's values
        assert printed["learning_rate"] == 1.0e-4  # what only the file sets still comes from it


BASE = {"program": "onegpu", "method": "grid", "metric": {"name": "val_loss", "goal": "minimize"},
        "command": ["${env}", "onegpu", "finetune", "${args}"]}


@pytest.mark.parametrize("parameters,extra,match", [
    ({"lora_rank": {"values": [4, 8]}}, {}, r"parameters\.lora_rank: `onegpu finetune` has no option --lora_rank.*--lora_r"),
    ({"learning_rate": {"distribution": "loguniform", "min": 1e-5, "max": 1e-3}}, {"method": "random"},
     r"parameters\.learning_rate\.distribution: 'loguniform' is not a W&B distribution"),
    ({"learning_rate": {"distribution": "normal", "min": 1e-5}}, {"method": "random"},
     r"parameters\.learning_rate: distribution 'normal' needs mu, sigma"),
    ({"learning_rate": {"min": "1e-5", "max": 1e-3}}, {"method": "random"}, r"parameters\.learning_rate: .*write `1\.0e-4`"),
    ({"lora_r": {"min": 16, "max": 4}}, {}, r"parameters\.lora_r: min 16 is not less than max 4"),
    ({"quantize": {"values": ["null", "bnb.nf5"]}}, {}, r"parameters\.quantize: `onegpu finetune` rejects --quantize=bnb\.nf5"),
    ({"quantize": {"values": [None]}}, {}, r"parameters\.quantize: .*write the\s+string 'null'"),
    ({"lora_r": {"values": ["eight"]}}, {}, r"parameters\.lora_r: `onegpu finetune` rejects"),
    ({"learning_rate": {"min": 0.0001, "max": 0.001}}, {}, r"parameters\.learning_rate: a uniform distribution cannot be enumerated"),
    ({"lora_r": {"values": [4]}}, {"method": "bayes", "metric": None}, r"method 'bayes' needs `metric`"),
    ({"lora_r": {"values": [4]}}, {"metric": {"name": "val_loss", "goal": "lowest"}}, r"metric\.goal: 'lowest' is not one of"),
    ({"lora_r": {"values": [4]}}, {"early_terminate": {"type": "hyperband"}}, r"early_terminate"),
    ({"lora_r": {"values": [4]}}, {"paramters": {}}, r"unknown top-level key 'paramters'"),
    ({"lora_r": {"values": [4]}}, {"command": ["${env}", "onegpu", "finetun", "${args}"]}, r"not an onegpu verb"),
])
def test_bad_sweep_yaml_is_rejected_before_any_trial_naming_the_key(tmp_path, parameters, extra, match):
    doc = {**BASE, **extra, "parameters": parameters}
    doc = {k: v for k, v in doc.items() if v is not None}
    path = _write(tmp_path / "bad.yaml", doc)
    with pytest.raises(UserError, match="(?s)" + match):  # (?s): the key may be named in the fix line
        sweep(path, out=tmp_path / "out")
    assert not (tmp_path / "out" / "trial-000").exists()


def test_combination_finetune_would_reject_fails_before_any_trial(tmp_path, tiny_finetune):
    doc = {**BASE, "parameters": {"precision": {"values": ["32-true", "bf16-mixed"]}, "quantize": {"value": "bnb.nf4"},
                                  "data": {"value": str(tiny_finetune["data"])}}}
    with pytest.raises(UserError, match=r"would reject the trial with parameters\.precision=bf16-mixed.*mixed precision"):
        sweep(_write(tmp_path / "s.yaml", doc), out=tmp_path / "out")
    assert not (tmp_path / "out" / "trial-000").exists()
    doc["parameters"] = {"lora_r": {"value": 4}, "data": {"value": str(tmp_path / "nope")}}
    with pytest.raises(UserError, match=r"parameters\.data=.*nope.*does not exist"):
        sweep(_write(tmp_path / "s.yaml", doc), out=tmp_path / "out")


def test_grid_order_and_random_draws_follow_wandb_semantics():
    cfg = {"method": "grid", "parameters": {"b": {"values": [1, 2]}, "a": {"values": ["x", "y"]},
                                            "c": {"min": 1, "max": 2}, "d": {"value": 7}}}
    schema.validate_sweep_config(cfg)
    # sorted by name; int_uniform min/max expands to every integer; constants ride along
    assert schema.grid_points(cfg) == [{"a": a, "b": b, "c": c, "d": 7} for a in "xy" for b in (1, 2) for c in (1, 2)]
    import random

    cfg = {"method": "random", "parameters": {
        "lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
        "r": {"distribution": "int_uniform", "min": 2, "max": 5},
        "q": {"distribution": "q_uniform", "min": 0, "max": 1, "q": 0.25},
        "p": {"values": ["a", "b"], "probabilities": [0.9, 0.1]}}}
    schema.validate_sweep_config(cfg)
    draws = [schema.sample_point(cfg, random.Random(i)) for i in range(300)]
    assert all(1e-5 <= d["lr"] <= 1e-2 and d["r"] in (2, 3, 4, 5) and (d["q"] / 0.25).is_integer() for d in draws)
    small = sum(d["lr"] < 1e-4 for d in draws) / len(draws)  # log-uniform: ~1/3 of mass below 1e-4
    assert 0.2 < small < 0.47
    assert 0.8 < sum(d["p"] == "a" for d in draws) / len(draws) < 0.97
    assert list(runner.S.iter_random_points(cfg, 5).__next__().items()) == \
           list(runner.S.iter_random_points(cfg, 5).__next__().items())  # seeded: resumable


def test_hyperband_rule_matches_wandb_engine_example():
    # The example from W&B's sweeps/hyperband_stopping.py: bands [1, 2] for max_iter 5, eta 2, s 2.
    et = {"type": "hyperband", "max_iter": 5, "eta": 2, "s": 2}
    assert schema.hyperband_bands(et) == [1, 2]
    assert schema.hyperband_bands({"type": "hyperband", "min_iter": 3, "eta": 3})[:3] == [3, 9, 27]
    finished = [[10, 9], [10, 6, 6]]
    assert schema.hyperband_should_stop([10, 10], finished, et, "minimize")  # b: worse than the best half
    assert schema.hyperband_should_stop([10, 5], finished, et, "minimize") is None
    assert schema.hyperband_should_stop([10], finished, et, "minimize") is None  # band 1: tie, not worse
    # maximize: the same runs with the sign flipped stop the same way; the best value so far counts
    assert schema.hyperband_should_stop([-10, -10], [[-10, -9], [-10, -6, -6]], et, "maximize")
    assert schema.hyperband_should_stop([10, 5], [[10, 9], [10, 6, 6]], et, "maximize") is None


# ----------------------------------------------------------------------------- toy-program sweeps
def _toy_yaml(tmp_path: Path, program: Path, **over) -> Path:
    doc = {"program": str(program), "method": "grid", "metric": {"name": "score", "goal": "minimize"},
           "parameters": {"x": {"values": [1.0, 2.0, 3.0]}, "tag": {"values": ["ok"]}, "sleep": {"value": 0.0}}}
    doc.update(over)
    return _write(tmp_path / "toy.yaml", doc)


@pytest.mark.slow
def test_resume_after_interruption_skips_done_trials_and_keeps_failures(tmp_path, toy):
    params = {"x": {"values": [1.0, 2.0, 3.0]}, "tag": {"values": ["crash", "ok"]}, "sleep": {"value": 0.4}}
    # 6 trials in W&B's order (names sorted, product): the 3 tag=crash ones exit 3, then the 3 ok ones
    path = _toy_yaml(tmp_path, toy, parameters=params)
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "onegpu", "sweep", str(path), "--out", str(out)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 90
    while not (out / "trial-002" / "invocations.txt").exists():  # trials 0 and 1 are done, 2 is running
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output
    state = json.loads((out / "sweep_state.json").read_text())
    by_name = {t["name"]: t for t in state["trials"]}
    assert by_name["trial-000"]["state"] == by_name["trial-001"]["state"] == "failed"
    assert "exit 3" in by_name["trial-000"]["note"]
    assert by_name["trial-002"]["state"] == "interrupted"
    assert "trial-003" not in by_name

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    state = json.loads((out / "sweep_state.json").read_text())
    assert [t["state"] for t in sorted(state["trials"], key=lambda t: t["index"])] == \
           ["failed", "failed", "failed", "finished", "finished", "finished"]
    runs = {name: len((out / name / "invocations.txt").read_text().split()) for name in
            (f"trial-00{i}" for i in range(6))}
    assert runs == {"trial-000": 1, "trial-001": 1, "trial-002": 2, "trial-003": 1, "trial-004": 1, "trial-005": 1}
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["best"]["params"]["x"] == 2.0 and summary["best"]["metric"] == 0.0
    assert "trial-005" in again.stdout and "best: trial-004" in again.stdout  # the summary table
    # the sweep's own run records the trial table
    assert json.loads((out / "sweep-run" / "trials.table.json").read_text())["columns"][:2] == ["trial", "state"]

    # a changed YAML must not silently mix into the old sweep dir
    _toy_yaml(tmp_path, toy, parameters={**params, "sleep": {"value": 0.1}})
    with pytest.raises(UserError, match="belongs to a different sweep config"):
        sweep(path, out=out)


def test_bayes_through_optuna_and_hyperband_stops_a_bad_trial(tmp_path, toy):
    bayes = _toy_yaml(tmp_path, toy, method="bayes",
                      parameters={"x": {"min": 0.0, "max": 4.0}, "iters": {"value": 2}})
    assert sweep(bayes, out=tmp_path / "bayes", count=4, seed=1) == 0
    state = json.loads((tmp_path / "bayes" / "sweep_state.json").read_text())
    xs = [t["params"]["x"] for t in state["trials"]]
    assert len(xs) == 4 and len(set(xs)) == 4 and all(0.0 <= x <= 4.0 for x in xs)
    assert all(t["state"] == "finished" and t["metric"] == pytest.approx((t["params"]["x"] - 2) ** 2) for t in state["trials"])
    with pytest.raises(UserError, match="pass --count N"):
        sweep(bayes, out=tmp_path / "bayes2")

    # hyperband (W&B semantics, min_iter 1, eta 3): x=3 logs a worse score than x=2 did at
    # iteration 1, so it is stopped long before its 60 iterations x 0.5 s would end.
    hb = _toy_yaml(tmp_path, toy, early_terminate={"type": "hyperband", "min_iter": 1, "eta": 3},
                   parameters={"x": {"values": [2.0, 3.0]}, "iters": {"value": 60}, "sleep": {"value": 0.5}})
    t0 = time.time()
    sweep(hb, out=tmp_path / "hb")
    state = {t["name"]: t for t in json.loads((tmp_path / "hb" / "sweep_state.json").read_text())["trials"]}
    assert state["trial-000"]["state"] == "finished"
    assert state["trial-001"]["state"] == "stopped" and "hyperband" in state["trial-001"]["note"]
    assert time.time() - t0 < 25


@pytest.mark.slow
def test_bayes_resume_continues_the_optuna_study_from_its_journal(tmp_path, toy):
    """An interrupted bayes sweep resumes from optuna's own storage (OUT/optuna.journal): the finished
    trial stays told, the interrupted one is marked failed there and its index asked anew."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    # x in [3, 4]: every trial sleeps >= 2 x 2 s, long enough to be interrupted mid-way
    path = _toy_yaml(tmp_path, toy, method="bayes",
                     parameters={"x": {"min": 3.0, "max": 4.0}, "iters": {"value": 2}, "sleep": {"value": 2.0}})
    out = tmp_path / "bayes"
    cmd = [sys.executable, "-m", "onegpu", "sweep", str(path), "--out", str(out), "--count", "3", "--seed", "7"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not (out / "trial-001" / "invocations.txt").exists():  # trial 0 is done, 1 is running
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stdout.read()
    first = json.loads((out / "sweep_state.json").read_text())
    assert [t["state"] for t in first["trials"]] == ["finished", "interrupted"]

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = sorted(json.loads((out / "sweep_state.json").read_text())["trials"], key=lambda t: t["index"])
    assert [t["state"] for t in trials] == ["finished"] * 3
    assert trials[0]["params"] == first["trials"][0]["params"]  # kept, not run again
    assert trials[1]["params"] != first["trials"][1]["params"]  # asked anew, in a fresh dir
    assert [len((out / t["name"] / "invocations.txt").read_text().split()) for t in trials] == [1, 1, 1]
    study = optuna.load_study(study_name=first["sweep_id"],
                              storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                                               TrialState.COMPLETE]
    told = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert [t.params["x"] for t in told] == [t["params"]["x"] for t in trials]
    assert [t.value for t in told] == pytest.approx([t["metric"] for t in trials])


# ---------------------------------------------------------------- real fine-tuning trials + report
@pytest.fixture(scope="module")
def tiny_finetune(tmp_path_factory, bundled_checkpoint, shared_datasets):
    from onegpu.finetune.tiny import make_data_dir, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("sweep-tiny")
    return {"ckpt": make_tiny_checkpoint(root / "ckpt", bundled_checkpoint),
            "data": make_data_dir(root / "data", shared_datasets, n_train=24, n_val=16, max_seq_length=64)}


# The quickstart YAML's too-low rate and a good one for the random-init tiny model, which learns
# something that carries to the validation rows (token frequencies) only with the LM head adapted.
LEARNING_RATES = [1e-5, 1e-2]


@pytest.fixture(scope="module")
def finetune_sweep(tmp_path_factory, tiny_finetune):
    """The quickstart YAML (two learning rates) as real finetune trials on the tiny model, killed
    (SIGTERM to the sweep) mid-way through trial-000, then resumed by re-running the same command."""
    cfg = yaml.safe_load((REPO_ROOT / "sweeps/quickstart.yaml").read_text())
    cfg["parameters"].update({"learning_rate": {"values": LEARNING_RATES}, "max_steps": {"value": 24},
                              "save_interval": {"value": 2}, "max_seq_length": {"value": 64},
                              "eval_interval": {"value": 8}, "eval_max_examples": {"value": 16},
                              "initial_validation": {"value": True}, "lora_head": {"value": True},
                              "num_threads": {"value": 1}})
    root = tmp_path_factory.mktemp("sweep")
    path, out = _write(root / "quick.yaml", cfg), root / "out"
    params = f"{{data: {tiny_finetune['data']}, checkpoint_dir: {tiny_finetune['ckpt']}}}"
    cmd = [sys.executable, "-m", "onegpu", "sweep", str(path), "--out", str(out), "--params", params]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 150
    while not (out / "trial-000" / "checkpoints" / "step-000004").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.terminate()  # the sweep stops its trial (SIGINT first, so it can finish its W&B run) and records it
    interrupted = {"code": proc.wait(timeout=60), "output": proc.stdout.read(),
                   "state": json.loads((out / "sweep_state.json").read_text()),
                   "final_existed": (out / "trial-000" / "final").exists()}
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return out, interrupted, resumed


@pytest.mark.slow
def test_offline_grid_sweep_of_two_real_finetune_trials_resumes_after_a_kill(finetune_sweep):
    out, interrupted, resumed = finetune_sweep
    assert interrupted["code"] == 130, interrupted["output"][-2000:]
    assert [t["state"] for t in interrupted["state"]["trials"]] == ["interrupted"]
    assert not interrupted["final_existed"]
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]

    state = json.loads((out / "sweep_state.json").read_text())
    trials = sorted(state["trials"], key=lambda t: t["index"])
    assert state["sweep_id"] == interrupted["state"]["sweep_id"]
    assert [t["state"] for t in trials] == ["finished", "finished"], [t.get("note") for t in trials]
    assert [t["params"]["learning_rate"] for t in trials] == LEARNING_RATES
    # the interrupted trial continued from its last checkpoint instead of starting over
    assert trials[0]["command"].endswith("--resume=auto") and "--resume" not in trials[1]["command"]
    assert "resumed from" in (out / "trial-000" / "trial.log").read_text()
    for trial in trials:
        run_dir = Path(trial["run_dir"])
        run = json.loads((run_dir / "run.json").read_text())
        assert run["stage"] == "finetune" and run["config"]["learning_rate"] == trial["params"]["learning_rate"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 24
        assert trial["metric"] == pytest.approx(summary["val_loss"]) and summary["val_loss"] > 0
        # a trial keeps the adapter, not a merged model (the YAML's merge: false)
        assert (run_dir / "final" / "lit_model.pth.lora").is_file() and not (run_dir / "final" / "lit_model.pth").exists()
        # an offline W&B run per trial, its config carrying the sweep params and the sweep id
        assert list((run_dir / "wandb").glob("offline-run-*"))
        params = yaml.safe_load((run_dir / "sweep_params.yaml").read_text())
        assert params["sweep_id"]["value"] == state["sweep_id"]
        assert params["learning_rate"]["value"] == trial["params"]["learning_rate"]
        assert f"--out_dir={run_dir}" in trial["command"]
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["best"]["name"] in ("trial-000", "trial-001") and len(summary["rows"]) == 2
    assert "best: trial-00" in resumed.stdout
    # the winner's swept values, as a config the final run reads after its own (`--config A --config best.yaml`)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best == {"learning_rate": summary["best"]["params"]["learning_rate"]}
    from onegpu.finetune.planning.day import finetune_flat

    quickstart = REPO_ROOT / "finetune" / "configs" / "cpu-quickstart.yaml"
    assert finetune_flat(["--config", str(quickstart), "--config", str(out / "best.yaml")])["learning_rate"] == \
        best["learning_rate"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium_run(browser: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--hide-scrollbars", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def _dom_attr(dom: str, name: str) -> str:
    import re

    match = re.search(rf'{name}="([^"]*)"', dom)
    assert match, f"{name} missing from the rendered page: {dom[:300]}"
    return match.group(1)


@pytest.fixture(scope="module")
def sweep_report(finetune_sweep, tmp_path_factory):
    """The report over the real sweep's two trials (learning rates), a copy of trial-001 (an identical run), a real
    `onegpu eval val` of trial-000's checkpoint and a HELM results.json (eval helm's format) for it."""
    from onegpu.sweeps.report import report

    out, _interrupted, _resumed = finetune_sweep
    root = tmp_path_factory.mktemp("report")
    copy = root / "trial-001-again"
    shutil.copytree(out / "trial-001", copy, ignore=shutil.ignore_patterns("final", "checkpoints", "wandb"))
    val = root / "eval-val"
    proc = subprocess.run([sys.executable, "-m", "onegpu", "eval", "val", "--checkpoint", str(out / "trial-000" / "final"),
                           "--tasks", "[onegpu_truthfulqa_mc1, onegpu_bigbench_emoji_movie]", "--limit", "2",
                           "--num_threads", "1", "--out", str(val)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    helm = root / "eval-helm"
    helm.mkdir()
    scenarios = {"mmlu": ("exact_match", 0.25), "truthful_qa": ("exact_match", 0.5), "bbq": ("quasi_exact_match", 0.75)}
    (helm / "results.json").write_text(json.dumps({
        "stage": "eval-helm", "checkpoint": str(out / "trial-000" / "final"),
        "scenarios": {s: {"main_metric": m, "value": v, "n_runs": 1} for s, (m, v) in scenarios.items()},
        "test_score": sum(v for _m, v in scenarios.values()) / len(scenarios)}))
    index = report([out, copy, val, helm], out=root / "out")
    return {"index": index, "sweep": out, "copy": copy, "val": val, "helm": helm,
            "doc": json.loads((root / "out" / "report.json").read_text())}


@pytest.mark.slow
def test_report_table_scores_units_and_identical_runs(sweep_report):
    doc, out = sweep_report["doc"], sweep_report["sweep"]
    assert doc["charts"] == ["val_tasks", "test_scenarios", "losses", "over_time", "pareto", "budget_memory"]
    assert {p.name for p in sweep_report["index"].parent.iterdir()} >= {f"{c}.png" for c in doc["charts"]}
    rows = {r["run"]: r for r in doc["runs"]}
    assert [r["learning_rate"] for r in doc["runs"]] == [*LEARNING_RATES, LEARNING_RATES[1]] and [r["#"] for r in doc["runs"]] == [1, 2, 3]
    first = rows["out/trial-000"]
    val = json.loads((sweep_report["val"] / "results.json").read_text())
    helm = json.loads((sweep_report["helm"] / "results.json").read_text())
    assert first["val score"] == pytest.approx(val["val_score"]) and first["test score"] == pytest.approx(helm["test_score"])
    # MFU is a percentage in the table: 100 x the median of the fractions the trial logged (first window left out)
    logged = [r["mfu"] for r in map(json.loads, (out / "trial-000" / "metrics.jsonl").read_text().splitlines())
              if "mfu" in r]
    import statistics

    assert first["MFU %"] == pytest.approx(round(100 * statistics.median(logged[1:] if len(logged) > 2 else logged), 2))
    assert all(r["peak GiB"] and "%" in r["budget used"] and r["tokens/s"] for r in doc["runs"])
    # the copy of trial-001 is named as identical to it, whatever trial-000 did
    same = [n for n in doc["identical"] if n["kind"] == "configuration"]
    assert [n["runs"] for n in same] == [[2, 3]] and "the same losses" in same[0]["text"]


@pytest.mark.slow
def test_report_names_the_sweep_winner_and_shows_its_win_is_beyond_noise(sweep_report):
    """The real trials: each ran its planned steps, the good learning rate's loss fell, and the report's
    sentence names it as the winner with a paired difference of at least 2 standard errors."""
    from onegpu.sweeps.report import paired_difference

    out = sweep_report["sweep"]
    summaries = [json.loads((out / f"trial-00{i}" / "summary.json").read_text()) for i in range(2)]
    assert [s["steps"] for s in summaries] == [24, 24] and {s["stopped_by"] for s in summaries} == {"max_steps"}
    low, good = summaries
    assert good["final_loss"] < good["first_loss"] and good["val_loss"] < low["val_loss"]
    # --initial_validation: both start from the base model's val loss, on the same rows
    starts = [next(r["val_loss"] for r in map(json.loads, (out / f"trial-00{i}" / "metrics.jsonl").read_text().splitlines())
                   if r.get("_step") == 0 and "val_loss" in r) for i in range(2)]
    assert starts[0] == pytest.approx(starts[1], abs=1e-5) and good["val_loss"] < starts[1]
    [verdict] = sweep_report["doc"]["sweeps"]
    assert verdict["winner"] == 2 and verdict["runner_up"] == 1 and verdict["beyond_noise"] is True, verdict["text"]
    assert verdict["margin"] == pytest.approx(low["val_loss"] - good["val_loss"])
    mean, se, _better = paired_difference(good["val_row_losses"], low["val_row_losses"])
    assert mean / se >= 2 and f"{mean / se:.1f} standard errors" in verdict["text"]
    assert "out/trial-001" in verdict["text"] and "learning_rate" in verdict["text"]
    assert f"verdict>{verdict['text'][:40]}" in sweep_report["index"].read_text()


@pytest.mark.slow
def test_report_renders_in_headless_chromium(sweep_report, tmp_path):
    index, doc = sweep_report["index"], sweep_report["doc"]
    page = index.read_text()
    assert page.count("<svg") == len(doc["charts"]) == 6 and "onegpu_truthfulqa_mc1" in page
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (`make browser` installs it); the HTML was checked as text only")
    with tempfile.TemporaryDirectory() as profile:
        dom = _chromium_run(browser, profile, "--window-size=1400,1000", "--virtual-time-budget=10000", "--dump-dom",
                            index.as_uri()).stdout
        # every chart was laid out and drawn, no two labels of a chart overlap, none is wider than the window
        assert _dom_attr(dom, "data-charts") == _dom_attr(dom, "data-charts-drawn") == "6"
        assert _dom_attr(dom, "data-label-overlaps") == "0", _dom_attr(dom, "data-label-overlap-list")
        assert _dom_attr(dom, "data-too-wide") == "0" and _dom_attr(dom, "data-table-rows") == "3"
        assert "have the same configuration and logged the same losses" in dom
        rects = [r.split(",") for r in _dom_attr(dom, "data-chart-rects").split(";")]
        bottom = max(int(y) + int(h) for _n, _x, y, _w, h in rects)
        shot = tmp_path / "shot.png"
        _chromium_run(browser, profile, f"--window-size=1400,{bottom + 40}", f"--screenshot={shot}", index.as_uri())
    from PIL import Image, ImageStat

    image = Image.open(shot).convert("L")
    assert image.size == (1400, bottom + 40)
    for name, x, y, w, h in rects:  # each chart's region of the screenshot holds a drawing, not a blank box
        region = image.crop((int(x), int(y), int(x) + int(w), int(y) + int(h)))
        low, high = region.getextrema()
        assert low < 80 and high > 200 and ImageStat.Stat(region).stddev[0] > 10, (name, low, high)


# --------------------------------------------------------------------------------------- dashboard
def test_dashboard_spec_has_the_standard_panels_and_needs_online(monkeypatch):
    from onegpu.sweeps import dashboard

    workspace = dashboard.build_workspace("my-team", "llm-challenge", "onegpu standard")
    model = json.loads(workspace._to_model().model_dump_json(by_alias=True))  # the exact view W&B would store
    text = json.dumps(model)
    for metric in ("loss", "val_loss", "tokens_per_s", "mfu", "mem/cuda_peak_allocated_gib", "budget_used_pct",
                   "val/score", "test/score"):
        assert f'"{metric}"' in text, metric
    sections = {name: [type(p).__name__ for p in panels] for name, panels in dashboard.build_panels()}
    sweep_panels = sections["Sweeps: rank x precision x quantization"]
    assert "ParallelCoordinatesPlot" in sweep_panels and sweep_panels.count("ScatterPlot") == 3  # + score vs LoRA rank
    import wandb_workspaces.reports.v2 as wr

    parallel = dashboard.build_panels()[0][1][0]
    assert [c.metric for c in parallel.columns[:4]] == [wr.Config(k) for k in ("lora_r", "lora_alpha", "precision", "quantize")]
    report = dashboard.build_report("my-team", "llm-challenge", "onegpu standard")
    assert report.title == "onegpu standard" and len(report.blocks) == 1 + 2 * len(sections)

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(UserError, match="cannot be created offline") as err:
        dashboard.dashboard(project="llm-challenge")
    assert "onegpu report" in err.value.fix
