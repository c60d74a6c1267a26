"""The shared package: CLI dispatch, tracking, and the bundled model bootstrap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onegpu.model import check_allowed_base_model, is_checkpoint
from onegpu.paths import REPO_ROOT
from onegpu.tracking import Run, read_metrics


def _onegpu(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onegpu", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=600, **kw)


def test_cli_help_lists_verbs_and_unknown_verb_fails():
    out = _onegpu("--help")
    assert out.returncode == 0
    assert "model prepare" in out.stdout
    bad = _onegpu("no-such-verb")
    assert bad.returncode == 2 and "unknown verb" in bad.stderr


def test_model_prepare_prints_checkpoint_dir_last_and_reuses_it(bundled_checkpoint):
    out = _onegpu("model", "prepare")
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert Path(last) == bundled_checkpoint
    assert is_checkpoint(Path(last))
    assert "converting" not in out.stderr  # second call reuses the cache
    assert "not an allowed base model" in out.stderr  # SmolLM2-Instruct is a demo model, not a legal base
    provenance = json.loads((bundled_checkpoint / "onegpu_model.json").read_text())
    assert provenance["license"] == "Apache-2.0" and len(provenance["gguf_sha256"]) == 64


def test_bundled_tokenizer_round_trips_and_has_chatml_specials(bundled_checkpoint):
    from litgpt import Tokenizer

    tok = Tokenizer(bundled_checkpoint)
    assert tok.token_to_id("<|im_end|>") == tok.eos_id == 2
    cfg = json.loads((bundled_checkpoint / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["tokenizer_class"] != "CodeLlamaTokenizer"
    for text in ["The capital of France is ", "  two  spaces\tand\ttabs\n\nlines", "naïve café 🤗 中文",
                 "under▁score", "x = [1, 2, 3]  # code"]:
        ids = tok.encode(text, bos=False)
        assert tok.decode(ids) == text


@pytest.mark.slow
def test_bundled_model_generates_and_stops_at_im_end(bundled_checkpoint):
    from litgpt import GPT, Config, Tokenizer
    from litgpt.generate.base import generate
    from litgpt.prompts import SmolLM2

    torch.manual_seed(0)
    tok = Tokenizer(bundled_checkpoint)
    model = GPT(Config.from_file(bundled_checkpoint / "model_config.yaml"))
    model.load_state_dict(torch.load(bundled_checkpoint / "lit_model.pth", weights_only=True))
    model.eval()
    ids = tok.encode(SmolLM2().apply("What is the capital of France?"))
    model.set_kv_cache(batch_size=1)
    out = generate(model, ids, max_returned_tokens=len(ids) + 60, temperature=0.0, eos_id=tok.eos_id)
    completion = out[len(ids):]
    assert completion[-1].item() == tok.eos_id, "generation must stop at <|im_end|>"
    assert len(completion) < 60
    assert "Paris" in tok.decode(completion)


def test_allowed_base_model_check():
    assert check_allowed_base_model("meta-llama/Llama-2-7b-hf") is None
    assert check_allowed_base_model("mistralai/Mistral-7B-v0.1") is None
    assert "fine-tuned" in check_allowed_base_model("meta-llama/Llama-2-7b-chat-hf")
    assert "family" in check_allowed_base_model("EleutherAI/gpt-j-6b")


def test_tracking_offline_run_writes_local_copies_and_wandb_dir(tmp_path):
    assert os.environ["WANDB_MODE"] == "offline"
    run = Run("test", tmp_path, {"lr": 1e-3, "path": Path("/x")})
    for step in range(3):
        run.log({"loss": 1.0 / (step + 1)}, step=step)
    run.log({"val_loss": 0.5}, step=3)
    run.use_input("mix", "dataset", "abc123")
    run.log_artifact(tmp_path / "run.json", "tracking-test", "result")
    run.summary(best=0.5)
    run.finish()
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["config"] == {"lr": 1e-3, "path": "/x"}
    assert meta["lineage"] == [{"artifact": "mix", "type": "dataset", "digest": "abc123", "path": None}]
    assert meta["command"] and meta["exit_code"] == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r.get("loss") for r in rows[:3]] == [1.0, 0.5, 1 / 3]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "val_loss", "_step"} <= set(header)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "offline W&B run dir must exist for `wandb sync`"


def test_cli_gathers_space_separated_dirs_for_list_arguments():
    from onegpu.cli import gather_list_positionals

    def compare(run_dirs: list[Path] | Path, out: Path = Path("x")) -> None: ...

    def build(recipe: Path, out: Path | None = None) -> None: ...

    assert gather_list_positionals(compare, ["a", "b", "--out", "o"]) == ['["a", "b"]', "--out", "o"]
    assert gather_list_positionals(compare, ["a", "--out", "o"]) == ["a", "--out", "o"]
    assert gather_list_positionals(build, ["r.yaml", "--out", "o"]) == ["r.yaml", "--out", "o"]


def test_bos_policy_does_not_depend_on_the_checkpoint_dir_name(bundled_checkpoint, tmp_path):
    """litgpt decides BOS for SmolLM2 by dir name; a renamed copy (a fine-tune's final/) must agree."""
    from litgpt import Tokenizer

    renamed = tmp_path / "final"
    renamed.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (renamed / name).write_bytes((bundled_checkpoint / name).read_bytes())
    text = "Question: 2+2?"
    assert Tokenizer(renamed).encode(text).tolist() == Tokenizer(bundled_checkpoint).encode(text).tolist()
