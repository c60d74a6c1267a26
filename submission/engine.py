"""The inference engine behind ``onegpu serve``: one model, one worker thread, continuous batching.

How a request flows:

1. The HTTP handler tokenizes the prompt and calls :meth:`Engine.submit`, which returns a
   ``concurrent.futures.Future``.
2. The worker thread admits waiting requests into free *slots* of a KV cache with
   ``max_batch_size`` rows and prefills them in groups of similar length, ``prefill_chunk``
   prompt tokens per forward, one chunk between two decode steps (a new 1,500-token 5-shot prompt
   does not stall the running rows for its whole prefill); then it samples the first token. A
   prompt whose leading 16-token blocks are in the prefix cache (HELM's few-shot examples, sent
   again with every instance) gets their K/V copied and computes only the rest; ``stats``
   (``/health``) counts those hits.
3. Every step it runs ONE batched forward of one token for all active slots (each row at its own
   position: litgpt's ``input_pos`` of shape ``(B, 1)``), samples per row with the row's own
   temperature/top-k/top-p/seed, and checks EOS and stop sequences.
4. A finished row resolves its future and frees its slot at once; waiting requests fill free slots
   before the next step (continuous batching), so a 400-token GSM8K request never holds 5-token
   MMLU requests behind it.

Active rows are kept packed in slots ``0..n-1`` (a finished row's slot is refilled by moving the
last row's cache into it) so each step computes exactly ``n`` rows. ``lm_head`` is applied only to
the positions whose logits are needed (the last one, or all of them for ``echo_prompt``), which
saves the (T, vocab) logits of a long prompt. Attention keeps K/V in their query groups
(``grouped_kv``): a decode step of many rows does not copy every row's cache once per query head.

Log-probabilities are those of the model itself (``log_softmax`` of the logits, temperature 1),
whatever the sampling settings: that is what "logprob of the returned text" means, and what the
tests check against a plain forward pass. The engine returns token ids and logprobs
(:class:`submission.generation.Generation`); the server decodes and shapes them.
"""

from __future__ import annotations

import atexit
import math
import queue
import random
import threading
from concurrent.futures import Future
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from onegpu import inference
from onegpu.errors import UserError
from onegpu.kvcache import CachedForward
from onegpu.submission.generation import MAX_TOP_LOGPROBS, GenRequest, Generation, TokenCodec, TokenTop
from onegpu.threads import set_cpu_threads

PREFILL_TOKEN_BUDGET = 4096  # padded prompt tokens of one prefill group
PREFILL_CHUNK = 256  # prompt tokens per prefill forward between two decode steps (0: whole prompts)
PREFIX_BLOCK = 16  # prompt tokens per prefix-cache entry: a shared prefix is reused up to the last whole block


# ----------------------------------------------------------------------------------------------
# The prefix cache


