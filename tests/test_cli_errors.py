"""Bad input at the command line: every error is one problem line and one fix line, exit code 2,
no usage block; `onegpu serve` on a busy port fails before loading the model; run.json records a
command that re-runs as written.

Each case runs the real console script `onegpu` in a subprocess, as a user would type it.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onegpu.contracts import QUANTIZE_MODES
from onegpu.paths import REPO_ROOT

ONEGPU = str(Path(sys.executable).parent / "onegpu")


def onegpu(*args: str, cwd: Path = REPO_ROOT, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([ONEGPU, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def assert_problem_and_fix(proc: subprocess.CompletedProcess, problem: str, fix: str) -> None:
    """Exit 2; stderr is `onegpu VERB: error: PROBLEM` + `  fix: FIX` and nothing else (no usage dump)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, proc.stderr
    assert ": error: " in lines[0] and problem in lines[0], lines[0]
    assert lines[1].startswith("  fix: ") and fix in lines[1], lines[1]
    assert "usage:" not in lines[0] and "Union" not in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- parser level
@pytest.mark.parametrize("verb", [["finetune"], ["serve"], ["submission", "pack"]])
def test_unknown_quantize_mode_lists_the_valid_ones(verb):
    proc = onegpu(*verb, "--quantize", "bnb.nf5")
    assert_problem_and_fix(proc, "--quantize: 'bnb.nf5' is not a valid value", ", ".join(QUANTIZE_MODES))


@pytest.mark.parametrize("verb", [["finetune"], ["serve"], ["submission", "pack"]])
def test_quantize_without_the_bnb_prefix_suggests_it_and_help_shows_the_real_values(verb):
    proc = onegpu(*verb, "--quantize", "nf4")
    assert_problem_and_fix(proc, "'nf4' is not a valid value", "did you mean bnb.nf4?")
    help_text = " ".join(onegpu(*verb, "--help").stdout.split())  # unwrapped
    assert "{" + ", ".join(QUANTIZE_MODES) + "} or null" in help_text  # not jsonargparse's "Literal['nf4', ...]"
    assert "Literal[" not in help_text


def test_unknown_option_suggests_the_closest_one():
    proc = onegpu("finetune", "--lora_rank", "16")
    assert_problem_and_fix(proc, "onegpu finetune has no option --lora_rank", "did you mean --lora_r?")
    assert_problem_and_fix(onegpu("finetune", "--lora_rank=16"), "no option --lora_rank", "did you mean --lora_r?")


def test_unknown_key_in_a_config_file_names_the_file_and_the_closest_key(tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text("lora_rank: 16\nlearning_rate: 0.001\n")
    proc = onegpu("finetune", "--config", config)
    assert_problem_and_fix(proc, f"unknown key 'lora_rank' in {config}", "did you mean lora_r?")
    config.write_text("quantize: nf4\n")  # a bad value from a file says which file
    assert_problem_and_fix(onegpu("finetune", "--config", config), f"'quantize' (in {config})", "bnb.nf4")


@pytest.mark.slow
def test_other_parser_errors_are_problem_and_fix():
    assert_problem_and_fix(onegpu("finetune", "--lora_r", "abc"), "--lora_r: 'abc' is not valid", "type int")
    assert_problem_and_fix(onegpu("report", "--maximize", "maybe"), "--maximize", "true or false")
    assert_problem_and_fix(onegpu("finetune", "--lora_r"), "--lora_r needs a value", "--lora_r VALUE")
    assert_problem_and_fix(onegpu("data", "build"), "missing RECIPE", "onegpu data build RECIPE")
    assert_problem_and_fix(onegpu("data", "build", "a.yaml", "b.yaml"), "unexpected argument(s): b.yaml",
                           "usage: onegpu data build RECIPE [--OPTION VALUE ...]")
    assert_problem_and_fix(onegpu("model", "prepare", "org/a", "org/b"), "unexpected argument(s): org/a org/b",
                           "usage: onegpu model prepare [MODEL] [--OPTION VALUE ...]")
    assert_problem_and_fix(onegpu("finetune", "--config", "no-such.yaml"), "--config no-such.yaml does not exist",
                           "check the path")
    # a positional argument written as an option says to give it bare
    assert_problem_and_fix(onegpu("model", "push", "--checkpoint", "runs/ft/final"),
                           "onegpu model push takes CHECKPOINT positionally, not as --checkpoint",
                           "onegpu model push runs/ft/final [--OPTION VALUE ...]")


def test_a_config_file_that_is_not_a_mapping_says_so(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- lora_r\n- 16\n")
    assert_problem_and_fix(onegpu("finetune", "--config", config), f"--config {config} is a YAML list, not a mapping",
                           "`key: value`")


# ----------------------------------------------------------------------- the kit's own checks
@pytest.mark.slow
def test_source_suite_and_conf_typos_suggest_the_closest_name(tmp_path, bundled_checkpoint):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: typo\nsources:\n  - {name: doly, weight: 1}\n")
    assert_problem_and_fix(onegpu("data", "build", recipe, "--out", tmp_path / "data"), "unknown source 'doly'",
                           "did you mean dolly?")
    assert_problem_and_fix(onegpu("eval", "val", "--checkpoint", bundled_checkpoint, "--suite", "ofline",
                                  "--out", tmp_path / "val"), "unknown suite 'ofline'", "did you mean offline?")
    assert_problem_and_fix(onegpu("eval", "helm", "--checkpoint", bundled_checkpoint, "--conf", "open-60",
                                  "--out", tmp_path / "helm"), "unknown HELM conf 'open-60'", "did you mean open-600?")


def test_serve_on_a_busy_port_fails_before_loading_the_model(bundled_checkpoint):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        t0 = time.monotonic()
        proc = onegpu("serve", "--checkpoint", bundled_checkpoint, "--port", port, timeout=120)
        elapsed = time.monotonic() - t0
    assert_problem_and_fix(proc, f"cannot listen on 127.0.0.1:{port}: Address already in use", "--port ")
    assert "[onegpu serve] loading" not in proc.stderr  # the model was never loaded
    suggested = int(proc.stderr.split("--port ")[1].split(")")[0])
    with socket.socket() as probe:  # the suggested port is free
        probe.bind(("127.0.0.1", suggested))
    assert elapsed < 60, elapsed


# --------------------------------------------------------------------------------- run.json
def test_run_json_command_reruns_as_written(tmp_path):
    """`python -m onegpu ...` (how the quickstart launches verbs) is recorded as `onegpu ...`, shell-quoted."""
    for name, score in (("run 1", 0.3), ("run2", 0.2)):
        (tmp_path / name / "eval-val").mkdir(parents=True)
        (tmp_path / name / "eval-val" / "results.json").write_text(json.dumps({"stage": "eval-val", "val_score": score}))
    out = tmp_path / "cmp out"
    first = subprocess.run([sys.executable, "-m", "onegpu", "eval", "compare", "run 1", "run2", "--out", "cmp out"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    meta = json.loads((out / "run.json").read_text())
    assert meta["command"] == "onegpu eval compare 'run 1' run2 --out 'cmp out'"
    assert meta["cwd"] == str(tmp_path)
    (out / "results.json").unlink()
    env = {**os.environ, "PATH": f"{Path(ONEGPU).parent}{os.pathsep}{os.environ['PATH']}"}
    again = subprocess.run(meta["command"], shell=True, capture_output=True, text=True, cwd=meta["cwd"], env=env,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["runs"][0]["name"] == "run 1"
    assert shlex.split(json.loads((out / "run.json").read_text())["command"])[:3] == ["onegpu", "eval", "compare"]
