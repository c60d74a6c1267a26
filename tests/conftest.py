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
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test`'s xdist workers share the cores, so do their torch threads: set before torch loads here,
    # and the kit's runs started from here inherit it (onegpu/threads.py; its usable_cores() is not called
    # here because importing it loads torch before this is set)
    share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))

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


@pytest.fixture(scope="session")
def helm_offline_run(bundled_checkpoint, tmp_path_factory):
    """(out dir, the finished process) of `onegpu eval helm --conf offline --max_eval_instances 1` on the
    bundled model: once per session (a minute or more), for tests/test_eval_helm.py and the kill tests."""
    import subprocess
    import sys

    from onegpu.eval.helm_env import helm_bin_dir

    helm_bin_dir()  # creates .venv-helm on first use (the Makefile does it before the tests)
    out = tmp_path_factory.mktemp("helm-offline") / "helm"
    proc = subprocess.run([sys.executable, "-m", "onegpu", "eval", "helm", "--checkpoint", str(bundled_checkpoint),
                           "--conf", "offline", "--max_eval_instances", "1", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return out, proc


def exportable_tiny(out: Path, bundled: Path) -> Path:
    """The random-init tiny model (``finetune.tiny.make_tiny_checkpoint``) with the HF config an HF
    export (``onegpu model push``) needs: a 25 MB stand-in for the bundled model's 540 MB."""
    from transformers import LlamaConfig

    from onegpu.finetune.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(out, bundled)
    LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024).to_json_file(out / "config.json")
    return out


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


@pytest.fixture(scope="module")
def vllm_server(bundled_checkpoint, tmp_path_factory):
    """`onegpu serve --engine vllm` on the bundled model, started once for the test file that uses it (vLLM's
    start-up with its warm-up compile takes 2-4 minutes on a 2-core CPU) and stopped after its last test, so
    it holds no memory while the rest of the suite runs. Skipped, saying why, without vLLM."""
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


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run's ``.wandb`` file (W&B's leveldb-style log: 32 KiB
    blocks of records, each a full record or first / middle / last pieces of one)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, header, block = Path(path).read_bytes(), 7, 32 * 1024  # header: ":W&B", magic, version
    pos, raw, pending = header, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first ; middle / last
        if kind in (1, 4):
            raw.append(pending)
    records = []
    for item in raw:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(item)
        records.append(record)
    return records


# Fake credentials: set where the kit could leak them (environment, flags, build secrets), then searched
# for, byte for byte, in whatever it wrote (tests/test_secrets.py, tests/test_image.py).
FAKE_SECRETS = {"HF_TOKEN": "hf_fAkEtOkEn4TeStS0nlYxQzW7p", "HUGGING_FACE_HUB_TOKEN": "hf_sEcOnDfAkE9tOkEnVbNmR2",
                "WANDB_API_KEY": "0123456789abcdeffedcba9876543210fa4e5ec7", "--token": "hf_pAsSeDaSaFlAg7tOkEnKzY3"}


def secret_hits(*roots: Path) -> list[str]:
    """``path: NAME`` for every file under ``roots`` (or file given) that holds one of ``FAKE_SECRETS``."""
    found = []
    for root in map(Path, roots):
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {name}" for name, value in FAKE_SECRETS.items() if value.encode() in data]
    return found


# `make test` runs the suite in pytest-xdist workers (`-n 2 --dist loadgroup`, Makefile): these fixtures
# cost a minute or more each and serve several files or spread tests, so the tests that use one share a
# worker. Only fixtures a test names count (test_server.py fetches vllm_server by name: its file's group).
SHARED_ONCE = ("helm_offline_run", "val_reference")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """Which tests share a worker, and which start first, when the suite runs in xdist workers.

    A test file's tests run in one worker (its module fixtures are made once), but in a file marked
    `spread` each test may go to any worker, and tests using one of SHARED_ONCE stay together. The groups
    holding slow tests are handed out first (xdist sends groups in this order under
    --no-loadscope-reorder): the long ones start early and the quick ones even out the end."""
    if not getattr(config.option, "loadgroup", False):  # set in each xdist worker under --dist loadgroup
        return
    group_of = {}
    for item in items:
        shared = next((name for name in SHARED_ONCE if name in item.fixturenames), None)
        spread = item.get_closest_marker("spread") is not None
        group_of[item] = shared or (f"{item.module.__name__}.{item.originalname}" if spread else item.module.__name__)
        item.add_marker(pytest.mark.xdist_group(group_of[item]))
    first: dict[str, int] = {}
    slow: set[str] = set()
    for index, item in enumerate(items):
        first.setdefault(group_of[item], index)
        if item.get_closest_marker("slow") is not None:
            slow.add(group_of[item])
    items.sort(key=lambda item: (group_of[item] not in slow, first[group_of[item]]))


def pytest_terminal_summary(terminalreporter) -> None:
    """Where the suite's time went: seconds per test file (setup + call + teardown; in xdist workers, the
    workers' seconds added up), the slowest first, and the share of the tests marked `slow` (those
    `make test-fast` leaves out)."""
    per_file: dict[str, float] = {}
    slow = fast = 0.0
    for reports in terminalreporter.stats.values():
        for report in reports:
            duration = getattr(report, "duration", None)
            if duration is None or not hasattr(report, "when"):
                continue
            path = report.nodeid.split("::")[0]
            per_file[path] = per_file.get(path, 0.0) + duration
            if "slow" in report.keywords:
                slow += duration
            else:
                fast += duration
    if not per_file:
        return
    terminalreporter.section("where the time went (seconds per test file)")
    for path, seconds in sorted(per_file.items(), key=lambda item: -item[1])[:15]:
        terminalreporter.write_line(f"{seconds:8.1f}  {path}")
    terminalreporter.write_line(f"{slow + fast:8.1f}  in all: {slow:.1f} s in tests marked slow, {fast:.1f} s in the rest"
                                f" (`make test-fast` runs the rest)")
