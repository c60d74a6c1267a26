"""Examples -> micro-batches, with or without packing, and the forward pass that respects them.

Packing puts several examples in one row of up to ``max_seq_length`` tokens. Each example attends
only to itself (block-diagonal causal mask) and its positions restart at 0, so a packed row
computes exactly what the examples would compute one by one, with no padding slots burnt. The
loss is summed over response tokens and divided by the number of response tokens of the whole
optimizer step, so packing, padding and gradient accumulation all give the same loss.

Attention backends:
* CPU (and any device when the row holds one example): litgpt's attention with a boolean
  ``attn_mask`` through ``F.scaled_dot_product_attention`` (padding mode passes no mask at all, so
  SDPA keeps its ``is_causal`` fast path).
* CUDA + packing: a FlexAttention ``BlockMask`` built from segment ids, so attention runs as a
  fused kernel that also *skips* the fully-masked blocks between examples (a dense boolean mask
  would drop SDPA to the math/efficient kernel and still compute every block). Installed by
  :func:`use_flex_attention`; it needs ``torch.compile``-able FlexAttention (torch >= 2.5, CUDA).
"""

from __future__ import annotations

import math
import random
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from litgpt.model import do_softcapping
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from onegpu.data.schema import encode_example, render

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken (prompt tokens unless train_on_prompt)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        # labels are shifted by one inside the loss: token t predicts t+1
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def tokenize_example(tokenizer: Any, prompt: str, response: str, max_seq_length: int,
                     train_on_prompt: bool = False) -> Example:
    """litgpt's SFTDataset recipe: prompt (with BOS if the tokenizer uses one) + response + EOS.

    The ids come from ``onegpu.data.schema.encode_example``, the rule the data stage counts with.
    """
    prompt_ids, response_ids = encode_example(tokenizer, prompt, response)
    ids = prompt_ids + response_ids
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + response_ids
    truncated = len(ids) > max_seq_length
    return Example(ids[:max_seq_length], labels[:max_seq_length], truncated)


def tokenize_rows(rows: list[dict[str, Any]], style: Any, tokenizer: Any, max_seq_length: int,
                  train_on_prompt: bool = False) -> list[Example]:
    """Data-stage rows rendered with a litgpt prompt style (``data.schema.render``), then tokenized."""

    return [tokenize_example(tokenizer, *render(row, style), max_seq_length, train_on_prompt) for row in rows]


