"""Fuzz `onegpu serve` from its own OpenAPI schema (schemathesis): valid and invalid requests, 0 x 5xx.

A second server, with a 96-token context (so fuzzed generations stay short on CPU) and the model's
chat template (``--prompt_style smollm2``), which also checks that template text never leaks out.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from submission.launch import running_server


@pytest.fixture(scope="module")
def fuzz_server(bundled_checkpoint):
    with running_server(bundled_checkpoint, "--prompt_style", "smollm2", "--max_seq_length", "96",
                        "--max_batch_size", "8", "--num_threads", "1") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_fuzzed_requests_never_get_a_5xx(api_schema, fuzz_server, mode):
    # schemathesis' pytest plugin does not run under pytest 9 here: drive its strategies with hypothesis
    seen = set()

    def short(case):
        # valid /process bodies may ask for up to the context's 94 tokens; fewer keeps the fuzz quick on
        # CPU (limits are tested in test_server.py and by the invalid mode)
        if mode == GenerationMode.POSITIVE and case.operation.path == "/process" and isinstance(case.body, dict):
            case.body["max_new_tokens"] = min(case.body.get("max_new_tokens", 50), 8)
        return case

    @given(case=api_schema.as_strategy(generation_mode=mode).map(short))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None, phases=[Phase.explicit, Phase.generate])
    def check(case):
        seen.add(case.operation.path)
        # every default check: no 5xx, documented status codes and response schemas, and (invalid mode)
        # invalid data rejected with a 4xx
        case.call_and_validate(base_url=fuzz_server, timeout=120)

    check()
    assert seen >= {"/process", "/tokenize", "/decode"}


def test_template_wraps_the_prompt_and_never_leaks(fuzz_server):
    body = {"prompt": "What is the capital of France?", "temperature": 1e-7, "max_new_tokens": 40}
    result = httpx.post(f"{fuzz_server}/process", json=body, timeout=120).json()
    assert result["text"].strip()
    for marker in ("<|im_start|>", "<|im_end|>", "assistant\n", "You are a helpful AI assistant"):
        assert marker not in result["text"]
    assert len(result["tokens"]) < 40, "the template's stop token (<|im_end|>) should end the answer"
    assert httpx.get(f"{fuzz_server}/health").json()["prompt_style"] == "SmolLM2"