class PrefixCache:
    """K/V of prompt prefixes, in blocks of ``block`` tokens, least recently used evicted first.

    HELM sends every instance of a scenario with the same in-context examples in front, so most
    of a 5-shot prompt was already computed for the request before. A block's key is its tokens
    plus the key of the block before it, so a hit means the whole prefix matches exactly; K/V at a
    position depend only on the tokens up to it, so reusing them is exact.
    """

    def __init__(self, caches: list, block: int = PREFIX_BLOCK, budget_bytes: int = 1 << 30):
        self.caches = caches
        self.block = block
        per_token = sum(c.k[0, :, 0].numel() * c.k.element_size() + c.v[0, :, 0].numel() * c.v.element_size()
                        for c in caches)
        self.capacity = budget_bytes // max(1, per_token * block)
        self.blocks: OrderedDict = OrderedDict()  # key -> (k, v) stacked over layers
        self.hits = 0  # prompt tokens not recomputed

    def _keys(self, ids: list[int], limit: int):
        key = None
        for end in range(self.block, limit + 1, self.block):
            key = hash((key, tuple(ids[end - self.block:end])))
            yield end, key

    def lookup(self, ids: list[int]) -> list:
        """Keys of the cached blocks that start ``ids`` (leaving at least one token to compute)."""
        found = []
        for _end, key in self._keys(ids, len(ids) - 1):
            if key not in self.blocks:
                break
            self.blocks.move_to_end(key)
            found.append(key)
        return found

    def load(self, keys: list, row: int) -> int:
        """Copy the blocks ``keys`` into cache row ``row``; returns the tokens covered."""
        if not keys:
            return 0
        stop = len(keys) * self.block
        k = torch.cat([self.blocks[key][0] for key in keys], dim=2)  # (layers, groups, stop, head)
        v = torch.cat([self.blocks[key][1] for key in keys], dim=2)
        for layer, cache in enumerate(self.caches):
            cache.k[row, :, :stop] = k[layer]
            cache.v[row, :, :stop] = v[layer]
        self.hits += stop
        return stop

    def store(self, ids: list[int], row: int) -> None:
        """Remember the full blocks of prompt ``ids``, whose K/V are in cache row ``row``."""
        if self.capacity < 1:
            return
        new = []
        for end, key in self._keys(ids, len(ids)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
            else:
                new.append((end, key))
        if not new:
            return
        first = new[0][0] - self.block  # one copy of the new span per layer, then a block each
        k = torch.stack([c.k[row, :, first:new[-1][0]] for c in self.caches])
        v = torch.stack([c.v[row, :, first:new[-1][0]] for c in self.caches])
        for end, key in new:
            start = end - self.block - first
            self.blocks[key] = (k[:, :, start:start + self.block].clone(), v[:, :, start:start + self.block].clone())
            while len(self.blocks) > self.capacity:
                self.blocks.popitem(last=False)


# ----------------------------------------------------------------------------------------------
# Requests


@dataclass(eq=False)
class Sequence(GenRequest):
    """A request in the worker: its state while it waits, prefills and decodes. Its
    :class:`Generation` arrives through ``future``."""

    future: Future = field(default_factory=Future)
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)
    out_logprobs: list[float] = field(default_factory=list)
    out_top: list[TokenTop] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top: list[TokenTop] = field(default_factory=list)
    position: int = 0  # the position of the next token to feed
    cached_keys: list = field(default_factory=list)  # prefix-cache blocks this prompt starts with


@dataclass
class Prefill:
    """A group of prompts being prefilled, chunk by chunk, into the cache rows after the running ones."""

    group: list[Sequence]
    offsets: list[int]          # prompt tokens each row got from the prefix cache
    first_row: int              # cache row of group[0]
    done: int = 0               # suffix tokens computed in every row
    last: dict = field(default_factory=dict)  # row -> hidden state of its prompt's last token
    echo_hidden: dict = field(default_factory=lambda: defaultdict(list))  # row -> hidden chunks (echo)


