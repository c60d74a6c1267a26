"""lm-eval-harness model backed directly by a litgpt checkpoint: ``--model onegpu``.

Why not litgpt's own ``litgpt evaluate``: it converts the checkpoint to HF format on disk first.
This wrapper runs the litgpt ``GPT`` in-process and mirrors lm-eval's ``HFLM`` request handling
(same tokenizer calls, same request ordering and padding, same one-token-continuation logits reuse),
so its scores equal HFLM's on the same weights (``tests/test_eval_lm.py`` checks it to 1e-4).

Model, dtype, tokenizer files, BOS and prompt style come from ``onegpu.inference.load``, the
server's loader: prompts start with BOS exactly when the server's (and the fine-tune's) did, which
is ``HFLM(add_bos_token=...)`` with the layer's decision, not the HF tokenizer's own default.

* ``loglikelihood``: requests sorted longest-first, batched, right-padded, one full forward per
  batch (no KV cache). Contexts are scored **raw** (no prompt template): lm-eval's norm for
  multiple-choice tasks, and the only way scores stay comparable with other harness users.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows, scored like the above.
* ``generate_until``: batched greedy decoding with litgpt's KV cache. Contexts are left-padded;
  a per-row attention mask hides the padding (RoPE is relative, so the shift of positions does not
  change attention). Stops at EOS or when every row's text contains a stop string; the text is
  cut at the first stop string, as HFLM does. The checkpoint's prompt style (``prompt_style``:
  ``raw``, ``auto`` or a litgpt style name) wraps generation contexts only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.models.utils_hf import pad_and_concat
from lm_eval import utils as lm_utils
from tqdm import tqdm

from onegpu import inference
from onegpu.eval.shared_context import ScoreRequest, SharedContextScorer, answer

_NO_LOGITS = torch.zeros(1, 1, 1)  # Collator.get_cache wants logits; the scores are already computed


# ------------------------------------------------------------------------------------ the LM
@register_model("onegpu")
class LitGPTLM(TemplateLM):
    """lm-eval model over a litgpt checkpoint (merged, or base + LoRA adapter)."""

    def __init__(self, checkpoint: str | Path, batch_size: int | str = 8, device: str | None = None,
                 dtype: str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 prompt_style: str = "auto", logits_cache: bool = True, shared_context: bool = True,
                 **kwargs) -> None:
        super().__init__()
        loaded = inference.load(checkpoint, device=device, dtype=dtype, prompt_style=prompt_style, who="onegpu eval")
        self.checkpoint, self.base = loaded.ref.path, loaded.ref.base
        self._device, self.dtype = loaded.device, loaded.dtype
        self.model, self.prompt_style = loaded.model, loaded.prompt_style
        # HFLM's add_bos_token, set by the layer's BOS rule (the server's): never the tokenizer's own default
        self.add_bos_token = loaded.tokenizer.use_bos
        self.tokenizer = inference.hf_tokenizer(loaded.checkpoint, self.add_bos_token)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size) != "auto" else 8
        self._max_length = int(max_length or min(self.model.config.block_size, 2048))
        self._max_gen_toks = int(max_gen_toks)
        self.logits_cache = logits_cache
        self.vocab_size = self.model.config.vocab_size
        self.shared_context = shared_context
        self.scorer = SharedContextScorer(self.model, self.tokenizer.pad_token_id, self.batch_size_per_gpu)

    # lm-eval plumbing ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.checkpoint)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        # HFLM.tok_encode with add_bos_token set: BOS by the rule, unless the text already starts with it
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token and not has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id))
        encoding = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @torch.inference_mode()
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position of the token ids ``idx`` (B, T): one full forward."""
        return self.model(idx)[..., : self.vocab_size]

    # loglikelihood ------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's request order, batches and one-token-continuation reuse; the scores come from
        :meth:`_score_batches` (shared contexts, or one plain forward per batch)."""

        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _lookup_one_token_cont(req):
            return req[-2] + req[-1][:-1]

        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                          group_fn=_lookup_one_token_cont)
        batches = list(re_ord.get_batched(n=override_bs or self.batch_size_per_gpu))
        sharing: dict[tuple, dict[tuple[int, ...], None]] = {}  # requests scored from one row's logits
        for req in requests:
            key = tuple(_lookup_one_token_cont(req)) if self.logits_cache else (tuple(req[1]), tuple(req[2]))
            sharing.setdefault(key, {})[tuple(req[2])] = None
        scored = []
        for chunk in batches:
            inps = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            kv_len = max(len(inp) for inp in inps)  # HFLM right-pads the batch to its longest row
            keys = [tuple(_lookup_one_token_cont(r)) if self.logits_cache else (tuple(r[1]), tuple(r[2]))
                    for r in chunk]
            scored.append([ScoreRequest(inp, kv_len, len(inp) - len(cont), [list(c) for c in sharing[key]])
                           for inp, (_, _, cont), key in zip(inps, chunk, keys)])
        answers = self._score_batches(scored, disable_tqdm)
        res = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood", leave=False)
        for chunk, chunk_answers in zip(batches, answers):
            for (request_str, ctx_tokens, cont_toks), by_cont in zip(chunk, chunk_answers):
                for request_str, cont_toks, _ in re_ord.get_cache(req_str=request_str, cxt_toks=ctx_tokens,
                                                                  cont_toks=cont_toks, logits=_NO_LOGITS):
                    result = by_cont[tuple(cont_toks)]
                    res.append(result)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, result)
                    pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def _score_batches(self, batches: list[list[ScoreRequest]], disable_tqdm: bool = True) -> list[list[dict]]:
        """{continuation: (log-likelihood, is greedy)} per request: batches holding a shape the
        shared-context scorer cannot reproduce (see ``SharedContextScorer.can_score``) plainly."""
        plain = [not self.shared_context or not all(self.scorer.can_score(r) for r in b) for b in batches]
        shared = [r for b, p in zip(batches, plain) if not p for r in b]
        answers = iter(self.scorer.score(shared) if shared else [])
        return [self._score_plain(b) if p else [next(answers) for _ in b] for b, p in zip(batches, plain)]

    def _score_plain(self, batch: list[ScoreRequest]) -> list[dict]:
        """HFLM's way: the batch right-padded, one full forward, log-softmax at every position."""
        inps = [torch.tensor(r.tokens, dtype=torch.long, device=self.device) for r in batch]
        batched = pad_and_concat(batch[0].kv_len, inps, padding_side="right")
        multi_logits = F.log_softmax(self.logits(batched).float(), dim=-1)
        out = []
        for r, logits in zip(batch, multi_logits):
            logits = logits[r.first: len(r.tokens)].unsqueeze(0)
            out.append({tuple(c): answer(logits, c) for c in r.continuations})
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        all_windows, counts = [], []
        for req_idx, (string,) in enumerate([req.args for req in requests]):
            windows = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)))
            all_windows.extend((req_idx, (None,) + w) for w in windows)
            counts.append(len(windows))
        nlls = []
        for i in tqdm(range(0, len(all_windows), self.batch_size_per_gpu), disable=disable_tqdm,
                      desc="loglikelihood_rolling", leave=False):
            batch = [w for _, w in all_windows[i: i + self.batch_size_per_gpu]]
            nlls.extend(self._loglikelihood_tokens(batch, disable_tqdm=True, override_bs=len(batch)))
        out, pos = [], 0
        for req, n in zip(requests, counts):
            total = sum(ll for ll, _ in nlls[pos: pos + n])
            pos += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # generation ---------------------------------------------------------------------------
    def _apply_style(self, context: str) -> str:
        return context if self.prompt_style is None else self.prompt_style.apply(context)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        res = []

        def _collate(req):
            toks = self.tok_encode(req[0])
            return -len(toks), req[0]

        re_ords = Collator([(self._apply_style(r.args[0]), r.args[1]) for r in requests], sort_fn=_collate,
                           group_by="gen_kwargs", group_fn=lambda x: x[1])
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until", leave=False)
        for chunk in re_ords.get_batched(n=self.batch_size_per_gpu):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") or (kwargs.get("temperature") or 0.0) > 0.0:
                print("[onegpu] note: sampling requested; this wrapper decodes greedily", file=sys.stderr)
            encoded = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen_toks) for c in contexts]
            for context, tokens in zip(contexts, self._greedy_generate(encoded, max_gen_toks, until)):
                text = postprocess_generated_text(generation=self.tok_decode(tokens), stop=until, think_end_token=None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                pbar.update(1)
        pbar.close()
        return re_ords.get_original(res)

    @torch.inference_mode()
    def _greedy_generate(self, encoded: list[list[int]], max_new: int, until: list[str]) -> list[list[int]]:
        """Batched greedy decoding with litgpt's KV cache over left-padded prompts."""
        model, device = self.model, self.device
        B, T = len(encoded), max(len(e) for e in encoded)
        total = T + max_new
        pad_id = self.tokenizer.pad_token_id
        idx = torch.full((B, T), pad_id, dtype=torch.long, device=device)
        real = torch.zeros((B, total), dtype=torch.bool, device=device)  # which key positions are tokens
        for row, toks in enumerate(encoded):
            idx[row, T - len(toks):] = torch.tensor(toks, dtype=torch.long, device=device)
            real[row, T - len(toks):] = True
        real[:, T:] = True  # generated tokens are real; causality keeps them hidden until produced
        model.set_kv_cache(batch_size=B, max_seq_length=total, device=device, dtype=self.dtype)
        try:
            causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
            # Keys: causal AND a real token; each pad query still sees itself so no softmax row is empty.
            mask = causal.unsqueeze(0) & real.unsqueeze(1)
            mask |= torch.eye(total, dtype=torch.bool, device=device).unsqueeze(0)
            model.mask_cache = mask.unsqueeze(1)  # (B, 1, total, total), indexed by input_pos
            input_pos = torch.arange(T, device=device)
            logits = model(idx, input_pos=input_pos, input_pos_maxp1=T)[:, -1, : self.vocab_size]
            out: list[list[int]] = [[] for _ in range(B)]
            done = [False] * B
            for step in range(max_new):
                next_tok = logits.float().argmax(dim=-1)
                for row in range(B):
                    if done[row]:
                        continue
                    tok = int(next_tok[row])
                    out[row].append(tok)
                    if tok == self.eot_token_id:
                        done[row] = True
                    elif until and any(s in self.tok_decode(out[row][-16:]) for s in until if s):
                        done[row] = True
                if all(done) or step == max_new - 1:
                    break
                pos = T + step
                logits = model(next_tok.unsqueeze(1), input_pos=torch.tensor([pos], device=device),
                               input_pos_maxp1=pos + 1)[:, -1, : self.vocab_size]
        finally:
            model.clear_kv_cache()
        # EOS is not part of the text (HFLM decodes with skip_special_tokens, same thing).
        return [[t for t in row if t != self.eot_token_id] for row in out]

