"""The analytic planner: its terms against the real components, its peak against measured CPU steps, its CLI."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from onegpu.finetune.planning.memory import Workload, count_weights, layer_activation_bytes, meta_model


def tiny_config(vocab: int = 512, n_query_groups: int = 2, n_layer: int = 2):
    from onegpu.finetune.planning.measure import tiny_llama_config

    return tiny_llama_config(vocab, n_layer, n_query_groups)


def real_lora_model(config, w: Workload):
    """The trainer's model for ``w`` (random init) on CPU: litgpt LoRA GPT + onegpu's bitsandbytes swap."""
    from litgpt.lora import GPT, mark_only_lora_as_trainable

    from onegpu.finetune.quantize import quantize_frozen_linears

    torch.manual_seed(0)
    model = GPT(meta_model(config, w).config)
    mark_only_lora_as_trainable(model)
    model.max_seq_length = w.max_seq_length
    if w.quantize:
        quantize_frozen_linears(model, w.quantize, torch.float32, torch.device("cpu"))
    return model


@pytest.mark.parametrize("quantize", [None, "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.int8"])
def test_weight_bytes_and_counts_match_the_real_quantized_model(quantize):
    from onegpu.finetune.planning.measure import resident_tensor_bytes
    from onegpu.finetune.telemetry import count_parameters

    config = tiny_config()
    w = Workload(precision="32-true", quantize=quantize, lora_r=8, lora_mlp=True, max_seq_length=256, device="cpu")
    weights = count_weights(meta_model(config, w), w)
    model = real_lora_model(config, w)
    real = resident_tensor_bytes(model)
    analytic = weights.base_bytes + weights.other_bytes + weights.lora_bytes
    assert analytic == real
    trainable, total = count_parameters(model)
    assert (weights.trainable_params, weights.total_params) == (trainable, total)


SAVED_CASES = [  # (config kwargs, workload kwargs)
    ({}, {}),
    ({"n_query_groups": 4}, {"lora_key": True, "lora_projection": True, "lora_mlp": True}),  # MHA keeps the qkv output
    ({}, {"lora_dropout": 0.1, "lora_projection": True, "lora_mlp": True}),
    ({}, {"packing": True, "lora_mlp": True}),
    ({}, {"quantize": "bnb.nf4-dq", "lora_mlp": True}),
    ({}, {"quantize": "bnb.int8"}),  # ctx-held inputs are not autograd's: only what the hooks see is checked
    ({}, {"precision": "bf16-true", "lora_mlp": True, "lora_dropout": 0.05}),
]


@pytest.mark.parametrize("config_kw,w_kw", SAVED_CASES)
def test_layer_activations_match_what_autograd_saves(config_kw, w_kw):
    """Per token, the bytes of the unique storages one block saves for backward (saved_tensors_hooks)."""
    from onegpu.finetune.packing import block_diagonal_causal_mask

    config = tiny_config(**config_kw)
    w = Workload(**{"precision": "32-true", "lora_dropout": 0.0, "packing": False, "max_seq_length": 128,
                    "micro_batch_size": 2, "device": "cpu", **w_kw})
    dtype = torch.bfloat16 if w.precision.startswith("bf16") else torch.float32
    model = real_lora_model(config, replace(w, precision="32-true")).to(dtype)
    model.train()
    B, T = w.micro_batch_size, w.max_seq_length
    x = torch.randn(B, T, config.n_embd, dtype=dtype, requires_grad=True)
    mask = None
    if w.packing:
        segments = torch.zeros(B, T, dtype=torch.long)
        segments[:, T // 2:] = 1
        mask = block_diagonal_causal_mask(segments)
    known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.transformer.h[0](x, model.cos[:T].unsqueeze(0), model.sin[:T].unsqueeze(0), mask)
    measured = sum(saved.values()) / (B * T)
    parts = layer_activation_bytes(config, replace(w, quantize=None if w.quantize == "bnb.int8" else w.quantize))
    analytic = sum(parts.values())
    if dtype == torch.float32:  # in fp32 the norm's saved input is the block input, excluded above
        analytic -= 4 * config.n_embd
    else:  # bf16: RMSNorm's weight.float() copies (constant per layer)
        analytic += 2 * config.n_embd * 4 / (B * T)
    assert measured == pytest.approx(analytic, rel=0.01), parts


@pytest.mark.slow
def test_analytic_peak_within_15_percent_of_measured_cpu_steps(tmp_path, bundled_checkpoint):
    """Real training steps (LoRA and QLoRA nf4, several shapes) measured as live tensor bytes."""
    from onegpu.finetune.planning.measure import compare, validation_cases

    torch.set_num_threads(2)
    rows = []
    for checkpoint, w, shapes in validation_cases(tmp_path, bundled_checkpoint):
        rows += compare(checkpoint, w, shapes)
    table = "\n".join(f"{r['model']} {r['method']} {r['lora']} mb={r['micro_batch_size']} T={r['max_seq_length']} "
                      f"ac={r['activation_checkpointing']}: analytic {r['analytic_bytes'] / 2**20:.1f} MiB, "
                      f"measured {r['measured_bytes'] / 2**20:.1f} MiB ({r['error']:+.1%})" for r in rows)
    assert len(rows) == 8 and all(abs(r["error"]) <= 0.15 for r in rows), table


@pytest.mark.slow
@pytest.mark.parametrize("quantize,bnb_version", [(None, None), ("bnb.nf4", "0.50.2"), ("bnb.nf4", "0.42.0")])
def test_litgpt_loop_terms_match_its_measured_cpu_steps(quantize, bnb_version):
    """litgpt's finetune_lora loop body, three steps in a row (its head quantized like Lightning's plugin,
    bitsandbytes' kept inputs as 0.42 kept them): the ``loop="litgpt"`` terms, next-forward moment included."""
    from onegpu.finetune.planning.measure import measure_litgpt_loop
    from onegpu.finetune.planning.memory import estimate_memory

    torch.set_num_threads(2)
    config = tiny_config(vocab=512, n_query_groups=4, n_layer=4)
    w = Workload(precision="32-true", quantize=quantize, lora_r=8, max_seq_length=512, micro_batch_size=2,
                 packing=False, device="cpu", loop="litgpt", bnb_version=bnb_version)
    estimate = estimate_memory(config, w)
    measured = measure_litgpt_loop(config, w)
    assert estimate.tensor_peak == pytest.approx(measured, rel=0.05)
    if bnb_version == "0.42.0":  # the previous step's kept inputs are alive at the end of the next forward
        assert estimate.peak_moment == "next forward" and estimate.tensor_peak > 1.1 * estimate.first_step_peak


