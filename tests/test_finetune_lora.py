"""End to end on real models: LoRA and QLoRA-nf4 reduce the loss, out/final is a plain litgpt checkpoint,
and the telemetry's token counts are exactly the data's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from onegpu.finetune.tiny import make_data_dir, make_tiny_checkpoint, shared_rows


@pytest.fixture(scope="module")
def short_data(tmp_path_factory, shared_datasets) -> Path:
    """The 6 shortest real examples (Dolly / Self-Instruct / LIMA) in the data-stage layout."""
    out = tmp_path_factory.mktemp("short")
    rows = sorted(shared_rows(shared_datasets), key=lambda r: len(r["instruction"] + r["input"] + r["output"]))
    rows = [r for r in rows if len(r["output"]) > 20][:6]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (out / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    (out / "manifest.json").write_text(json.dumps({"recipe_hash": "test-short", "prompt_style": "alpaca",
                                                   "max_seq_length": 256, "name": "short-mix"}))
    return out


def _run(out, data, ckpt, **kw):
    from onegpu.finetune.verbs import finetune

    args = dict(data=str(data), checkpoint_dir=ckpt, out_dir=out, max_steps=4, micro_batch_size=1,
                global_batch_size=1, learning_rate=3e-3, warmup_steps=0, lora_dropout=0.0, eval_interval=0,
                num_samples=0, num_threads=2, progress=False, save_interval=0)
    args.update(kw)
    return finetune(**args)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_lora_reduces_loss_and_writes_a_merged_litgpt_checkpoint(tmp_path, short_data, bundled_checkpoint):
    out = tmp_path / "lora"
    summary = _run(out, short_data, bundled_checkpoint, num_samples=1, sample_max_new_tokens=8)
    losses = _losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses
    final = out / "final"
    for name in ("lit_model.pth", "lit_model.pth.lora", "hyperparameters.yaml", "prompt_style.yaml",
                 "onegpu_model.json", "model_config.yaml", "tokenizer.json"):
        assert (final / name).is_file(), name
    lineage = json.loads((final / "onegpu_model.json").read_text())
    manifest_digest = hashlib.sha256((short_data / "manifest.json").read_bytes()).hexdigest()
    assert lineage["data_manifest_sha256"] == manifest_digest and lineage["prompt_style"] == "alpaca"
    run = json.loads((out / "run.json").read_text())
    # no content_hash in this hand-written manifest: the data stage's rule over train.jsonl + val.jsonl
    from onegpu.contracts import dataset_content_hash

    content = dataset_content_hash(*(hashlib.sha256((short_data / f).read_bytes()).hexdigest()
                                     for f in ("train.jsonl", "val.jsonl")))
    assert run["lineage"][0] == {"artifact": "data-short-mix", "type": "dataset", "digest": content,
                                 "path": str(short_data)}
    assert lineage["dataset_digest"] == content and lineage["model_artifact"] == run["artifacts"][0]["name"]
    assert any(a["type"] == "model" for a in run["artifacts"])
    assert (out / "metrics.csv").is_file() and list((out / "wandb").glob("offline-run-*"))
    assert (out / "training_curves.png").stat().st_size > 0
    samples = json.loads((out / "samples.table.json").read_text())
    assert samples["columns"] == ["prompt", "generation"] and len(samples["data"]) == 1

    # a plain litgpt GPT loads the merged weights strictly; the merge actually changed them
    from litgpt import GPT, Config
    from litgpt.prompts import load_prompt_style

    merged = torch.load(final / "lit_model.pth", weights_only=True)
    GPT(Config.from_file(final / "model_config.yaml")).load_state_dict(merged, strict=True)
    base = torch.load(bundled_checkpoint / "lit_model.pth", weights_only=True, mmap=True)
    key = "transformer.h.0.attn.qkv.weight"
    assert not torch.equal(merged[key], base[key])
    assert type(load_prompt_style(final)).__name__ == "Alpaca"
    assert summary["trainable_params"] if "trainable_params" in summary else True
    s = json.loads((out / "summary.json").read_text())
    assert 0 < s["trainable_params"] < s["total_params"] and s["stopped_by"] == "max_steps"


@pytest.mark.slow
def test_qlora_nf4_on_cpu_reduces_loss(tmp_path, short_data, bundled_checkpoint):
    out = tmp_path / "qlora"
    summary = _run(out, short_data, bundled_checkpoint, quantize="bnb.nf4")
    losses = _losses(out)
    assert losses[-1] < losses[0] - 0.05, losses
    lineage = json.loads((out / "final" / "onegpu_model.json").read_text())
    assert lineage["method"] == "qlora" and lineage["quantize"] == "bnb.nf4"
    assert summary["steps"] == 4


@pytest.mark.slow
def test_telemetry_counts_equal_the_data(tmp_path, bundled_checkpoint, shared_datasets):
    """Over one epoch the logged non-padding tokens, loss tokens and examples are exactly the data's."""
    from litgpt.tokenizer import Tokenizer

    from onegpu.data.schema import render
    from onegpu.finetune.packing import tokenize_example

    root = tmp_path
    ckpt = make_tiny_checkpoint(root / "tiny", bundled_checkpoint)
    data = make_data_dir(root / "data", shared_datasets, n_train=40, max_seq_length=256)
    for packing in (True, False):
        out = root / f"out-{packing}"
        summary = _run(out, data, ckpt, max_steps=None, epochs=1, micro_batch_size=2, global_batch_size=2,
                       packing=packing, learning_rate=1e-3)
        tok = Tokenizer(ckpt)
        rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
        examples = [tokenize_example(tok, *render(r, "alpaca"), max_seq_length=256) for r in rows]
        examples = [e for e in examples if e.n_loss_tokens > 0]
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in logged if "tokens_seen" in r][-1]
        assert last["tokens_seen"] == summary["tokens_seen"] == sum(len(e) for e in examples)
        assert last["loss_tokens_seen"] == sum(e.n_loss_tokens for e in examples)
        assert last["examples_seen"] == len(examples)
        slots = last["tokens_seen"] + last["padding_slots_seen"]
        assert summary["packing_efficiency_overall"] == pytest.approx(last["tokens_seen"] / slots)
        assert all(r["mfu"] > 0 and r["tokens_per_s"] > 0 for r in logged if "mfu" in r)
        if packing:
            packed_eff = summary["packing_efficiency_overall"]
        else:
            assert summary["packing_efficiency_overall"] < packed_eff  # packing wastes fewer slots
