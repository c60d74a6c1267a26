"""`onegpu eval helm`: a real helm-run against a real `onegpu serve`, and no server left behind
after success, a server that fails to start, or an interrupt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import default_sigint
from onegpu.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def _cmd(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "onegpu", "eval", "helm", "--checkpoint", str(checkpoint), "--conf", "offline",
            "--max_eval_instances", "1", "--out", str(out), *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _server_gone(out: Path) -> bool:
    info = json.loads((out / "server.json").read_text())
    if not psutil.pid_exists(info["pid"]):
        return True
    try:
        return psutil.Process(info["pid"]).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def helm_bin():
    from onegpu.eval.helm_env import helm_bin_dir

    return helm_bin_dir()  # creates .venv-helm on first use (the Makefile does it before tests)


def test_helm_offline_conf_end_to_end(helm_offline_run):
    out, proc = helm_offline_run  # `_cmd(bundled_checkpoint, out)`, run once per session
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    # both synthetic_reasoning entries of the conf ran, one instance each, and were parsed
    assert len(results["runs"]) == 2
    for name, run in results["runs"].items():
        assert name.startswith("synthetic_reasoning:") and run["n_instances"] == 1
        assert run["main_metric"] == "exact_match" and 0.0 <= run["main"] <= 1.0
        assert run["metrics"]["num_prompt_tokens"] > 10  # the server's /tokenize counted a real prompt
    assert results["scenarios"]["synthetic_reasoning"]["n_runs"] == 2
    assert results["test_score"] == results["scenarios"]["synthetic_reasoning"]["value"]
    assert (out / "helm" / "runs" / "onegpu" / "summary.json").is_file()  # helm-summarize ran
    assert "synthetic_reasoning" in proc.stdout and "test_score" in proc.stdout
    assert (out / "helm_scenarios.table.json").is_file()
    assert json.loads((out / "run.json").read_text())["lineage"][0]["type"] == "model"
    assert _server_gone(out)


def test_server_that_fails_to_start_shows_its_log(bundled_checkpoint, helm_bin, tmp_path):
    out = tmp_path / "helm"
    proc = subprocess.run(_cmd(bundled_checkpoint, out, "--serve_args", json.dumps(["--no_such_option", "x"])),
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env=_env())
    assert proc.returncode == 2
    assert "exited with code" in proc.stderr and "no_such_option" in proc.stderr  # the log tail
    assert "fix:" in proc.stderr
    assert _server_gone(out) and not (out / "results.json").exists()


def test_interrupt_stops_server_and_helm(bundled_checkpoint, helm_bin, tmp_path):
    out = tmp_path / "helm"
    proc = subprocess.Popen(_cmd(bundled_checkpoint, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO_ROOT, env=_env(), preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (out / "helm-run.log").exists():
            time.sleep(0.5)  # the log appears once the server answered /health and helm-run started
        assert (out / "helm-run.log").exists(), "helm-run never started"
        server_pid = json.loads((out / "server.json").read_text())["pid"]
        assert psutil.pid_exists(server_pid)
        helm_children = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.pid != server_pid]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130  # onegpu: interrupted
    assert _server_gone(out)
    for child in helm_children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_bad_input_is_a_clear_error(tmp_path):
    # Input is validated before any model is loaded: a dir that merely looks like a checkpoint will do.
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    for name in ("lit_model.pth", "model_config.yaml", "tokenizer.json"):
        (checkpoint / name).write_text("")

    def run(*args, env=None):
        return subprocess.run([sys.executable, "-m", "onegpu", "eval", "helm", *args, "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, env=env or _env())

    missing = run("--checkpoint", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "fix:" in missing.stderr
    conf = run("--checkpoint", str(checkpoint), "--conf", "no-such-conf")
    assert conf.returncode == 2 and "unknown HELM conf" in conf.stderr and "open-600" in conf.stderr
    no_helm = run("--checkpoint", str(checkpoint), env={**_env(), "ONEGPU_HELM_BIN": str(tmp_path)})
    assert no_helm.returncode == 2 and "helm-run" in no_helm.stderr and "fix:" in no_helm.stderr
    assert not (tmp_path / "o" / "server.json").exists()  # all rejected before a server started


def test_hidden_stock_conf_builds_with_crfm_helm(helm_bin):
    # crfm-helm's own parser and run-spec functions build every entry of the conf (no data, no server).
    from onegpu.eval.helm import conf_entries, resolve_conf

    _, conf = resolve_conf("hidden-stock")
    script = ("import json, sys\n"
              "from helm.benchmark.config_registry import register_builtin_configs_from_helm_package\n"
              "from helm.benchmark.presentation.run_entry import read_run_entries\n"
              "from helm.benchmark.run import run_entries_to_run_specs\n"
              "register_builtin_configs_from_helm_package()\n"
              "specs = run_entries_to_run_specs(read_run_entries([sys.argv[1]]).entries)\n"
              "print(json.dumps([[s.name, s.adapter_spec.max_eval_instances, s.adapter_spec.max_tokens] for s in specs]))\n")
    proc = subprocess.run([str(helm_bin / "python"), "-c", script, str(conf)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    specs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(specs) == len(conf_entries(conf)) == 30
    cot = [s for s in specs if s[0].startswith("math:") and "use_chain_of_thought=True" in s[0]]
    assert len(cot) == 14 and all(s[2] == 400 for s in cot)  # HELM's chain-of-thought MATH: 400 tokens
    assert sum(s[1] for s in specs if s[0].startswith("math:")) == 14 * 5 + 14 * 4
    assert {s[0].split(":")[0] for s in specs} == {"math", "summarization_cnndm", "summarization_xsum"}