def test_plan_within_ten_percent_of_litgpt_published_measurements():
    """Every row of litgpt's published peak-memory tables, planned with the terms of its own loop and
    bitsandbytes (benchmarks/published_memory.py prints the same comparison for RESULTS.md)."""
    import runpy

    from onegpu.paths import REPO_ROOT

    rows = runpy.run_path(str(REPO_ROOT / "benchmarks" / "published_memory.py"))["compare"]()
    assert len(rows) == 13 and sum(1 for r in rows if r["published"].quantize) == 7
    for r in rows:
        p = r["published"]
        assert abs(r["error"]) <= 0.10, (p, r["error"])
        if p.quantize:  # bitsandbytes < 0.43.2 kept every 4-bit linear's input: a named term, not a factor
            assert r["terms"]["inputs bitsandbytes < 0.43.2 keeps on ctx"] > 0.05 * p.peak_gb * 1e9


@pytest.mark.slow
def test_analytic_cli_seven_b_thirteen_b_mistral_and_configs(capsys, tmp_path):
    from onegpu.cli import main
    from onegpu.paths import REPO_ROOT

    common = ["--analytic", "--quantize", "bnb.nf4-dq", "--lora_r", "64", "--max_seq_length", "2048",
              "--micro_batch_size", "2", "--track", "rtx4090-24gb"]
    for name in ("Llama-2-7b-hf", "Llama-2-13b-hf", "Mistral-7B-v0.1"):  # with checkpointing all three fit
        assert main(["finetune", "plan", "--model_name", name, *common, "--activation_checkpointing", "true",
                     "--out_dir", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert f"analytic plan: {name}" in out and "verdict: fits rtx4090-24gb" in out and "memory allows" in out
        assert "M tokens / 24 h" in out and "base weights" in out
    # without it, 2 x 2048 tokens of 7B activations (~22 GiB) do not: exit 2, micro-batch 1 named as the fix
    assert main(["finetune", "plan", "--model_name", "Llama-2-7b-hf", *common, "--out_dir", str(tmp_path / "no-ac")]) == 2
    assert "fix: --micro_batch_size 1" in capsys.readouterr().err
    cfg = REPO_ROOT / "finetune" / "configs" / "llama2-7b-qlora-rtx4090.yaml"
    assert main(["finetune", "plan", "--config", str(cfg), "--analytic", "--out_dir", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    # QLoRA nf4-dq with checkpointing at micro-batch 8: ~16 GiB of a 24 GiB card; bf16 LoRA trains more tokens
    assert "verdict: fits rtx4090-24gb at micro-batch 8" in out
    assert "recommended on rtx4090-24gb at r=64: bf16 LoRA, checkpointing on" in out


def test_a_config_that_does_not_fit_exits_2_with_the_nearest_setup_that_does(capsys, tmp_path):
    """No forecast for what cannot run; the fix is a setup the planner checked, not a guess."""
    from onegpu.cli import main

    code = main(["finetune", "plan", "--analytic", "--model_name", "Llama-2-7b-hf", "--precision", "bf16-mixed",
                 "--lora_r", "64", "--max_seq_length", "2048", "--micro_batch_size", "4", "--global_batch_size", "32",
                 "--track", "rtx4090-24gb", "--out_dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and "the config does NOT fit rtx4090-24gb" in err
    fix = err.split("fix:", 1)[1]
    assert "--precision bf16-true" in fix and "--micro_batch_size" in fix  # mixed keeps fp32 weights: 24 GiB alone
    assert "verdict: does NOT fit rtx4090-24gb at micro-batch 4: needs" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("rtx4090-24gb"))
    assert "not even at micro-batch 1" in line and "tok/s" not in line and "micro-batch 0" not in out
    # the suggested fix, planned again, fits
    flags = fix.split("(")[0].split()
    assert main(["finetune", "plan", "--analytic", "--model_name", "Llama-2-7b-hf", "--precision", "bf16-mixed",
                 "--lora_r", "64", "--max_seq_length", "2048", "--micro_batch_size", "4", "--global_batch_size", "32",
                 "--track", "rtx4090-24gb", "--out_dir", str(tmp_path / "fixed"), *flags]) == 0


def test_all_problems_reported_at_once(capsys):
    from onegpu.cli import main

    code = main(["finetune", "plan", "--analytic", "--model_name", "Llama-2-7b", "--lora_r", "0",
                 "--micro_batch_size", "3", "--global_batch_size", "8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'Llama-2-7b' is not a litgpt config name" in err and "Llama-2-7b-hf" in err
    assert "lora_r must be > 0" in err and "global_batch_size (8) must be a positive multiple" in err


def test_auto_analytic_without_weights(tmp_path, capsys):
    """No weights at the checkpoint dir: plan answers analytically instead of failing on the checkpoint."""
    from onegpu.finetune.verbs import plan

    report = plan(checkpoint_dir=tmp_path / "meta-llama" / "Llama-2-7b-hf", quantize="bnb.nf4-dq", lora_r=64,
                  max_seq_length=2048, micro_batch_size=2, optimizer="paged_adamw", activation_checkpointing=True,
                  out_dir=tmp_path / "plan")
    assert report["mode"] == "analytic" and report["reason"].startswith("no weights at")
    assert report["fits"] and report["tracks"]["rtx4090-24gb"]["largest_micro_batch"] > 2
    assert (tmp_path / "plan" / "plan.json").is_file()
