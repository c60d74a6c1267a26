"""What every serving engine shares: the request it runs, the raw result it returns, and how the
server turns that result into a /process response.

The server owns the contract and the engine only runs the model (``onegpu serve --engine onegpu``,
submission/engine.py, or ``--engine vllm``, submission/vllm_engine.py):

* the server tokenizes with the kit's tokenizer and BOS rule and applies the prompt style
  (``onegpu.inference``), so both engines are fed the same token ids;
* an engine returns a :class:`Generation`: token ids, the model's own log-probabilities and the
  top-k (id, logprob) pairs, nothing decoded;
* :func:`shape_response` decodes them with :class:`TokenCodec` and applies the rules of the
  contract: EOS and the template's stop tokens are not returned, text ends before the first stop
  sequence (an engine may stop late, never early), echo prepends the prompt's tokens, and
  ``"".join(token texts) == text``.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

GREEDY_TEMPERATURE = 1e-5  # HELM sends 1e-7 when it means temperature 0
MAX_TOP_LOGPROBS = 20
TokenTop = list[tuple[int, float]]  # the top-k (token id, logprob) pairs at one position, best first


class RequestRejected(ValueError):
    """A request the engine refuses as invalid (the server answers 422 with this message, not 500)."""


@dataclass
class GenRequest:
    """One /process call, tokenized (prompt style and BOS applied, truncated to fit)."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.8
    top_k: int = 200
    top_p: float = 1.0
    seed: int | None = None
    stop_sequences: list[str] = field(default_factory=list)
    echo: bool = False
    top_logprobs: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


@dataclass
class Generation:
    """An engine's raw answer to a :class:`GenRequest`.

    ``out_*`` describe the generated tokens (an engine may include a final EOS / template stop
    token and tokens past a stop sequence: :func:`shape_response` removes them). ``prompt_*``
    (echo requests only) score prompt token ``i`` for ``i >= 1`` by the logits at ``i - 1``.
    """

    out_ids: list[int]
    out_logprobs: list[float]
    out_top: list[TokenTop]
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top: list[TokenTop] = field(default_factory=list)


class ServingEngine(Protocol):
    """What ``onegpu serve`` needs of an engine (submission/engine.py and submission/vllm_engine.py)."""

    name: str
    codec: TokenCodec
    prompt_style: object | None  # litgpt's PromptStyle, applied by the server (None: raw)
    prompt_style_name: str
    max_seq_length: int
    max_temperature: float  # the largest temperature the engine samples at

    def submit(self, request: GenRequest) -> Future:
        """Start ``request``; the future resolves to a :class:`Generation`."""

    def health(self) -> dict:
        """The engine's part of ``GET /health`` (checkpoint, device, dtype, sizes, stats)."""

    def shutdown(self) -> None:
        ...


