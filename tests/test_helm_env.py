"""The HELM env that onegpu builds (`make helm-venv`, or the first `onegpu eval helm`) fits the
machine: on one without an NVIDIA GPU, torch's CPU build, no nvidia libraries, no torchvision (its
registry builds are CUDA builds that break beside a CPU torch), and HELM's tools start."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from onegpu.eval.helm_env import has_nvidia_gpu, helm_bin_dir

pytestmark = pytest.mark.skipif(bool(os.environ.get("ONEGPU_HELM_BIN")),
                                reason="ONEGPU_HELM_BIN points at an env onegpu did not build")


def _installed(python) -> dict[str, str]:
    code = "import importlib.metadata as m, json; print(json.dumps({d.metadata['Name'].lower(): d.version " \
           "for d in m.distributions()}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_helm_env_fits_the_machine_and_its_tools_start():
    bin_dir = helm_bin_dir()  # builds it if `make helm-venv` has not
    installed = _installed(bin_dir / "python")
    assert installed["crfm-helm"]
    if has_nvidia_gpu():
        assert not installed["torch"].endswith("+cpu") and "torchvision" in installed
    else:
        assert installed["torch"].endswith("+cpu"), installed["torch"]
        assert not [n for n in installed if n.startswith("nvidia-")] and "torchvision" not in installed
    for tool in ("helm-run", "helm-summarize"):
        proc = subprocess.run([str(bin_dir / tool), "--help"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr[-2000:]
