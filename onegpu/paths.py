"""Where things live: cache, runs, and offline dataset copies.

Every location can be moved with an environment variable so CI, tests and users on shared
machines can keep state out of $HOME.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def stage_dir(stage: str) -> Path:
    """The folder of a stage package (``data``, ``finetune``, ...), in a checkout or installed."""
    spec = importlib.util.find_spec(f"onegpu.{stage}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Model checkpoints and other one-off conversions. ``ONEGPU_CACHE`` overrides."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onegpu"
    return Path(os.environ.get("ONEGPU_CACHE", default)).expanduser()


def runs_dir() -> Path:
    """Default parent of run outputs. ``ONEGPU_RUNS`` overrides."""
    return Path(os.environ.get("ONEGPU_RUNS", Path.cwd() / "runs")).expanduser()


def shared_datasets_dir() -> Path | None:
    """Local copies of public datasets (``ONEGPU_DATA_DIR``, else ``../shared/datasets`` beside the repo).

    Returns None when neither exists: callers then load from the Hugging Face Hub.
    """
    env = os.environ.get("ONEGPU_DATA_DIR")
    if env:
        return Path(env).expanduser()
    candidate = REPO_ROOT.parent / "shared" / "datasets"
    return candidate if candidate.is_dir() else None


def shared_reference_dir() -> Path | None:
    """The challenge reference folder (HELM confs, API contract) beside the repo, if present."""
    candidate = REPO_ROOT.parent / "shared" / "reference"
    return candidate if candidate.is_dir() else None
