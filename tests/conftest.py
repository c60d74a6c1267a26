"""Shared fixtures: the bundled model (prepared once per test session) and offline W&B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from onegpu.paths import REPO_ROOT

# Tests never touch the network or a W&B account, and keep their caches inside the checkout.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("ONEGPU_CACHE", str(REPO_ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.skip("../shared/datasets is not beside the checkout")
    return path


@pytest.fixture(scope="session")
def bundled_checkpoint() -> Path:
    """The litgpt checkpoint of the bundled SmolLM2-135M-Instruct (converted once, then cached)."""
    from onegpu.model import prepare

    return prepare()


def default_sigint() -> None:
    """Popen preexec_fn: give the child the default Ctrl-C behaviour.

    A shell started in the background (nohup, `cmd &`, some CI runners) hands its children SIGINT
    *ignored*, and Python then never raises KeyboardInterrupt; tests that send Ctrl-C need it back.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
