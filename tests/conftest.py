"""Shared fixtures: the bundled model (prepared once per test session) and offline W&B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from onegpu.paths import REPO_ROOT

# Tests never touch the network or a W&B account, and keep their caches inside the checkout.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("ONEGPU_CACHE", str(REPO_ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.skip("../shared/datasets is not beside the checkout")
    return path


@pytest.fixture(scope="session")
def bundled_checkpoint() -> Path:
    """The litgpt checkpoint of the bundled SmolLM2-135M-Instruct (converted once, then cached)."""
    from onegpu.model import prepare

    return prepare()


def make_adapter(base: Path, out: Path) -> Path:
    """A small random LoRA adapter on ``base``, laid out as litgpt's finetune writes it (no merged weights)."""
    import shutil

    import torch
    import yaml
    from litgpt.lora import GPT as LoRAGPT
    from litgpt.lora import Config as LoRAConfig
    from litgpt.prompts import save_prompt_style

    hparams = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_query": True, "lora_value": True}
    config = LoRAConfig.from_file(base / "model_config.yaml", **hparams)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LoRAGPT(config).state_dict().items() if "lora_" in k}
    generator = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in shapes.items()}
    out.mkdir(parents=True)
    torch.save(weights, out / "lit_model.pth.lora")
    (out / "hyperparameters.yaml").write_text(yaml.safe_dump(
        {"checkpoint_dir": str(base), "precision": "32-true", **hparams}))
    shutil.copy(base / "model_config.yaml", out / "model_config.yaml")
    save_prompt_style("smollm2", out)
    return out


@pytest.fixture(scope="session")
def lora_adapter(bundled_checkpoint, tmp_path_factory) -> Path:
    """An adapter-only dir on the bundled model (``make_adapter``), merged by whoever loads it."""
    return make_adapter(bundled_checkpoint, tmp_path_factory.mktemp("adapter") / "out-final")


# `onegpu serve --engine vllm` as the contract tests use it (tests/test_server.py): the onegpu
# server there runs with the same context, rows and threads. A 64 MB prefix cache keeps vLLM's
# CPU KV cache at ~0.44 GB; a 256-token step budget makes vLLM prefill longer prompts in chunks (the
# onegpu server there uses 64-token chunks).
VLLM_SERVE_ARGS = ("--engine", "vllm", "--prompt_style", "raw", "--max_batch_size", "16", "--max_seq_length", "512",
                   "--num_threads", "1", "--prefix_cache_mb", "64", "--vllm_args", '{"max_num_batched_tokens": 256}')


@pytest.fixture(scope="session")
def vllm_server(bundled_checkpoint, tmp_path_factory):
    """`onegpu serve --engine vllm` on the bundled model, started once per test session: vLLM's start-up
    (with its warm-up compile) takes 2-4 minutes on a 2-core CPU. Skipped, saying why, without vLLM."""
    from onegpu.errors import UserError
    from onegpu.submission.launch import running_server
    from onegpu.submission.vllm_env import vllm_python

    try:
        vllm_python()  # creates .venv-vllm on first use (`make test` does it before the tests)
    except UserError as err:
        pytest.skip(f"vLLM is not available here, so the --engine vllm tests are skipped: {err}")
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with running_server(bundled_checkpoint, *VLLM_SERVE_ARGS, timeout=1200, log_path=log) as base_url:
        yield base_url


def default_sigint() -> None:
    """Popen preexec_fn: give the child the default Ctrl-C behaviour.

    A shell started in the background (nohup, `cmd &`, some CI runners) hands its children SIGINT
    *ignored*, and Python then never raises KeyboardInterrupt; tests that send Ctrl-C need it back.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
