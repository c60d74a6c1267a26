"""Log-likelihoods with each shared context computed once, bit-identical to lm-eval's HFLM.

A multiple-choice item scores 4-5 continuations against one context, and a few-shot task puts
the same examples in front of every item; HFLM runs the whole sequence for every continuation.
Here a request reuses the K/V of the longest prefix already computed (through
:class:`onegpu.kvcache.CachedForward`, the server's cache machinery) and only its own tokens are
run through the model, and the LM head only where a continuation is scored.

Why that is not simply "compute the context once": on a CPU, PyTorch's fused attention gives a
query row the same bits only for the same number of key positions (it splits the keys into
blocks whose size depends on that number, and the matrix library splits long sums by length).
HFLM right-pads a batch to its longest request, so a request's score depends on the padded
length of the batch it fell into. Bit-identity holds because:

* a request is scored with attention over its HFLM batch's padded length (``kv_len``); keys past
  its own tokens get zero weight, as HFLM's padding does;
* K/V computed for one request are reused for another only as far as the tokens agree *and*
  attention over the two key lengths gives identical rows, which :class:`KeyLengthAgreement`
  measures by running the same attention on random data at both lengths (the kernels' order of
  operations depends on shapes, never on values);
* query rows pass through attention in blocks as HFLM's call has them (the kernel takes 32, 64
  or 256 query rows at a time, and the matrix library treats a block of 1-3 rows differently),
  and every matrix multiply has at least ``MIN_ROWS`` rows for the same reason.

Requests are processed in token order, so each finds its longest shared prefix among the last
few sequences computed: the few-shot examples of a task, then the context of an item.
``tests/test_eval_lm.py`` checks the result against HFLM and against the plain batched forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from onegpu.kvcache import CachedForward

MIN_ROWS = 16      # rows per matrix multiply: fewer take another code path in the matrix library
SMALL_BLOCK = 8    # query blocks shorter than this are reproduced as HFLM's call has them


@dataclass
class ScoreRequest:
    """One HFLM row: the tokens it runs, its batch's padded length, the continuations it scores."""

    tokens: list[int]   # (context + continuation)[-(max_length + 1):][:-1], as HFLM builds it
    kv_len: int         # the padded length of its HFLM batch: key positions attention runs over
    first: int          # first scored position (len(tokens) - len(continuation))
    continuations: list[list[int]] = field(default_factory=list)  # all requests sharing these logits


def attention_query_block(length: int) -> int:
    """Query rows per block in PyTorch's CPU flash attention for ``length`` queries."""
    return 256 if length >= 768 else 64 if length >= 192 else 32


