"""One inference layer (onegpu/inference.py) under `onegpu serve` and `onegpu eval val`.

The server's engine and eval's lm-eval model load a checkpoint through the same function, so they
see the same weights, dtype, token ids (the same BOS decision) and logits; also for a renamed
fine-tune, where litgpt's name-based BOS rule alone would decide differently. Plus the pieces:
adapter merge, the HF export, the dtype and quantize rules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from onegpu import inference
from onegpu.contracts import QUANTIZE_MODES
from onegpu.errors import UserError

pytestmark = pytest.mark.slow
PROMPT = "Question: What is the capital of France?\nAnswer:"


def _upstream_copy(bundled: Path, dest: Path) -> Path:
    """The bundled model's files (weights symlinked) with upstream SmolLM2's tokenizer config: no
    ``add_bos_token``, so litgpt decides BOS from the dir *name* (SmolLM2-*-Instruct: yes)."""
    dest.mkdir(parents=True)
    for item in bundled.iterdir():
        if item.name != "tokenizer_config.json":
            (dest / item.name).symlink_to(item)
    config = json.loads((bundled / "tokenizer_config.json").read_text())
    config.pop("add_bos_token")
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture(scope="module")
def renamed(bundled_checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("renamed")
    base = _upstream_copy(bundled_checkpoint, root / "SmolLM2-135M-Instruct")
    final = _upstream_copy(bundled_checkpoint, root / "run" / "final")  # a fine-tune's out/final of it
    (final / "hyperparameters.yaml").write_text(yaml.safe_dump({"checkpoint_dir": str(base)}))
    copy = _upstream_copy(bundled_checkpoint, root / "my-model")  # renamed, no record of its base
    return {"base": base, "final": final, "copy": copy}


@pytest.fixture(params=["bundled", "adapter-only", "renamed fine-tune", "renamed copy"])
def case(request, bundled_checkpoint, lora_adapter, renamed) -> tuple[Path, Path]:
    """(checkpoint source, the base model it was fine-tuned from: the dir whose tokenizer trained it)."""
    return {"bundled": (bundled_checkpoint, bundled_checkpoint),
            "adapter-only": (lora_adapter, bundled_checkpoint),
            "renamed fine-tune": (renamed["final"], renamed["base"]),
            "renamed copy": (renamed["copy"], renamed["copy"])}[request.param]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core CI: a second thread spin-waits more than it computes
    yield
    torch.set_num_threads(threads)


def test_serve_and_eval_val_load_through_one_function_and_agree(case, monkeypatch, one_thread):
    from litgpt.tokenizer import Tokenizer

    from onegpu.eval.lm import LitGPTLM
    from onegpu.submission.engine import Engine

    source, trained_from = case
    loads = []
    real_load = inference.load

    def recorded_load(*args, **kwargs):
        loads.append(real_load(*args, **kwargs))
        return loads[-1]

    monkeypatch.setattr(inference, "load", recorded_load)
    engine = Engine(source, device="cpu", prompt_style="raw", max_batch_size=1, max_seq_length=128,
                    prefix_cache_mb=0)
    try:
        lm = LitGPTLM(source, device="cpu", prompt_style="raw")
        assert len(loads) == 2 and loads[0].checkpoint == loads[1].checkpoint
        assert engine.dtype == lm.dtype == inference.default_dtype("cpu") == torch.float32

        # the BOS decision: what litgpt's tokenizer of the base decided when the model was fine-tuned
        trained_bos = Tokenizer(trained_from).use_bos
        assert engine.tokenizer.use_bos == lm.add_bos_token == trained_bos
        if source.name == "final":  # litgpt's rule on the renamed dir alone would drop the BOS
            assert trained_bos and not Tokenizer(source).use_bos
        ids = engine.encode(PROMPT)
        assert ids == lm.tok_encode(PROMPT)
        assert (ids[0] == engine.tokenizer.bos_id) == trained_bos

        served, evaluated = engine.logits(ids), lm.logits(torch.tensor([ids]))[0]
        assert served.shape == evaluated.shape == (len(ids), lm.vocab_size)
        assert torch.equal(served, evaluated)
    finally:
        engine.shutdown()


def test_adapter_only_dir_equals_litgpt_merge(lora_adapter, bundled_checkpoint, tmp_path, one_thread):
    """A dir with only lit_model.pth.lora + hyperparameters.yaml loads as litgpt's merge_lora output."""
    from litgpt.scripts.merge_lora import merge_lora

    ref = inference.locate_checkpoint(lora_adapter)
    assert ref.is_adapter and ref.base == ref.trained_from == bundled_checkpoint
    ours = inference.load(lora_adapter, device="cpu", prompt_style="raw").model

    reference_dir = tmp_path / "merged"
    shutil.copytree(lora_adapter, reference_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # merge_lora checks they are there
        shutil.copy(bundled_checkpoint / name, reference_dir / name)
    merge_lora(reference_dir, pretrained_checkpoint_dir=bundled_checkpoint)
    reference = inference.load_model(reference_dir, torch.device("cpu"), torch.float32)
    plain = inference.load_model(bundled_checkpoint, torch.device("cpu"), torch.float32)

    idx = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want, base_out = ours(idx), reference(idx), plain(idx)
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, base_out, atol=1e-3)  # the adapter really changed the model


def test_hf_export_loads_in_transformers_with_the_same_logits(lora_adapter, tmp_path, one_thread):
    """The one exporter (finetune --export_hf, model push): adapter merged, tied embeddings stored once."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = inference.export_hf(lora_adapter, tmp_path / "hf")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()}
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # SmolLM2 ties it to the embeddings
    hf_model, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    loaded = inference.load(lora_adapter, device="cpu", prompt_style="raw")
    ids = loaded.tokenizer.encode(PROMPT).tolist()
    assert AutoTokenizer.from_pretrained(str(out), add_bos_token=loaded.tokenizer.use_bos).encode(PROMPT) == ids
    with torch.inference_mode():
        theirs = hf_model.eval()(torch.tensor([ids])).logits[0]
        ours = loaded.model(torch.tensor([ids]))[0]
    assert torch.allclose(theirs, ours, atol=1e-4)


def test_dtype_and_quantize_rules_fail_before_loading(bundled_checkpoint):
    assert inference.resolve_dtype("auto", "cpu") == inference.default_dtype("cpu") == torch.float32
    with pytest.raises(UserError, match="float8"):
        inference.resolve_dtype("float8", "cpu")
    with pytest.raises(UserError) as err:
        inference.check_quantize("bnb.nf5", torch.device("cuda"))
    assert all(mode in err.value.fix for mode in QUANTIZE_MODES)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        inference.check_quantize("bnb.nf4", torch.device("cpu"))

    # `onegpu serve --quantize` takes the contract's modes; the Docker image's ONEGPU_QUANTIZE is checked too
    serve = [sys.executable, "-m", "onegpu", "serve", "--checkpoint", str(bundled_checkpoint), "--device", "cpu"]
    flag = subprocess.run([*serve, "--quantize", "bnb.nf5"], capture_output=True, text=True, timeout=120)
    assert flag.returncode == 2 and all(mode in flag.stderr for mode in QUANTIZE_MODES)
    env = dict(os.environ, ONEGPU_QUANTIZE="bnb.nf4")
    from_env = subprocess.run(serve, capture_output=True, text=True, timeout=120, env=env)
    assert from_env.returncode == 2 and "needs a CUDA GPU" in from_env.stderr and "Traceback" not in from_env.stderr
