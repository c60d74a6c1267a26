"""The target tokenizer of a recipe, and rows counted in tokens as training sees them.

``load_tokenizer`` gives the litgpt ``Tokenizer`` the fine-tune loads from its checkpoint, so BOS/EOS
follow one rule (``onegpu.data.schema.encode_example``); ``count_tokens`` and ``TokenCounter`` count
rendered rows in batch calls into the Rust tokenizer, on tokenizers' thread pool when asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from litgpt.tokenizer import Tokenizer
from tqdm import tqdm

from onegpu.data.schema import encode_examples, render
from onegpu.errors import UserError
from onegpu.model import bundled_checkpoint_dir, is_checkpoint, prepare
from onegpu.paths import cache_dir


def load_tokenizer(spec: str):
    """(litgpt Tokenizer, info) for ``bundled`` | a checkpoint dir | a hub model id.

    The same litgpt ``Tokenizer`` the fine-tune loads from its checkpoint, so BOS/EOS follow the
    same rule (``onegpu.data.schema.encode_example``). A hub id's tokenizer files are downloaded
    (not the weights) into ``$ONEGPU_CACHE/tokenizers/<id>``.
    """
    if spec == "bundled":
        path = bundled_checkpoint_dir()
        if not is_checkpoint(path):
            path = prepare()
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser()
    elif "/" in spec and not spec.startswith((".", "/", "~")):
        path = _hub_tokenizer_dir(spec)
    else:
        raise UserError(f"tokenizer {spec!r} is neither a directory nor a hub id",
                        fix="use `bundled`, a checkpoint dir holding tokenizer.json, or a hub id like meta-llama/Llama-2-7b-hf")
    vocab = next((path / f for f in ("tokenizer.json", "tokenizer.model") if (path / f).is_file()), None)
    if vocab is None:
        raise UserError(f"tokenizer: {path} has neither tokenizer.json nor tokenizer.model",
                        fix="point `tokenizer:` at a litgpt/HF checkpoint dir with tokenizer.json, or use `bundled`")
    tok = Tokenizer(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    info = {"spec": spec, "name": spec if path.is_relative_to(cache_dir() / "tokenizers") else path.name,
            f"{vocab.name.replace('.', '_')}_sha256": hashlib.sha256(vocab.read_bytes()).hexdigest(),
            "vocab_size": tok.processor.get_vocab_size() if tok.backend == "huggingface" else tok.vocab_size,
            "eos_token": eos, "eos_id": tok.eos_id, "bos_id": tok.bos_id, "uses_bos": tok.use_bos,
            "counting": "prompt (+ BOS when the tokenizer uses one) + response + EOS, as training tokenizes "
                        "(onegpu.data.schema.encode_example)"}
    return tok, info


TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json"]


def _hub_tokenizer_dir(model_id: str) -> Path:
    # named after the model, as litgpt names checkpoint dirs: litgpt's BOS rule reads the dir name
    local = cache_dir() / "tokenizers" / model_id
    try:
        snapshot_download(model_id, local_dir=local, allow_patterns=TOKENIZER_FILES)
    except Exception as err:  # offline, gated, or misspelt
        raise UserError(f"tokenizer {model_id!r} could not be loaded from the hub: {type(err).__name__}: {err}",
                        fix="check the model id and network (HF_TOKEN for gated models), or use a local checkpoint dir") from err
    return local


@contextlib.contextmanager
def tokenizers_pool(enabled: bool) -> Iterator[None]:
    """tokenizers' Rust thread pool on (or off) for the batch calls inside, then back as it was.

    The CLI turns the pool off for the whole process (onegpu/cli.py): a process that forks after the
    pool has started hands its child a tokenizer with the pool disabled (older versions deadlock), and
    other verbs fork (DataLoader workers, servers). The data stage starts no process while it
    encodes, so it turns the pool on around its batch calls only; tokenizers reads the variable at
    each call.
    """
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def count_tokens(rows: list[dict], style: str, tokenizer, parallel: bool = True) -> list[int]:
    """Tokens of each row as training sees them (``encode_examples``: BOS + prompt + response + EOS).

    Batch calls into the Rust tokenizer; with ``parallel`` they run on tokenizers' thread pool.
    """
    examples = [render(r, style) for r in rows]
    with tokenizers_pool(parallel):
        encoded = encode_examples(tokenizer, examples)
    return [len(prompt) + len(response) for prompt, response in encoded]


class TokenCounter:
    """Token counts of rows submitted as their fate is decided; ``counts()`` waits for all of them.

    parallel: each submitted batch is rendered and encoded on a background thread through
    tokenizers' thread pool (Rust, without the GIL), so encoding overlaps whatever the main thread
    does next (near-dedup). Otherwise rows are counted one batch at a time in ``counts()``, on one
    thread: the plain path, which gives the same numbers.
    """

    def __init__(self, tokenizer, style: str, parallel: bool, batch: int = 4096):
        self.tokenizer, self.style, self.parallel, self.batch = tokenizer, style, parallel, batch
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tokenize") if parallel else None
        self._jobs: list[tuple[list[int], Any]] = []  # (row positions, future or their rows)
        self._bar = tqdm(total=0, desc="tokenize", unit="row", leave=False, mininterval=1.0)

    def _count(self, rows: list[dict]) -> list[int]:
        counts = count_tokens(rows, self.style, self.tokenizer, self.parallel)
        self._bar.update(len(rows))
        return counts

    def submit(self, positions: list[int], rows: list[dict]) -> None:
        for start in range(0, len(positions), self.batch):
            part = positions[start:start + self.batch]
            self._bar.total += len(part)
            batch = [rows[p] for p in part]
            self._jobs.append((part, self._executor.submit(self._count, batch) if self._executor else batch))

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for positions, job in self._jobs:
            out.update(zip(positions, job.result() if self._executor else self._count(job)))
        return out

    def __enter__(self) -> TokenCounter:
        return self

    def __exit__(self, *exc) -> None:
        if self._executor:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._bar.close()
