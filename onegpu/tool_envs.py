"""Tools that live in virtual envs of their own: HELM (``eval/helm_env.py``) and vLLM (``submission/vllm_env.py``).

Their pins clash with the kit's, and they talk to the kit over HTTP or a socket only, so each gets a
venv in the checkout, created on first use and marked complete by an ``.installed`` file; a file lock
makes concurrent first uses (parallel tests) build it once. Whether the machine has an NVIDIA GPU
decides which torch build an env gets.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from onegpu.errors import UserError


def has_nvidia_gpu() -> bool:
    """An NVIDIA GPU that the driver sees (``nvidia-smi -L`` lists one)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def ready_venv(venv: Path, create: Callable[[Path], None], *, allowed: bool, what: str, make_target: str) -> Path:
    """``venv``, created by ``create`` once (under a lock) unless it is complete already; refused when
    it is missing and creating it is not ``allowed``."""
    marker = venv / ".installed"
    if marker.is_file():
        return venv
    if not allowed:
        raise UserError(f"{what} is not installed ({venv} missing)", fix=f"run `make {make_target}`")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(str(venv) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.is_file():
            create(venv)
            marker.touch()
    return venv


def install_step(cmd: list[str], what: str, fix: str, check: bool = True) -> bool:
    """One step of creating an env (pip, a smoke import); a failure names the step and its stderr."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and check:
        raise UserError(f"creating {what} failed at `{' '.join(cmd)}`:\n{result.stderr[-2000:]}", fix=fix)
    return result.returncode == 0