def answer(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """HFLM's (log-likelihood, is greedy) of ``continuation`` from log-probs ``logits`` (1, n, V)."""
    cont = torch.tensor(continuation, dtype=torch.long, device=logits.device).unsqueeze(0)
    greedy = logits.argmax(dim=-1)
    max_equal = (greedy[:, -cont.shape[1]:] == cont).all()
    picked = torch.gather(logits, 2, cont.unsqueeze(-1)).squeeze(-1)
    return float(picked.sum()), bool(max_equal)


class KeyLengthAgreement:
    """Which query rows causal attention computes with the same arithmetic over different key lengths.

    :meth:`rows` gives, for ``kv_len`` keys, one 64-bit hash per query row of the model's own
    attention call on fixed random data: rows ``[0, t]`` of two key lengths hash alike exactly when
    they were computed alike (the kernels' order of operations depends on shapes, never on values).
    Two orders of operations can still round one head alike by chance (one sum regrouped, one
    exponential taken another way), so ``heads`` independent heads are compared.
    """

    def __init__(self, model, heads: int = 32):
        param = next(model.parameters())
        self.device, self.dtype, self.heads = param.device, param.dtype, heads
        self.head_size = model.config.head_size
        self.attention = model.transformer.h[0].attn
        generator = torch.Generator().manual_seed(0)
        self.mix = torch.randint(1, 2**62, (heads * self.head_size,), generator=generator)
        self.qkv: list[torch.Tensor] = []
        self.hashes: dict[int, np.ndarray] = {}

    def _data(self, length: int) -> list[torch.Tensor]:
        if not self.qkv or self.qkv[0].size(2) < length:  # position-major: a longer draw extends a shorter one
            generator = torch.Generator().manual_seed(1)
            shape = (1, max(length, 256), self.heads, self.head_size)
            self.qkv = [torch.randn(shape, generator=generator).to(self.device, self.dtype).transpose(1, 2)
                        for _ in range(3)]
        q, k, v = (t[:, :, :length] for t in self.qkv)
        return [q, k.contiguous(), v.contiguous()]  # the layouts of litgpt's and HF's calls

    def rows(self, kv_len: int) -> np.ndarray:
        if kv_len not in self.hashes:
            out = self.attention.scaled_dot_product_attention(*self._data(kv_len))[0].flatten(1)  # (T, heads*hs)
            bits = out.float().cpu().contiguous().view(torch.int32).to(torch.int64)
            self.hashes[kv_len] = (bits * self.mix).sum(dim=1).numpy()  # wraps mod 2**64: a random hash
        return self.hashes[kv_len]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass
class _Node:
    """A node of the request trie: the first ``length`` positions are the same, and computed
    alike, for every request below it (a leaf is one request)."""

    length: int
    kv_len: int               # key length to compute its positions with (any request's below it)
    tokens: np.ndarray        # a request's below it ([:length] are the shared ones)
    request: int | None = None
    children: list = field(default_factory=list)
    parent_row: int | None = None
    reuse: int = 0            # leading positions copied from the parent's cache row


def build_trie(keys: list[np.ndarray], requests: list[ScoreRequest]) -> _Node:
    """Compacted trie over per-position keys (token and attention arithmetic), from sorted order."""
    root = _Node(0, 0, np.zeros(0, dtype=np.int64))
    stack, previous = [root], None
    for i in sorted(range(len(keys)), key=lambda i: keys[i].tolist()):
        shared = common_prefix(keys[previous], keys[i]) if previous is not None else 0
        popped = None
        while stack[-1].length > shared or stack[-1].request is not None:
            popped = stack.pop()
        if stack[-1].length < shared:  # a prefix shared with the previous request's branch
            node = _Node(shared, popped.kv_len, popped.tokens, children=[popped])
            stack[-1].children[-1] = node
            stack.append(node)
        r = requests[i]
        leaf = _Node(len(r.tokens), r.kv_len, np.asarray(r.tokens, dtype=np.int64), request=i)
        stack[-1].children.append(leaf)
        stack.append(leaf)
        previous = i
    return _merge_short(root)


def _merge_short(node: _Node) -> _Node:
    """Fold shared prefixes of fewer than ``MIN_ROWS`` new positions into their parent."""
    children = []
    for child in node.children:
        child = _merge_short(child)
        if child.request is None and child.length - node.length < MIN_ROWS:
            children.extend(child.children)
        else:
            children.append(child)
    node.children = children
    return node


def depth(node: _Node) -> int:
    return 1 + max((depth(c) for c in node.children), default=0)


class SharedContextScorer:
    """Scores :class:`ScoreRequest` s on a litgpt model, each shared prefix computed once."""

    def __init__(self, model, pad_id: int, batch_size: int):
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size
        self.device = next(model.parameters()).device
        self.stats = {"requests": 0, "positions": 0, "positions_computed": 0, "forwards": 0}
        self.agreement = KeyLengthAgreement(model)

    def can_score(self, request: ScoreRequest) -> bool:
        """False for the shapes this cannot reproduce (HFLM's own matrix multiplies of fewer than
        ``MIN_ROWS`` rows; no room for a padded block below the model's context): score those plainly."""
        return MIN_ROWS <= request.kv_len <= self.model.config.block_size - SMALL_BLOCK and request.first >= 0

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[dict[tuple[int, ...], tuple[float, bool]]]:
        """For each request, {continuation: (log-likelihood, is greedy)} of all its continuations."""
        longest = max(r.kv_len for r in requests)
        keys = [np.asarray(r.tokens, dtype=np.int64) * 1_000_003 + self.agreement.rows(r.kv_len)[: len(r.tokens)]
                for r in requests]
        root = build_trie(keys, requests)
        length = min(longest + 2 * MIN_ROWS, self.model.config.block_size)
        self.requests, self.answers = requests, [None] * len(requests)
        self.forward = CachedForward(self.model, rows=self.batch_size * depth(root), max_seq_length=length)
        try:
            self._visit(root.children, level=0)
        finally:
            self.forward.close()
        return self.answers

    def _end(self, node: _Node) -> int:
        return len(node.tokens) if node.request is not None else node.length

    def _span(self, node: _Node) -> tuple[int, int, int]:
        """(positions to compute, last position + 1, HFLM's short last query block or 0): every
        query block and matrix multiply then has the shape HFLM's forward gave it."""
        end, kv_len = self._end(node), node.kv_len
        short = kv_len % attention_query_block(kv_len)
        if short and short < SMALL_BLOCK and end > kv_len - short:
            # the positions reach HFLM's short last query block: end where it ends, with one as short
            span = max(kv_len - node.reuse, MIN_ROWS)
            while span % attention_query_block(span) != short:
                span += 1
            return span, kv_len, short
        return max(SMALL_BLOCK, -(-(end - node.reuse) // SMALL_BLOCK) * SMALL_BLOCK), end, 0

    def _visit(self, nodes: list[_Node], level: int) -> None:
        """Compute ``nodes`` (their parents are in cache rows) in batches, each batch's subtrees next."""
        for node in nodes:
            node.reuse = min(node.reuse, self.requests[node.request].first) if node.request is not None \
                else node.reuse
        spans = {id(n): self._span(n) for n in nodes}
        nodes = sorted(nodes, key=lambda n: (spans[id(n)][2], spans[id(n)][0]))
        batch: list[_Node] = []
        for node in nodes + [None]:
            head = spans[id(batch[0])] if batch else None
            # a short last block ends each row at its own key length: those rows go one at a time
            if batch and (node is None or len(batch) == self.batch_size or head[2]
                          or spans[id(node)][2] or spans[id(node)][0] > 1.25 * head[0] + 32):
                self._run(batch, [spans[id(n)] for n in batch], level)
                children = []
                for row, done in enumerate(batch):
                    for child in done.children:
                        child.parent_row, child.reuse = level * self.batch_size + row, done.length
                        children.append(child)
                self._visit(children, level + 1)
                batch = []
            if node is not None:
                batch.append(node)

    def _run(self, batch: list[_Node], spans: list[tuple[int, int, int]], level: int) -> None:
        """One forward computing each node's span in its own cache row, then the requests' scores."""
        first_row = level * self.batch_size
        span = max(s for s, _, _ in spans)  # a row with a short last block is alone (see _visit)
        if span * len(batch) < MIN_ROWS:  # every matrix multiply gets MIN_ROWS rows
            span = MIN_ROWS
        ids = torch.full((len(batch), span), self.pad_id, dtype=torch.long)
        positions = torch.empty((len(batch), span), dtype=torch.long)
        starts = []
        for b, (node, (_, end, _)) in enumerate(zip(batch, spans)):
            start = max(0, end - span)
            real = max(0, min(span, len(node.tokens) - start))
            ids[b, :real] = torch.from_numpy(node.tokens[start:start + real])
            positions[b] = torch.arange(start, start + span)
            if node.parent_row is not None:
                self.forward.copy_row(node.parent_row, first_row + b, start)
            starts.append(start)
        hidden = self.forward.hidden(ids.to(self.device), positions.to(self.device), first_row,
                                     [n.kv_len for n in batch])
        self.stats["forwards"] += 1
        self.stats["positions_computed"] += span * len(batch)
        self._score(batch, starts, hidden)

    def _score(self, batch: list[_Node], starts: list[int], hidden: torch.Tensor) -> None:
        """Log-probs at the requests' scored positions: one LM head over at least ``MIN_ROWS`` rows."""
        picked, sizes = [], []
        for b, (node, start) in enumerate(zip(batch, starts)):
            if node.request is not None:
                r = self.requests[node.request]
                picked.append(hidden[b, r.first - start: len(r.tokens) - start])
                sizes.append((node.request, len(r.tokens) - r.first))
        if not picked:
            return
        rows = torch.cat(picked)
        filler = max(0, MIN_ROWS - rows.size(0))
        logprobs = F.log_softmax(self.forward.logits(torch.cat([rows, hidden.flatten(0, 1)[:filler]])), dim=-1)
        offset = 0
        for request, size in sizes:
            logits = logprobs[offset: offset + size].unsqueeze(0)
            offset += size
            r = self.requests[request]
            self.answers[request] = {tuple(c): answer(logits, c) for c in r.continuations}
            self.stats["requests"] += 1
            self.stats["positions"] += len(r.tokens)
