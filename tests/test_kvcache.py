"""CachedForward's grouped-query attention (the server's) against litgpt's repeated K/V (eval's)."""

from __future__ import annotations

import torch

from onegpu import inference
from onegpu.kvcache import CachedForward, plain_grouped_attention


def run(model, grouped: bool, prompts: list[list[int]], next_ids: list[int]) -> list[torch.Tensor]:
    """Prefill each prompt into its own row in two chunks, then one decode step for all rows."""
    forward = CachedForward(model, rows=len(prompts), max_seq_length=128, grouped_kv=grouped)
    try:
        out = []
        for row, ids in enumerate(prompts):
            half = len(ids) // 2
            for start, stop in ((0, half), (half, len(ids))):
                out.append(forward.hidden(torch.tensor([ids[start:stop]]), torch.arange(start, stop), row, stop))
        positions = torch.tensor([[len(ids)] for ids in prompts])
        out.append(forward.hidden(torch.tensor([[t] for t in next_ids]), positions, 0, int(positions.max()) + 1))
        out.append(forward.logits(out[-1][:, -1]))
        return out
    finally:
        forward.close()


def test_grouped_attention_matches_litgpt_and_gives_the_model_back(bundled_checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = inference.load(bundled_checkpoint, device="cpu", prompt_style="raw", who="test").model
        assert all(plain_grouped_attention(block.attn) for block in model.transformer.h)  # SmolLM2: 9 heads, 3 groups
        prompts = [list(range(100, 137)), list(range(2000, 2021))]  # rows of different lengths
        with torch.inference_mode():
            before = model(torch.tensor([prompts[0]]))
            grouped = run(model, True, prompts, [5, 7])
            repeated = run(model, False, prompts, [5, 7])
            after = model(torch.tensor([prompts[0]]))
        for a, b in zip(grouped, repeated):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
        assert torch.equal(grouped[-1].argmax(-1), repeated[-1].argmax(-1))
        assert torch.equal(before, after)  # close() gave litgpt its attention and LM head back
        assert "forward" not in model.transformer.h[0].attn.__dict__
    finally:
        torch.set_num_threads(threads)
