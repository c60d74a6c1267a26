"""One token rule for the data stage and training (``onegpu.data.schema.encode_example``).

The data stage counts tokens with ``encode_examples`` (batch calls into the Rust tokenizer); the
fine-tune builds its examples with ``encode_example`` (litgpt's ``Tokenizer.encode``, row by row).
Both must give the same ids: BOS when the tokenizer uses one, EOS after the response."""

from __future__ import annotations

import json
import shutil

import pytest

from onegpu.data.schema import encode_example, encode_examples, render
from onegpu.data.loading import load_records
from onegpu.data.sources import SOURCES, Reject


@pytest.fixture(scope="module")
def examples(shared_datasets):
    rows = []
    for name in ("dolly", "oasst1", "gsm8k"):  # single- and multi-turn rows
        src = SOURCES[name]
        converted = (r for rec in load_records(src, shared_datasets) for r in src.convert(rec, src))
        rows += [r for r, _ in zip((r for r in converted if not isinstance(r, Reject)), range(60))]
    pairs = [render(r, style) for r in rows for style in ("smollm2", "alpaca", "llama2")]
    # edges: empty texts, a response that already ends in EOS, a prompt that starts with BOS
    return pairs + [("", ""), ("Say hi.", "hi<|im_end|>"), ("<|im_start|>user\nhi", "hello"), (" ", "\n")]


def _tokenizer(path):
    from litgpt.tokenizer import Tokenizer

    return Tokenizer(path)


def test_batch_encoding_equals_the_training_rule_with_bos(bundled_checkpoint, examples):
    tok = _tokenizer(bundled_checkpoint)
    assert tok.use_bos and tok.bos_id is not None and tok.eos_id is not None
    batch = encode_examples(tok, examples)
    assert batch == [encode_example(tok, p, r) for p, r in examples]
    assert all(p[0] == tok.bos_id for p, _ in batch)  # alpaca/default prompts get BOS prepended
    assert sum(r[-1:] == [tok.eos_id] for _, r in batch) >= len(batch) - 1  # litgpt drops an EOS already there


def test_batch_encoding_equals_the_training_rule_without_bos(bundled_checkpoint, examples, tmp_path):
    nobos = tmp_path / "tokenizer-without-bos"
    nobos.mkdir()
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(bundled_checkpoint / name, nobos / name)
    cfg = json.loads((bundled_checkpoint / "tokenizer_config.json").read_text())
    (nobos / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    tok = _tokenizer(nobos)
    assert not tok.use_bos
    batch = encode_examples(tok, examples)
    assert batch == [encode_example(tok, p, r) for p, r in examples]
    assert not any(p[:1] == [tok.bos_id] for p, _ in batch)  # litgpt strips a leading BOS when unused
