"""Where HELM's commands come from.

crfm-helm pins packages that break the model env (it pulls torchvision, which fails to load
beside torch 2.13), and HELM only talks HTTP to our server anyway, so it lives in its own virtual
env: ``.venv-helm`` in the checkout, created on first use (about 2 minutes, from the registry).

Lookup order: ``ONEGPU_HELM_BIN`` (a dir holding helm-run), then ``.venv-helm/bin``, then creating
``.venv-helm``. A file lock makes concurrent first uses (parallel tests) build it once.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from onegpu.errors import UserError
from onegpu.paths import REPO_ROOT

HELM_VERSION = "0.5.16"


def helm_venv_dir() -> Path:
    return Path(os.environ.get("ONEGPU_HELM_VENV", REPO_ROOT / ".venv-helm"))


def helm_bin_dir(create: bool = True) -> Path:
    """The dir holding ``helm-run`` and ``helm-summarize``; creates the HELM env if allowed."""
    env = os.environ.get("ONEGPU_HELM_BIN")
    if env:
        path = Path(env)
        if not (path / "helm-run").exists():
            raise UserError(f"ONEGPU_HELM_BIN={env} has no helm-run in it",
                            fix="point it at the bin/ dir of an env with crfm-helm installed, or unset it")
        return path
    venv = helm_venv_dir()
    marker = venv / ".installed"
    if marker.is_file():
        return venv / "bin"
    if not create:
        raise UserError(f"HELM is not installed ({venv} missing)", fix="run `make helm-venv`")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(str(venv) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.is_file():
            print(f"[onegpu] creating the HELM env in {venv} (crfm-helm=={HELM_VERSION}, once)", file=sys.stderr)
            steps = [
                [sys.executable, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"crfm-helm=={HELM_VERSION}"],
            ]
            for cmd in steps:
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode != 0:
                    raise UserError(f"creating the HELM env failed at `{' '.join(cmd)}`:\n{result.stderr[-2000:]}",
                                    fix="check registry access, or install crfm-helm yourself and set ONEGPU_HELM_BIN")
            marker.touch()
    return venv / "bin"
