"""Packing is exact: a packed row computes what the examples compute one by one (real SmolLM2 forward)."""

from __future__ import annotations

import pytest
import torch

from onegpu.finetune.packing import (IGNORE_INDEX, Example, block_diagonal_causal_mask, collate, forward_hidden, loss_sum,
                              per_token_losses, plan_rows, tokenize_example)


def _bundled_lora_model(checkpoint_dir):
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable

    config = Config.from_file(checkpoint_dir / "model_config.yaml", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = GPT(config)
    model.load_state_dict(torch.load(checkpoint_dir / "lit_model.pth", mmap=True, weights_only=True), strict=False)
    mark_only_lora_as_trainable(model)
    model.max_seq_length = 256
    return model.eval()


def _examples(checkpoint_dir):
    from litgpt.tokenizer import Tokenizer

    from onegpu.data.schema import make_row, render

    tok = Tokenizer(checkpoint_dir)
    rows = [
        make_row("t", "Name a primary colour.", "Red is a primary colour.", license="x", provenance="human"),
        make_row("t", "Translate to French: good morning", "Bonjour.", license="x", provenance="human"),
        make_row("t", "Summarise the text.", "A cat sat on a mat and slept all day long.",
                 input="The cat sat on the mat. It was warm, so it slept there all day.", license="x",
                 provenance="human"),
    ]
    return [tokenize_example(tok, *render(r, "alpaca"), max_seq_length=256) for r in rows]


@pytest.mark.slow
def test_packed_loss_equals_examples_one_by_one(bundled_checkpoint):
    torch.manual_seed(0)
    model = _bundled_lora_model(bundled_checkpoint)
    examples = _examples(bundled_checkpoint)
    with torch.no_grad():
        packed = collate(examples, [[0, 1, 2]])
        assert packed["packed"] and packed["n_slots"] == packed["n_tokens"] == sum(len(e) for e in examples)
        hidden = forward_hidden(model, packed)
        packed_sum, packed_n = loss_sum(model, hidden, packed["labels"])
        token_losses = per_token_losses(model, hidden, packed["labels"])[0]

        sums, counts, cursor = [], [], 0
        for i, ex in enumerate(examples):
            single = collate(examples, [[i]])
            assert not single["packed"]
            s, n = loss_sum(model, forward_hidden(model, single), single["labels"])
            sums.append(s.item())
            counts.append(n)
            # per-example loss read out of the packed row equals the example run alone
            seg = token_losses[cursor:cursor + len(ex)].sum().item()
            assert abs(seg - s.item()) <= 1e-4 * max(1.0, abs(s.item())), (i, seg, s.item())
            cursor += len(ex)
    assert packed_n == sum(counts) == sum(e.n_loss_tokens for e in examples)
    packed_mean = packed_sum.item() / packed_n
    mean_one_by_one = sum(sums) / sum(counts)
    assert abs(packed_mean - mean_one_by_one) < 1e-5, (packed_mean, mean_one_by_one)
    # and not trivially: without the block-diagonal mask the later examples see the earlier ones
    leaky = dict(packed, segment_ids=torch.zeros_like(packed["segment_ids"]))
    with torch.no_grad():
        leaky_sum, _ = loss_sum(model, forward_hidden(model, leaky), packed["labels"])
    assert abs(leaky_sum.item() / packed_n - packed_mean) > 1e-3


def test_loss_only_on_responses_and_positions_restart():
    a = Example([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])
    b = Example([9, 10, 11], [IGNORE_INDEX, 10, 11])
    batch = collate([a, b], [[0, 1]], pad_id=0)
    assert batch["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert batch["segment_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    # targets shifted inside each example; the last token of `a` never predicts the first of `b`
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, 11, IGNORE_INDEX]
    assert batch["n_loss_tokens"] == a.n_loss_tokens + b.n_loss_tokens == 4
    mask = block_diagonal_causal_mask(batch["segment_ids"])[0, 0]
    assert mask[5, 4] and not mask[4, 3] and not mask[3, 4] and mask.diagonal().all()


def test_packing_fills_rows_and_keeps_every_example():
    lengths = [300, 200, 120, 90, 60, 50, 40, 500, 10, 250]
    rows = plan_rows(lengths, 512, packing=True, seed=1, epoch=0)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))  # nothing dropped, nothing duplicated
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert len(rows) < len(lengths)
    assert rows == plan_rows(lengths, 512, packing=True, seed=1, epoch=0)  # deterministic (exact resume)
    padded = plan_rows(lengths, 512, packing=False, seed=1, epoch=0)
    assert all(len(row) == 1 for row in padded) and sorted(r[0] for r in padded) == list(range(len(lengths)))


def test_packing_is_exact_on_sliding_window_layers():
    """Mistral-style layers: litgpt's own window replaces the mask it gets, which let packed examples
    see each other; the packed forward holds both the window and the example boundaries."""
    from litgpt.model import GPT, Config

    torch.manual_seed(0)
    window = 4
    config = Config(block_size=64, vocab_size=64, padded_vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                    sliding_window_size=window, sliding_window_indices=[1, 0])
    reference = GPT(config).eval()  # litgpt's own forward: the truth for one example at a time
    model = GPT(config).eval()
    model.load_state_dict(reference.state_dict())
    examples = [Example(list(range(1, 11)), list(range(1, 11))), Example(list(range(20, 29)), list(range(20, 29)))]
    with torch.no_grad():
        packed = collate(examples, [[0, 1]])
        hidden = forward_hidden(model, packed)
        assert model.packed_forward_windows == [window, None]
        cursor = 0
        for i, ex in enumerate(examples):
            alone = forward_hidden(model, collate(examples, [[i]]))[0, :len(ex)]
            truth = reference.transformer.ln_f(_litgpt_blocks(reference, torch.tensor([ex.input_ids])))[0]
            assert torch.allclose(alone, truth, atol=1e-5)  # the window still binds (T = 10 > 4)
            assert torch.allclose(hidden[0, cursor:cursor + len(ex)], truth, atol=1e-5), i
            cursor += len(ex)
        # without the window the second layer's first tokens would differ: the test is not vacuous
        no_window = block_diagonal_causal_mask(packed["segment_ids"])
        assert not torch.equal(no_window, block_diagonal_causal_mask(packed["segment_ids"], window))


def _litgpt_blocks(model, idx):
    """litgpt GPT.forward up to the final norm (its own masks, including its sliding window)."""
    T = idx.size(1)
    x = model.transformer.wte(idx)
    for block in model.transformer.h:
        x = block(x, model.cos[:T].unsqueeze(0), model.sin[:T].unsqueeze(0), None)
    return x
