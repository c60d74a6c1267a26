"""Tiny real inputs for tests, benchmarks and the memory validation: a data dir from
../shared/datasets and a tiny litgpt model.

``make_data_dir`` writes the data-stage layout (train.jsonl, val.jsonl, manifest.json; rows built
with ``data.schema.make_row``) from the offline copies of Dolly, the Self-Instruct human-written
seed tasks and LIMA: real instruction text with a Dolly-like mix of short and long examples.
``make_tiny_checkpoint`` writes a random-init 2-layer litgpt checkpoint that uses the bundled
tokenizer, for tests that need many fast steps.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from litgpt import GPT, Config
from litgpt.utils import save_config

from onegpu.contracts import write_manifest
from onegpu.data.schema import make_row


def shared_rows(datasets_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted((datasets_dir / "dolly").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            rows.append(make_row("dolly", r["instruction"], r["response"], input=r.get("context", ""),
                                 license="CC-BY-SA-3.0", provenance="human", meta={"category": r.get("category")}))
    for path in sorted((datasets_dir / "self_instruct_human_written").glob("seed_tasks.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            inst = r["instances"][0]
            rows.append(make_row("self_instruct_seed", r["instruction"], inst["output"], input=inst.get("input", ""),
                                 license="Apache-2.0", provenance="human"))
    for path in sorted((datasets_dir / "lima").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            conv = json.loads(line)["conversations"]
            if len(conv) >= 2:
                rows.append(make_row("lima", conv[0], conv[1], license="CC-BY-NC-SA", provenance="human"))
    return rows


def make_data_dir(out: Path, datasets_dir: Path, *, n_train: int | None = None, n_val: int = 16,
                  prompt_style: str = "alpaca", max_seq_length: int = 512, seed: int = 0) -> Path:
    """A data-stage-shaped dir (train/val/manifest) from the offline datasets."""

    rows = shared_rows(datasets_dir)
    random.Random(seed).shuffle(rows)
    val, train = rows[:n_val], rows[n_val:]
    if n_train is not None:
        train = train[:n_train]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in part:
                fh.write(json.dumps(row) + "\n")
    recipe = {"sources": ["dolly", "self_instruct_seed", "lima"], "seed": seed, "n_val": n_val, "n_train": n_train}
    manifest = {
        "recipe_hash": hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest(),
        "recipe": recipe, "prompt_style": prompt_style, "max_seq_length": max_seq_length,
        "tokenizer": {"name": "SmolLM2-135M-Instruct"}, "counts": {"train": len(train), "val": len(val)},
        "seed": seed, "name": "test-mix",
    }
    write_manifest(out, manifest)
    (out / "rejects.jsonl").write_text("", encoding="utf-8")
    return out


def make_tiny_checkpoint(out: Path, tokenizer_dir: Path, *, n_layer: int = 2, n_embd: int = 64, seed: int = 0) -> Path:
    """Random-init LLaMA-shaped litgpt checkpoint (2 layers, 64 wide) with the bundled tokenizer."""

    src_cfg = Config.from_file(tokenizer_dir / "model_config.yaml")
    config = Config(
        name="tiny-llama", block_size=1024, vocab_size=src_cfg.vocab_size, padded_vocab_size=src_cfg.padded_vocab_size,
        n_layer=n_layer, n_head=4, n_query_groups=2, n_embd=n_embd, head_size=n_embd // 4, rotary_percentage=1.0,
        parallel_residual=False, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
        intermediate_size=2 * n_embd, rope_base=10000,
    )
    save_random_checkpoint(out, config, seed=seed)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def save_random_checkpoint(out: Path, config: Any, *, seed: int = 0) -> Path:
    """Random-init weights + ``model_config.yaml`` for a litgpt ``Config`` (no tokenizer)."""

    torch.manual_seed(seed)
    model = GPT(config)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "lit_model.pth")
    save_config(config, out)
    return out
