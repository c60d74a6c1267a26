"""Which W&B mode a run uses: the user's and the agent's choice wins; offline only when nothing says otherwise.

Environment variables and W&B's own settings files only (written by the real `wandb offline` /
`wandb disabled` commands); nothing here talks to a server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onegpu.tracking import Run, wandb_mode, wandb_online

WANDB_CLI = Path(sys.executable).parent / "wandb"


@pytest.fixture
def clean_wandb_env(tmp_path, monkeypatch):
    """No WANDB_* choice in the environment, a fresh working dir and W&B config dir."""
    for name in ("WANDB_MODE", "WANDB_SWEEP_ID", "WANDB_DISABLED", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _wandb_cli(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    subprocess.run([str(WANDB_CLI), *args], check=True, capture_output=True, env=env, timeout=120)


def test_offline_when_nothing_says_otherwise(clean_wandb_env):
    assert wandb_mode() == ("offline", "default (nothing set WANDB_MODE)")
    assert os.environ["WANDB_MODE"] == "offline"  # exported, so the stages this process launches agree
    assert not wandb_online()


@pytest.mark.parametrize("mode", ["online", "disabled", "offline"])
def test_wandb_mode_env_wins(clean_wandb_env, monkeypatch, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    assert wandb_mode() == (mode, "WANDB_MODE")
    assert wandb_online() == (mode == "online")


def test_sweep_agent_runs_are_not_forced_offline(clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # what `wandb agent` sets for the runs it starts
    assert wandb_mode() == ("online", "wandb agent (WANDB_SWEEP_ID)")
    assert "WANDB_MODE" not in os.environ  # W&B's own settings decide, nothing exported


def test_wandb_offline_and_disabled_settings_are_respected(clean_wandb_env, monkeypatch):
    _wandb_cli("offline")
    mode, source = wandb_mode()
    assert mode == "offline" and "settings file" in source
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # an agent on a machine set to `wandb offline`
    assert wandb_mode() == ("offline", "wandb agent (WANDB_SWEEP_ID)")
    monkeypatch.delenv("WANDB_SWEEP_ID")
    _wandb_cli("disabled")
    run = Run("test", clean_wandb_env / "run", {"x": 1})  # a real run: disabled means no W&B files at all
    run.log({"loss": 1.0}, step=1)
    run.finish()
    assert run.meta["wandb_mode"] == "disabled" and "settings file" in run.meta["wandb_mode_source"]
    assert not (clean_wandb_env / "run" / "wandb").exists() and (clean_wandb_env / "run" / "metrics.jsonl").is_file()
    _wandb_cli("online")  # clears the setting: back to onegpu's default
    assert wandb_mode() == ("offline", "default (nothing set WANDB_MODE)")