class TokenCodec:
    """The kit's tokenizer as the contract uses it: ids with the BOS rule, per-token texts, stop tokens."""

    def __init__(self, tokenizer, prompt_style=None):
        self.tokenizer = tokenizer  # litgpt's, ``use_bos`` set by onegpu.inference.uses_bos
        self.eos_id = tokenizer.eos_id
        seqs = prompt_style.stop_tokens(tokenizer) if prompt_style is not None else ([self.eos_id],)
        self.stop_token_seqs = [list(s) for s in seqs if s and all(t is not None for t in s)]

    def encode(self, text: str) -> list[int]:
        """The ids the model sees for ``text`` (with BOS when the tokenizer uses one)."""
        return self.tokenizer.encode(text).tolist()

    def starts_with_bos(self, ids: list[int]) -> bool:
        return bool(self.tokenizer.use_bos and ids and ids[0] == self.tokenizer.bos_id)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; a leading BOS (which :meth:`encode` adds) is dropped so ids round-trip."""
        return self.raw_decode(ids[1:] if self.starts_with_bos(ids) else ids)

    def raw_decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self.tokenizer.backend == "huggingface":
            return self.tokenizer.processor.decode(ids, skip_special_tokens=False)
        return self.tokenizer.processor.decode(ids)

    def vocab_limit(self) -> int:
        """Token ids below this decode (the tokenizer's vocabulary incl. added tokens)."""
        if self.tokenizer.backend == "huggingface":
            return self.tokenizer.processor.get_vocab_size(with_added_tokens=True)
        return self.tokenizer.processor.vocab_size()

    def token_texts(self, ids: list[int], prefix_ids: list[int] | None = None) -> list[str]:
        """Per-token texts whose concatenation is ``decode(ids)`` (given the tokens before them).

        Each token's text is what decoding a short window ending with it adds to decoding the
        window without it: leading spaces (SentencePiece) come out right, a partial UTF-8
        character (U+FFFD) is held back until the token that completes it, and a long prompt costs
        O(n) small decodes.
        """
        window = 8
        all_ids = list(prefix_ids or [])[-window:] + list(ids)
        done = len(all_ids) - len(ids)  # tokens whose text has been emitted
        texts = []
        for i in range(done, len(all_ids)):
            start = max(0, done - window)
            before = self.raw_decode(all_ids[start:done])
            after = self.raw_decode(all_ids[start:i + 1])
            if after.endswith("\ufffd") and i + 1 < len(all_ids):
                texts.append("")
                continue
            texts.append(after[len(before):] if after.startswith(before) else after)
            done = i + 1
        return texts

    def top_texts(self, top: TokenTop) -> dict[str, float]:
        """``top_logprob`` of one token: text -> logprob (two ids with one text keep the larger)."""
        entry: dict[str, float] = {}
        for token_id, logprob in top:
            text = self.raw_decode([token_id])
            entry[text] = max(logprob, entry.get(text, -math.inf))
        return entry

    def stop_token_end(self, out_ids: list[int]) -> int:
        """How many of ``out_ids`` to keep: those before the first EOS or template stop-token sequence."""
        for end in range(1, len(out_ids) + 1):
            for seq in self.stop_token_seqs:
                if end >= len(seq) and out_ids[end - len(seq):end] == seq:
                    return end - len(seq)
            if out_ids[end - 1] == self.eos_id:
                return end - 1
        return len(out_ids)

    def stop_sequence_hit(self, out_ids: list[int], stop_sequences: list[str]) -> bool:
        """Whether a stop string ends within the last few tokens of ``out_ids`` (cheap: a short decode)."""
        if not stop_sequences:
            return False
        longest = max(len(s) for s in stop_sequences)
        tail = self.raw_decode(out_ids[-(longest + 2):])
        return any(s in tail for s in stop_sequences)


def shape_response(codec: TokenCodec, request: GenRequest, generation: Generation) -> dict:
    """The /process fields (text, tokens, logprob) of ``generation``, by the contract's rules."""
    keep = codec.stop_token_end(generation.out_ids)
    out_ids = generation.out_ids[:keep]
    texts = codec.token_texts(out_ids, prefix_ids=request.prompt_ids)
    tokens = [{"text": t, "logprob": lp, "top_logprob": codec.top_texts(top)}
              for t, lp, top in zip(texts, generation.out_logprobs, generation.out_top)]
    tokens = _cut_at_stop_sequence(tokens, request.stop_sequences)
    completion = "".join(t["text"] for t in tokens)
    if request.echo:
        prompt_tokens = _prompt_entries(codec, request.prompt_ids, generation)
        tokens = prompt_tokens + tokens
        text = "".join(t["text"] for t in prompt_tokens) + completion
    else:
        text = completion
    return {"text": text, "tokens": tokens, "logprob": float(sum(t["logprob"] for t in tokens)),
            "prompt_tokens": len(request.prompt_ids), "completion_tokens": len(out_ids)}


def _cut_at_stop_sequence(tokens: list[dict], stop_sequences: list[str]) -> list[dict]:
    """The tokens up to the first stop sequence; a token that straddles it keeps its text before it."""
    text = "".join(t["text"] for t in tokens)
    cuts = [text.find(s) for s in stop_sequences if s in text]
    if not cuts:
        return tokens
    cut = min(cuts)
    kept, length = [], 0
    for tok in tokens:
        if length >= cut:
            break
        if length + len(tok["text"]) > cut:
            tok = dict(tok, text=tok["text"][: cut - length])
        kept.append(tok)
        length += len(tok["text"])
    return kept


def _prompt_entries(codec: TokenCodec, ids: list[int], generation: Generation) -> list[dict]:
    """The echoed prompt's tokens. With a BOS, the BOS itself is not returned and conditions the first
    token; without one, the first token has no context: logprob 0.0 and an empty top_logprob."""
    texts = codec.token_texts(ids)
    entries = [] if codec.starts_with_bos(ids) else [{"text": texts[0], "logprob": 0.0, "top_logprob": {}}]
    for i, (logprob, top) in enumerate(zip(generation.prompt_logprobs, generation.prompt_top), start=1):
        entries.append({"text": texts[i], "logprob": logprob, "top_logprob": codec.top_texts(top)})
    return entries