def plan_rows(lengths: list[int], max_seq_length: int, packing: bool, seed: int, epoch: int,
              window: int = 1024) -> list[list[int]]:
    """Example indices per row, for one epoch; deterministic in (seed, epoch) so resume is exact.

    Packing: shuffle, then first-fit-decreasing inside windows of ``window`` examples (keeps the
    order mostly random while filling rows to ~95%+). Padding: one example per row.
    """
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if not packing:
        return [[i] for i in order]
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        bins: list[list[int]] = []
        space: list[int] = []
        for i in chunk:
            for b, free in enumerate(space):
                if lengths[i] <= free:
                    bins[b].append(i)
                    space[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                space.append(max_seq_length - lengths[i])
        rows.extend(bins)
    random.Random(seed * 7_919 + epoch).shuffle(rows)
    return rows


def plan_micro_batches(lengths: list[int], max_seq_length: int, micro_batch_size: int, packing: bool,
                       seed: int, epoch: int) -> list[list[list[int]]]:
    rows = plan_rows(lengths, max_seq_length, packing, seed, epoch)
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


class MicroBatches:
    """The micro-batches of a list of examples, epoch after epoch, by their global index.

    Index ``i`` is micro-batch ``i % per_epoch`` of epoch ``i // per_epoch``; each epoch's plan is
    deterministic in (seed, epoch), so the index alone is the data position a checkpoint stores.
    """

    def __init__(self, examples: list[Example], max_seq_length: int, micro_batch_size: int, packing: bool,
                 seed: int, pad_id: int = 0, pad_multiple: int = 1):
        self.examples = examples
        self.lengths = [len(e) for e in examples]
        self.max_seq_length, self.micro_batch_size, self.packing, self.seed = max_seq_length, micro_batch_size, packing, seed
        self.pad_id, self.pad_multiple = pad_id, pad_multiple
        self._plan: tuple[int, list[list[list[int]]]] = (0, self.epoch_plan(0))
        self.per_epoch = len(self._plan[1])

    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        """Example indices per row, rows per micro-batch, for one epoch."""
        return plan_micro_batches(self.lengths, self.max_seq_length, self.micro_batch_size, self.packing, self.seed, epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, i = divmod(index, self.per_epoch)
        if self._plan[0] != epoch:
            self._plan = (epoch, self.epoch_plan(epoch))
        return self.collate(self._plan[1][i])

    def collate(self, rows: list[list[int]]) -> dict[str, Any]:
        return collate(self.examples, rows, self.pad_id, self.pad_multiple)


def collate(examples: list[Example], rows: list[list[int]], pad_id: int = 0,
            pad_multiple: int = 1) -> dict[str, Any]:
    """Rows of example indices -> tensors.

    Returns input_ids / labels (already shifted: labels[t] is the target of input t) / positions
    (restart per example) / segment_ids (example number inside the row, -1 on padding), plus counts.
    """
    row_lengths = [sum(len(examples[i]) for i in row) for row in rows]
    T = max(row_lengths)
    T = int(math.ceil(T / pad_multiple) * pad_multiple)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segment_ids = torch.full((B, T), -1, dtype=torch.long)
    n_examples = 0
    for b, row in enumerate(rows):
        cursor = 0
        for seg, i in enumerate(row):
            ex = examples[i]
            n = len(ex)
            input_ids[b, cursor:cursor + n] = torch.tensor(ex.input_ids)
            # shift inside the example so the last token of one example never predicts the next one
            labels[b, cursor:cursor + n - 1] = torch.tensor(ex.labels[1:])
            positions[b, cursor:cursor + n] = torch.arange(n)
            segment_ids[b, cursor:cursor + n] = seg
            cursor += n
            n_examples += 1
    n_tokens = sum(row_lengths)
    return {
        "input_ids": input_ids, "labels": labels, "positions": positions, "segment_ids": segment_ids,
        "n_tokens": n_tokens, "n_slots": B * T, "n_examples": n_examples,
        "n_loss_tokens": int((labels != IGNORE_INDEX).sum()),
        "packed": any(len(row) > 1 for row in rows),
        "segment_lengths": [len(examples[i]) for row in rows for i in row],
    }


def block_diagonal_causal_mask(segment_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) boolean mask, True = may attend: same example and not in the future.

    ``window`` (sliding-window layers) also keeps a query from keys ``window`` or more tokens back.
    Padding (segment -1) attends to earlier padding only, which keeps every row of the mask
    non-empty (an all-False row makes SDPA return NaN) and never touches real tokens.
    """
    T = segment_ids.size(1)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    if window is not None and window < T:
        causal = causal.triu(diagonal=1 - window)
    return (same & causal).unsqueeze(1)


def sliding_windows(model: torch.nn.Module) -> list[int | None]:
    """Each block's attention window (None = full), taking the window over from litgpt on first use.

    litgpt's sliding-window layers (Mistral, Gemma 2/3, ...) *replace* the mask they are given by a
    plain window mask, so packed examples would attend to each other there. So those layers stop
    applying their window themselves, and :func:`forward_hidden` builds masks that hold both the
    example boundaries and the window. Only the training forward sees this model object.
    """
    windows = getattr(model, "packed_forward_windows", None)
    if windows is None:
        windows = []
        for block in model.transformer.h:
            own = bool(getattr(block.attn, "apply_sliding_window_attention", False))
            windows.append(block.attn.config.sliding_window_size if own else None)
            if own:
                block.attn.apply_sliding_window_attention = False
        model.packed_forward_windows = windows
    return windows


# ------------------------------------------------------------------------------ CUDA: FlexAttention
def flex_block_mask(segment_ids: torch.Tensor, window: int | None = None):
    """FlexAttention BlockMask for packed rows (CUDA). Blocks between examples are skipped entirely."""

    seg = segment_ids
    B, T = seg.shape

    def packed_causal(b, h, q_idx, kv_idx):
        return (seg[b, q_idx] == seg[b, kv_idx]) & (q_idx >= kv_idx)

    def packed_causal_window(b, h, q_idx, kv_idx):
        return packed_causal(b, h, q_idx, kv_idx) & (q_idx - kv_idx < window)

    mask_mod = packed_causal if window is None or window >= T else packed_causal_window
    return create_block_mask(mask_mod, B, None, T, T, device=seg.device)


_compiled_flex = None


def _flex_sdpa(self, q, k, v, mask=None):
    """Drop-in for litgpt's ``CausalSelfAttention.scaled_dot_product_attention`` taking a BlockMask."""

    global _compiled_flex
    if not isinstance(mask, BlockMask):  # no packing in this batch: litgpt's own SDPA path
        return type(self).scaled_dot_product_attention(self, q, k, v, mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    scale = 1.0 / math.sqrt(self.config.attention_scores_scalar or self.config.head_size)
    y = _compiled_flex(q, k, v, block_mask=mask, scale=scale)
    return y.transpose(1, 2)


def use_flex_attention(model: torch.nn.Module) -> bool:
    """Route packed attention of every block through FlexAttention (CUDA only). Returns True if installed."""
    if not torch.cuda.is_available():
        return False
    for block in model.transformer.h:
        if block.attn.config.attention_logit_softcapping is not None:
            return False  # softcapping needs a score_mod; keep the dense path for such models
    for block in model.transformer.h:
        block.attn.scaled_dot_product_attention = types.MethodType(_flex_sdpa, block.attn)
    return True


# ------------------------------------------------------------------------------------ the forward
def forward_hidden(model: torch.nn.Module, batch: dict[str, Any], *, flex: bool = False, neftune_alpha: float = 0.0,
                   activation_checkpointing: bool = False) -> torch.Tensor:
    """litgpt GPT.forward, but with per-token positions and a packed mask; returns final hidden states.

    GPT.forward only takes per-token positions together with a KV cache (inference), so the block
    loop is repeated here (it is short) to pass (cos, sin) gathered at the restarting positions.
    """
    idx = batch["input_ids"]
    cfg = model.config
    T = idx.size(1)
    windows = sliding_windows(model)
    if batch["packed"]:
        pos = batch["positions"]
        cos, sin = model.cos[pos], model.sin[pos]  # (B, T, rope_n_elem)
        make_mask = flex_block_mask if flex else block_diagonal_causal_mask
        masks = {w: make_mask(batch["segment_ids"], w) for w in set(windows)}
    else:  # one example per row, right-padded: plain causal attention is exact (SDPA's is_causal path)
        cos, sin = model.cos[:T].unsqueeze(0), model.sin[:T].unsqueeze(0)
        no_segments = torch.zeros(1, T, dtype=torch.long, device=idx.device)
        masks = {w: None if w is None or w >= T else block_diagonal_causal_mask(no_segments, w) for w in set(windows)}
    x = model.transformer.wte(idx)
    if cfg.scale_embeddings:
        x = x * torch.tensor(cfg.n_embd**0.5, dtype=x.dtype)
    if neftune_alpha > 0 and model.training:
        x = x + neftune_noise(x, batch, neftune_alpha)
    for block_idx, block in enumerate(model.transformer.h):
        c, s = cos, sin
        if cfg.rope_indices is not None:
            c, s = cos[..., cfg.rope_indices[block_idx]], sin[..., cfg.rope_indices[block_idx]]
        mask = masks[windows[block_idx]]
        if activation_checkpointing and model.training:
            x = torch.utils.checkpoint.checkpoint(block, x, c, s, mask, use_reentrant=False)
        else:
            x = block(x, c, s, mask)
    return model.transformer.ln_f(x)


def neftune_noise(x: torch.Tensor, batch: dict[str, Any], alpha: float) -> torch.Tensor:
    """NEFTune (Jain et al. 2023): uniform noise of scale alpha / sqrt(L * d) on the embeddings.

    L is each token's own example length (not the packed row length), so packing does not shrink
    the noise compared with training on the examples one by one.
    """
    seg = batch["segment_ids"]
    lengths = torch.ones_like(seg, dtype=x.dtype)
    cursor_lengths = batch["segment_lengths"]
    # expand per-example lengths over their tokens, row by row
    k = 0
    for b in range(seg.size(0)):
        n_seg = int(seg[b].max().item()) + 1 if (seg[b] >= 0).any() else 0
        for s in range(n_seg):
            lengths[b][seg[b] == s] = float(cursor_lengths[k])
            k += 1
    scale = alpha / torch.sqrt(lengths * x.size(-1))
    noise = torch.empty_like(x).uniform_(-1, 1) * scale.unsqueeze(-1)
    return noise * (seg >= 0).unsqueeze(-1).to(x.dtype)


def loss_sum(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over the loss positions, and their count.

    The LM head runs only on positions that carry a loss (responses): prompt and padding logits
    are never needed, and on a 49k-vocab model the head is ~20% of the FLOPs and most of the
    activation memory.
    """
    keep = labels != IGNORE_INDEX
    h = hidden[keep]
    logits = model.lm_head(h)
    if model.config.final_logit_softcapping is not None:

        logits = do_softcapping(logits, model.config.final_logit_softcapping)
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), int(keep.sum())


def per_token_losses(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) token losses (0 where ignored): for tests and per-example diagnostics."""
    logits = model.lm_head(hidden).float()
    out = F.cross_entropy(logits.flatten(0, 1), labels.flatten().clamp(min=0), reduction="none").view(labels.shape)
    return out * (labels != IGNORE_INDEX)


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
