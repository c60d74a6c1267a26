"""Where HELM's commands come from.

crfm-helm pins packages that break the model env (its torchvision fails to load beside torch
2.13's CPU build), and HELM only talks HTTP to our server anyway, so it lives in its own virtual
env: ``.venv-helm`` in the checkout, created on first use (a few minutes, from the registry).

Footprint: a plain ``pip install crfm-helm`` takes PyPI's torch, the CUDA build, with ~3 GB of
nvidia libraries, even on a machine without a GPU. So on a machine without an NVIDIA GPU the env
gets the CPU build of the kit's own torch version, and no torchvision (PyPI only has CUDA builds of
it, which fail to import beside a CPU torch; HELM needs it only for image metrics). With a GPU
it gets the kit's torch version from the registry (the CUDA build) and the torchvision matching it.

Lookup order: ``ONEGPU_HELM_BIN`` (a dir holding helm-run), then ``.venv-helm/bin``
(``ONEGPU_HELM_VENV`` moves it), then creating it (``onegpu/tool_envs.py``: once, under a lock).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from onegpu.errors import UserError
from onegpu.paths import REPO_ROOT
from onegpu.tool_envs import has_nvidia_gpu, install_step, ready_venv

HELM_VERSION = "0.5.16"
CPU_INDEX_HINT = "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"  # where PyTorch's CPU builds live


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
    return ready_venv(helm_venv_dir(), create_helm_venv, allowed=create, what="HELM", make_target="helm-venv") / "bin"


def create_helm_venv(venv: Path) -> None:
    """A venv with crfm-helm and a torch build that fits this machine (see the module docstring)."""
    python = str(venv / "bin" / "python")
    torch_version = metadata.version("torch").split("+")[0]  # the kit's own, so both envs share pip's cache
    gpu = has_nvidia_gpu()
    print(f"[onegpu] creating the HELM env in {venv} (crfm-helm=={HELM_VERSION}, torch {torch_version} "
          f"{'CUDA' if gpu else 'CPU'} build; once, a few minutes)", file=sys.stderr)
    _step([sys.executable, "-m", "venv", str(venv)])
    _step([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    cpu_torch = f"torch=={torch_version}+cpu"
    if not gpu and _step([python, "-m", "pip", "install", "-q", cpu_torch], check=False):
        # crfm-helm's own requirements, less torchvision (but with pillow, which it brings and
        # helm-summarize imports); torch stays the CPU build just installed.
        _step([python, "-m", "pip", "install", "-q", "--no-deps", f"crfm-helm=={HELM_VERSION}"])
        _step([python, "-m", "pip", "install", "-q", cpu_torch, "pillow",
               *helm_requirements(venv, leave_out={"torchvision"})])
    else:
        if not gpu:
            print(f"[onegpu] note: no CPU build of torch {torch_version} on the configured indexes; the HELM env gets "
                  f"the default (CUDA) build, ~3 GB more. For the CPU build, re-run with {CPU_INDEX_HINT} after "
                  f"removing {venv}", file=sys.stderr)
        _step([python, "-m", "pip", "install", "-q", f"crfm-helm=={HELM_VERSION}", f"torch=={torch_version}"])
    for tool in ("helm-run", "helm-summarize"):  # import what an eval runs: fail here, not mid-eval
        _step([str(venv / "bin" / tool), "--help"])


def helm_requirements(venv: Path, leave_out: set[str]) -> list[str]:
    """crfm-helm's unconditional requirements as installed in ``venv`` (no extras), less ``leave_out``."""
    site = next((venv / "lib").glob("python*/site-packages"))
    dist = next(d for d in metadata.distributions(path=[str(site)]) if d.metadata["Name"] == "crfm-helm")
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.name.lower() in leave_out or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        out.append(str(req))
    return out


def _step(cmd: list[str], check: bool = True) -> bool:
    return install_step(cmd, "the HELM env", check=check,
                        fix="check registry access, or install crfm-helm yourself and set ONEGPU_HELM_BIN")
