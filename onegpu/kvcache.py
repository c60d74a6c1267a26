"""K/V-cache forwards shared by ``onegpu serve`` and ``onegpu eval val``.

Both score tokens against a prefix whose keys and values were computed before: the server's
continuous batching (a prompt prefilled into a free row, one decode step for all rows, a cached
few-shot prefix copied into a row) and validation's shared contexts (a multiple-choice context
computed once, each continuation scored from its K/V). :class:`CachedForward` is that one piece:

* :class:`SlotKVCache` replaces litgpt's per-layer ``KVCache`` with rows any forward can address
  (``row_start``), so a forward of ``B`` sequences reads and writes cache rows ``row_start..+B``;
* the forward returns hidden states; :meth:`CachedForward.logits` applies the LM head only to the
  positions whose logits are needed (a 49k-token vocabulary makes the head a fifth of a small
  model's work per position, and its (T, vocab) output is the largest tensor of a long prompt);
* ``kv_len`` is the number of key positions attention runs over (litgpt's ``input_pos_maxp1``):
  keys past a row's own position are masked, so any ``kv_len`` above the last position gives the
  same attention up to rounding; eval chooses it to reproduce lm-eval's padded batches exactly.
* ``grouped_kv=True`` (the server) attends with K/V kept in their query groups: litgpt repeats each
  group's K/V for its query heads, which in a decode step of B rows copies B x kv_len x n_head x
  head_size values per layer, more memory traffic than the layer's weights. Off for eval, whose
  scores reproduce HFLM's (repeated) attention bit for bit.
"""

from __future__ import annotations

import math

import torch
from litgpt.model import CausalSelfAttention, KVCache, apply_rope
from torch import nn
from torch.nn import functional as F