class Engine:
    """Loads a checkpoint and serves generation requests from a background thread."""

    name = "onegpu"
    max_temperature = 100.0  # the request schema's bound; any temperature works here

    def __init__(self, checkpoint: Path, device: str = "auto", dtype: str = "auto", max_batch_size: int = 16,
                 max_seq_length: int = 2048, quantize: str | None = None, prompt_style: str = "auto",
                 num_threads: int | None = None, base_checkpoint: Path | None = None,
                 prefix_cache_mb: int = 1024, prefill_chunk: int = PREFILL_CHUNK):
        if max_batch_size < 1:
            raise UserError(f"max_batch_size={max_batch_size}", fix="use 1 or more")
        if prefill_chunk < 0:
            raise UserError(f"prefill_chunk={prefill_chunk}", fix="use 0 (whole prompts) or more tokens")
        if num_threads:
            set_cpu_threads(num_threads)
        # model, tokenizer (BOS rule), dtype and prompt style: the same loader as `onegpu eval val`
        loaded = inference.load(checkpoint, base_checkpoint=base_checkpoint, device=device, dtype=dtype,
                                quantize=quantize, prompt_style=prompt_style, who="onegpu serve")
        self.checkpoint, self.device, self.dtype = loaded.checkpoint, loaded.device, loaded.dtype
        self.tokenizer, self.model, self.prompt_style = loaded.tokenizer, loaded.model, loaded.prompt_style
        self.prompt_style_name = type(self.prompt_style).__name__ if self.prompt_style else "raw"
        self.codec = TokenCodec(self.tokenizer, self.prompt_style)
        config = self.model.config
        self.max_seq_length = min(max_seq_length, config.block_size)
        self.vocab_size = config.vocab_size
        self.max_batch_size = max_batch_size
        # one K/V-cache row per slot, lm_head only where logits are needed (see module docstring):
        # the same cached forward as `eval val`'s shared-context scoring
        self.forward = CachedForward(self.model, rows=max_batch_size, max_seq_length=self.max_seq_length,
                                     grouped_kv=True)
        self.caches = self.forward.caches
        self.prefix_cache = PrefixCache(self.caches, budget_bytes=prefix_cache_mb << 20)

        self.eos_id = self.codec.eos_id
        self.stop_token_seqs = self.codec.stop_token_seqs
        self._queue: queue.Queue[Sequence | None] = queue.Queue()
        self._active: list[Sequence] = []      # decoding, in cache rows 0..n-1
        self._waiting: list[Sequence] = []     # taken off the queue, not yet prefilling
        self._prefill: Prefill | None = None     # the group being prefilled, in rows n..
        self.prefill_chunk = prefill_chunk
        self._stopping = False
        self.stats = {"requests": 0, "steps": 0, "max_batch": 0, "prefill_chunks": 0, "prefix_hits": 0,
                      "prefix_tokens_reused": 0}
        self._worker = threading.Thread(target=self._run, name="onegpu-engine", daemon=True)
        self._worker.start()
        atexit.register(self.shutdown)  # a daemon thread inside torch at interpreter exit aborts it

    # ------------------------------------------------------------------------------------------
    # Tokenizer

    def encode(self, text: str) -> list[int]:
        """The ids the model sees for ``text`` (with BOS when the tokenizer uses one)."""
        return self.codec.encode(text)

    # ------------------------------------------------------------------------------------------
    # Public API

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits (T, vocab) at every position of ``ids``: one plain forward, no KV cache
        and no batching, i.e. what the loaded model computes (to compare with `eval val`'s)."""
        return self.forward.logits(self.model(torch.tensor([ids], dtype=torch.long, device=self.device))[0])

    def submit(self, request: GenRequest) -> Future:
        """Queue ``request``; the future resolves to its :class:`Generation`."""
        if self._stopping:
            raise RuntimeError("engine is shutting down")
        sequence = Sequence(**{f.name: getattr(request, f.name) for f in fields(GenRequest)})
        self._queue.put(sequence)
        return sequence.future

    def kv_cache_bytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in self.caches)

    def health(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "max_seq_length": self.max_seq_length,
                "max_batch_size": self.max_batch_size, "kv_cache_gb": round(self.kv_cache_bytes() / 1e9, 3),
                "stats": dict(self.stats)}

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._queue.put(None)
        self._worker.join(timeout=10)

    # ------------------------------------------------------------------------------------------
    # Worker

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    if not self._admit():
                        return
                    if self._prefill is None and self._waiting:
                        self._prefill = self._start_prefill()
                    if self._prefill is not None:  # one chunk, then a decode step for the running rows
                        self._prefill_chunk(self._prefill)
                    if self._active:
                        self._step()
                except Exception as err:  # never let one bad batch kill the server: fail its requests
                    for req in self._active:
                        if not req.future.done():
                            req.future.set_exception(err)
                    self._active = []

    def _admit(self) -> bool:
        """Take waiting requests off the queue while slots are free (blocking when idle). False once
        shut down."""
        idle = not self._active and not self._waiting and self._prefill is None
        while len(self._active) + len(self._waiting) + (len(self._prefill.group) if self._prefill else 0) \
                < self.max_batch_size:
            try:
                req = self._queue.get(block=idle)
            except queue.Empty:
                break
            idle = False
            if req is None:
                for waiting in self._waiting:
                    waiting.future.set_exception(RuntimeError("the server is shutting down"))
                return False
            self._waiting.append(req)
        return True

    def _start_prefill(self) -> Prefill:
        """The next group of waiting prompts to prefill: those of similar uncached length (one
        weight pass for several). Looked up in the prefix cache now, so a prompt waiting behind
        another with the same few-shot examples finds them."""
        for req in self._waiting:  # echo needs every prompt position's logits: no reuse there
            req.cached_keys = [] if req.echo else self.prefix_cache.lookup(req.prompt_ids)
        self._waiting.sort(key=self._suffix_len)
        group, later, first_blocks = [], [], set()
        for req in self._waiting:
            # a prompt whose next uncached block another prompt of the group computes waits for it
            block = self._first_uncached_block(req)
            if group and ((block is not None and block in first_blocks) or not self._fits(group, req)):
                later.append(req)
                continue
            group.append(req)
            first_blocks.add(block)
        self._waiting = later
        first_row = len(self._active)
        offsets = [self.prefix_cache.load(r.cached_keys, first_row + i) for i, r in enumerate(group)]
        self.stats["prefix_tokens_reused"] += sum(offsets)
        self.stats["prefix_hits"] += sum(1 for off in offsets if off)
        return Prefill(group, offsets, first_row)

    def _first_uncached_block(self, req: Sequence) -> tuple | None:
        """The prompt up to the end of its first block not in the prefix cache (None: none to share)."""
        end = (len(req.cached_keys) + 1) * self.prefix_cache.block
        if req.echo or self.prefix_cache.capacity < 1 or end >= len(req.prompt_ids):
            return None
        return tuple(req.prompt_ids[:end])

    def _suffix_len(self, req: Sequence) -> int:
        return len(req.prompt_ids) - len(req.cached_keys) * self.prefix_cache.block

    def _fits(self, group: list[Sequence], req: Sequence) -> bool:
        longest = self._suffix_len(req)  # req is the longest (sorted)
        padded = longest * (len(group) + 1)
        real = sum(self._suffix_len(r) for r in group) + longest
        # padded positions must stay inside the context for every row
        inside = all(len(r.cached_keys) * self.prefix_cache.block + longest <= self.max_seq_length
                     for r in group + [req])
        # padding is computed like real tokens: with chunks of a few hundred tokens, two long prompts
        # gain nothing from one forward, so only short suffixes of similar length are grouped
        return inside and padded <= PREFILL_TOKEN_BUDGET and padded <= 1.1 * real + 16

    def _prefill_chunk(self, pf: Prefill) -> None:
        """One forward over the next chunk of the group's prompts (right-padded), in the cache rows
        after the running ones; the last chunk moves the group into the running batch.

        ``prefill_chunk`` prompt tokens per forward (0: the whole prompt), so a long prompt costs the
        running rows one chunk of waiting per decode step, not a whole prefill. Rows a finished
        request freed meanwhile are closed up by moving the group's rows down. Padding writes junk
        K/V after a short prompt's end; its first decode step overwrites that position before
        attending to it, and the causal mask hides the rest.
        """
        try:
            if pf.first_row != len(self._active):  # running rows finished: keep all rows packed
                for i, off in enumerate(pf.offsets):
                    self.forward.copy_row(pf.first_row + i, len(self._active) + i, off + pf.done)
                pf.first_row = len(self._active)
            suffixes = [r.prompt_ids[off:] for r, off in zip(pf.group, pf.offsets)]
            longest = max(len(x) for x in suffixes)
            per_row = max(16, self.prefill_chunk // len(pf.group)) if self.prefill_chunk else longest
            start, stop = pf.done, min(longest, pf.done + per_row)
            pad = self.eos_id if self.eos_id is not None else 0
            idx = torch.tensor([(x[start:stop] + [pad] * (stop - start))[: stop - start] for x in suffixes],
                               dtype=torch.long, device=self.device)
            if any(pf.offsets):
                pos = torch.tensor([list(range(off + start, off + stop)) for off in pf.offsets], device=self.device)
            else:
                pos = torch.arange(start, stop, device=self.device)
            hidden = self.forward.hidden(idx, pos, pf.first_row, max(pf.offsets) + stop)  # (k, T, C)
            self.stats["prefill_chunks"] += 1
            for i, (req, x) in enumerate(zip(pf.group, suffixes)):
                if start < len(x) <= stop:
                    pf.last[i] = hidden[i, len(x) - 1 - start]
                if req.echo:
                    pf.echo_hidden[i].append(hidden[i, : max(0, min(stop, len(x)) - start)])
            pf.done = stop
            if stop == longest:
                self._prefill = None
                self._finish_prefill(pf)
        except Exception as err:
            self._prefill = None
            for req in pf.group:
                if not req.future.done():
                    req.future.set_exception(err)

    def _finish_prefill(self, pf: Prefill) -> None:
        """The group's prompts are in its cache rows: sample each one's first token, join the batch."""
        group = pf.group
        logprobs = torch.log_softmax(self.forward.logits(torch.stack([pf.last[i] for i in range(len(group))])),
                                     dim=-1)  # (k, V)
        for i, req in enumerate(group):
            self.stats["requests"] += 1
            seed = req.seed if req.seed is not None else random.getrandbits(62)
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
            req.position = len(req.prompt_ids)
            self.prefix_cache.store(req.prompt_ids, pf.first_row + i)
            if req.echo:
                self._score_prompt(req, torch.cat(pf.echo_hidden[i])[: len(req.prompt_ids)])
        self._active.extend(group)  # rows first_row.. hold their caches now
        for i, req in enumerate(group):
            if req.max_new_tokens == 0:
                self._finish(req)
            else:
                self._accept(req, logprobs[i])

    def _score_prompt(self, req: Sequence, hidden: torch.Tensor) -> None:
        """Prompt-token logprobs: token i scored by the logits at position i-1 (the next-token ones)."""
        ids = req.prompt_ids
        for start in range(0, len(ids) - 1, 256):  # chunks bound the (T, vocab) logits
            stop = min(start + 256, len(ids) - 1)
            logprobs = torch.log_softmax(self.forward.logits(hidden[start:stop]), dim=-1)
            targets = torch.tensor(ids[start + 1: stop + 1], device=logprobs.device)
            req.prompt_logprobs += logprobs.gather(1, targets[:, None])[:, 0].tolist()
            req.prompt_top += self._top(logprobs, req.top_logprobs)

    @staticmethod
    def _top(logprobs: torch.Tensor, k: int) -> list[TokenTop]:
        if k <= 0:
            return [[] for _ in range(logprobs.size(0))]
        values, indices = logprobs.topk(min(k, MAX_TOP_LOGPROBS), dim=-1)
        return [list(zip(ids, vals)) for ids, vals in zip(indices.tolist(), values.tolist())]

    def _step(self) -> None:
        n = len(self._active)
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], n)
        idx = torch.tensor([[r.out_ids[-1]] for r in self._active], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.position] for r in self._active], dtype=torch.long, device=self.device)
        maxp1 = int(pos.max()) + 1
        hidden = self.forward.hidden(idx, pos, 0, maxp1)[:, -1]  # (n, C)
        logprobs = torch.log_softmax(self.forward.logits(hidden), dim=-1)
        for r in self._active:
            r.position += 1
        for row, req in list(enumerate(self._active)):
            self._accept(req, logprobs[row])

    def _sample(self, req: Sequence, logprobs: torch.Tensor) -> int:
        if req.greedy:
            return int(torch.argmax(logprobs))
        logits = logprobs / req.temperature
        if req.top_k and req.top_k < logits.size(-1):
            kth = torch.topk(logits, req.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if req.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            remove = cumulative - torch.softmax(sorted_logits, dim=-1) > req.top_p  # keep the token crossing top_p
            logits = logits.masked_fill(remove.scatter(0, order, remove), -math.inf)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=req.generator))

    def _accept(self, req: Sequence, logprobs: torch.Tensor) -> None:
        """Sample the next token of ``req`` from ``logprobs`` (V,), record it, finish if it stops."""
        token = self._sample(req, logprobs)
        out = req.out_ids
        if token == self.eos_id or any(seq == (out + [token])[-len(seq):] for seq in self.stop_token_seqs):
            # the stop token(s) are not part of the completion
            for seq in self.stop_token_seqs:
                if len(seq) > 1 and seq[:-1] == out[-(len(seq) - 1):]:
                    del out[-(len(seq) - 1):], req.out_logprobs[-(len(seq) - 1):], req.out_top[-(len(seq) - 1):]
            self._finish(req)
            return
        out.append(token)
        req.out_logprobs.append(float(logprobs[token]))
        req.out_top.append(self._top(logprobs[None], req.top_logprobs)[0])
        if self.codec.stop_sequence_hit(out, req.stop_sequences):  # the server cuts the text there
            self._finish(req)
            return
        if len(out) >= req.max_new_tokens or req.position >= self.max_seq_length:
            self._finish(req)

    def _finish(self, req: Sequence) -> None:
        if req in self._active:
            row = self._active.index(req)
            last = len(self._active) - 1
            if row != last:  # keep active rows packed: move the last row's cache into this slot
                moved = self._active[last]
                self.forward.copy_row(last, row, moved.position)
                self._active[row] = moved
            self._active.pop()
        req.future.set_result(Generation(req.out_ids, req.out_logprobs, req.out_top, req.prompt_logprobs,
                                         req.prompt_top))