class SlotKVCache(KVCache):
    """litgpt's KV cache layout ``(rows, groups, positions, head)``, addressable from any row.

    ``row_start`` says which cache row the forward's batch row 0 is (set before each forward), so
    a prompt can be prefilled straight into a free row. Decode steps write one position per row
    with one indexed assignment instead of litgpt's per-row loop.
    """

    def __init__(self, k_shape, v_shape, device, dtype):
        nn.Module.__init__(self)  # KVCache.__init__ would allocate the same buffers
        self.register_buffer("k", torch.zeros(k_shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(v_shape, device=device, dtype=dtype), persistent=False)
        self.is_sliding_window = False
        self.sliding_window_size = None
        self.max_cache_len = k_shape[2]
        self.row_start = 0

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        bs = k.size(0)
        k_buf = self.k[self.row_start:self.row_start + bs]
        v_buf = self.v[self.row_start:self.row_start + bs]
        k, v = k.to(k_buf.dtype), v.to(v_buf.dtype)
        if input_pos.dim() == 1:  # the same positions for every row
            k_buf.index_copy_(2, input_pos, k)
            v_buf.index_copy_(2, input_pos, v)
        elif input_pos.size(1) == 1:  # decode: one new position per row
            rows = torch.arange(bs, device=k.device)
            k_buf[rows, :, input_pos[:, 0]] = k[:, :, 0]
            v_buf[rows, :, input_pos[:, 0]] = v[:, :, 0]
        else:
            for i in range(bs):
                k_buf[i].index_copy_(1, input_pos[i], k[i])
                v_buf[i].index_copy_(1, input_pos[i], v[i])
        return k_buf, v_buf

    def reset_parameters(self) -> None:
        self.k.zero_()
        self.v.zero_()


class CachedForward:
    """A litgpt ``GPT`` whose attention layers read and write ``rows`` rows of :class:`SlotKVCache`.

    Takes the model over (its LM head and KV-cache slots) until :meth:`close`, which gives them
    back so the model can run plain forwards or litgpt's own generation again.
    """

    def __init__(self, model, rows: int, max_seq_length: int, grouped_kv: bool = False):
        param = next(model.parameters())
        self.model, self.device, self.dtype = model, param.device, param.dtype
        self.rows, self.max_seq_length = rows, max_seq_length
        self.vocab_size = model.config.vocab_size
        self.softcap = model.config.final_logit_softcapping
        self.lm_head = model.lm_head
        model.lm_head = nn.Identity()
        model.config.final_logit_softcapping = None
        if model.max_seq_length < max_seq_length:  # RoPE for every position a row can hold
            model.max_seq_length = max_seq_length
        with torch.device(self.device):  # litgpt's causal mask and RoPE caches for this length
            model.set_kv_cache(batch_size=1, max_seq_length=max_seq_length)
        self.caches: list[SlotKVCache] = []
        self.row_kv_lens: list[int] | None = None  # per batch row, for the current forward
        for block in model.transformer.h:
            ref = block.attn.kv_cache
            cache = SlotKVCache((rows,) + tuple(ref.k.shape[1:]), (rows,) + tuple(ref.v.shape[1:]),
                                self.device, ref.k.dtype)
            block.attn.kv_cache = cache
            self.caches.append(cache)
            if grouped_kv and plain_grouped_attention(block.attn):
                block.attn.forward = self._grouped_forward(block.attn)
            else:
                block.attn.scaled_dot_product_attention = self._attention(block.attn.scaled_dot_product_attention)

    def _attention(self, attend):
        """Wrap a layer's attention call: batch row ``b`` attends over ``row_kv_lens[b]`` keys."""

        def attend_rows(q, k, v, mask=None):
            lens = self.row_kv_lens
            if lens is None or len(set(lens)) == 1:
                n = k.size(2) if lens is None else lens[0]
                return attend(q, k[:, :, :n], v[:, :, :n], None if mask is None else mask[..., :n])
            mask = mask.expand(q.size(0), *mask.shape[1:])
            return torch.cat([attend(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], mask[b:b + 1, ..., :n])
                              for b, n in enumerate(lens)])

        return attend_rows

    def _grouped_forward(self, attn: CausalSelfAttention):
        """litgpt's attention forward for cached positions, with each K/V group attended once by
        its ``q_per_kv`` query heads stacked as extra query rows (the same dot products and
        softmax as litgpt's repeated K/V, without copying them). Plain forwards stay litgpt's."""
        config, plain = attn.config, attn.forward
        heads, groups, size = config.n_head, config.n_query_groups, config.head_size
        per_group = heads // groups
        scale = 1.0 / math.sqrt(config.attention_scores_scalar or size)
        scale = scale * attn.mscale * attn.mscale  # as litgpt computes it

        def attend(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale)

        attend_rows = self._attention(attend)

        def forward(x, cos, sin, mask=None, input_pos=None, input_pos_maxp1=None):
            if input_pos is None:
                return plain(x, cos, sin, mask, input_pos, input_pos_maxp1)
            B, T, _ = x.shape
            q, k, v = attn.qkv(x).split((heads * size, groups * size, groups * size), dim=-1)
            q = apply_rope(q.view(B, T, heads, size).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(B, T, groups, size).transpose(1, 2), cos, sin)
            k, v = attn.kv_cache(input_pos, k, v.view(B, T, groups, size).transpose(1, 2))
            # query head j of group g becomes rows j*T..j*T+T-1 of g (repeat_interleave's head order)
            q = q.reshape(B, groups, per_group * T, size)
            mask = mask.unsqueeze(2).expand(-1, -1, per_group, -1, -1).reshape(mask.size(0), 1, per_group * T, -1)
            y = attend_rows(q, k, v, mask)  # (B, groups, per_group * T, size)
            return attn.proj(y.reshape(B, heads, T, size).transpose(1, 2).reshape(B, T, heads * size))

        return forward

    def hidden(self, idx: torch.Tensor, input_pos: torch.Tensor, row_start: int,
               kv_len: int | list[int]) -> torch.Tensor:
        """Final hidden states (B, T, C) of tokens ``idx`` (B, T) at ``input_pos`` ((T,) or (B, T)),
        batch row ``b`` in cache row ``row_start + b``. Attention runs over ``kv_len`` key positions,
        or over ``kv_len[b]`` for batch row ``b``."""
        for cache in self.caches:
            cache.row_start = row_start
        self.row_kv_lens = [kv_len] * idx.size(0) if isinstance(kv_len, int) else list(kv_len)
        try:
            return self.model(idx, input_pos=input_pos, input_pos_maxp1=max(self.row_kv_lens))
        finally:
            self.row_kv_lens = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float32, vocabulary size) of hidden states (..., C)."""
        logits = self.lm_head(hidden).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[..., : self.vocab_size]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the K/V of positions ``[0, length)`` from cache row ``src`` to row ``dst``."""
        if src != dst and length > 0:
            for cache in self.caches:
                cache.k[dst, :, :length] = cache.k[src, :, :length]
                cache.v[dst, :, :length] = cache.v[src, :, :length]

    def nbytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in self.caches)

    def close(self) -> None:
        """Give the model back its LM head and softcap; drop the caches."""
        self.model.lm_head = self.lm_head
        self.model.config.final_logit_softcapping = self.softcap
        self.model.clear_kv_cache()
        for block in self.model.transformer.h:  # back to the class's methods
            block.attn.__dict__.pop("scaled_dot_product_attention", None)
            block.attn.__dict__.pop("forward", None)
        self.caches = []


def plain_grouped_attention(attn) -> bool:
    """Whether :meth:`CachedForward._grouped_forward` computes what litgpt's forward does for this
    layer: grouped-query attention (litgpt repeats K/V), RoPE over the whole head, and none of
    q/k norms, interleaved RoPE, sliding windows or logit softcapping."""
    config = attn.config
    return (type(attn) is CausalSelfAttention and 1 < config.n_query_groups < config.n_head
            and not config.norm_qk and not config.rope_interleave and config.rope_n_elem == config.head_size
            and not attn.apply_sliding_window_attention and config.attention_logit_softcapping is None)
