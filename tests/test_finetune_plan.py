"""Measured plan mode (--analytic false) runs real steps and gives a verdict against the track's memory."""

from __future__ import annotations

import json

import pytest

from onegpu.errors import UserError

from onegpu.finetune.tiny import make_data_dir, make_tiny_checkpoint


@pytest.mark.slow
def test_plan_verdicts_fit_and_not_fit(tmp_path, bundled_checkpoint, shared_datasets, capsys):
    from onegpu.finetune.verbs import plan

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", bundled_checkpoint)
    data = make_data_dir(tmp_path / "data", shared_datasets, n_train=60, max_seq_length=128)
    suite = tmp_path / "proxy.yaml"
    suite.write_text("tasks: [onegpu_helm_mmlu_philosophy, onegpu_helm_bbq]\n")
    report = plan(data=str(data), checkpoint_dir=ckpt, track="rtx4090-24gb", budget="1h", micro_batch_size=2,
                  global_batch_size=6, steps=1, out_dir=tmp_path / "plan", num_threads=2, analytic=False,
                  proxy_suite=str(suite), proxy_items=1, proxy_interval=10)
    # the test proxy's cost per evaluation, timed on the real model, and what it adds per step
    assert report["proxy_s_per_evaluation"] > 0
    assert report["proxy_s_per_step"] == report["proxy_s_per_evaluation"] / 10
    assert report["proxy_items"].startswith("2 items (1 per task) of onegpu_helm_bbq, onegpu_helm_mmlu_philosophy")
    assert "test proxy: " in capsys.readouterr().err
    assert report["fits"] and "fits rtx4090-24gb" in report["verdict"]
    assert report["suggested_micro_batch_size"] >= 2 and 6 % report["suggested_micro_batch_size"] == 0
    assert report["tokens_per_s"] > 0 and 0 < report["mfu"] < 1
    assert report["tokens_per_epoch"] > 0
    assert report["epochs_in_budget"] == report["tokens_in_budget"] / report["tokens_per_epoch"]
    assert [m["micro_batch_size"] for m in report["measured"]] == [2, 4]
    saved = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert saved["verdict"] == report["verdict"]
    assert (tmp_path / "plan" / "plan.table.json").is_file() and list((tmp_path / "plan" / "wandb").glob("offline-run-*"))

    from onegpu.finetune.planning.analytic import DoesNotFit

    with pytest.raises(DoesNotFit) as too_small:  # exit 2, after the plan is printed and written
        plan(data=str(data), checkpoint_dir=ckpt, track="rtx4090-24gb", track_memory_gib=0.05,
             micro_batch_size=2, steps=1, out_dir=tmp_path / "plan-small", num_threads=2, analytic=False)
    small = too_small.value.report
    assert not small["fits"] and "does NOT fit" in small["verdict"] and small["suggested_micro_batch_size"] is None
    assert json.loads((tmp_path / "plan-small" / "plan.json").read_text())["fits"] is False


@pytest.mark.parametrize("micro,global_batch", [(2, 32), (2, 2), (1, 6)])
def test_analytic_suggestions_divide_the_global_batch(tmp_path, micro, global_batch):
    """A suggested micro-batch is the largest that fits the track's memory AND divides the global batch."""
    from onegpu.finetune.verbs import plan

    report = plan(model_name="Llama-2-7b-hf", quantize="bnb.nf4-dq", lora_r=64, max_seq_length=2048,
                  micro_batch_size=micro, global_batch_size=global_batch, activation_checkpointing=True,
                  analytic=True, out_dir=tmp_path)
    for name, track in report["tracks"].items():
        fitting_divisors = [mb for mb in range(1, track["largest_micro_batch"] + 1) if global_batch % mb == 0]
        assert track["suggested_micro_batch"] == max(fitting_divisors), name
    assert report["suggested_micro_batch_size"] == report["tracks"][report["track"]]["suggested_micro_batch"]
    assert global_batch % report["suggested_micro_batch_size"] == 0


def test_measured_plan_reports_every_problem_at_once(tmp_path):
    """Options, optimizer, checkpoint and data problems in one error, before any model loading."""
    from onegpu.finetune.verbs import plan

    with pytest.raises(UserError) as caught:
        plan(analytic=False, data=str(tmp_path / "no-data"), checkpoint_dir=tmp_path / "no-checkpoint",
             optimizer="paged_adamw", device="cpu", lora_r=0, micro_batch_size=5, global_batch_size=32,
             out_dir=tmp_path / "plan")
    text = str(caught.value)
    for problem in ("lora_r must be > 0", "global_batch_size (32) must be a positive multiple of micro_batch_size (5)",
                    "paged_adamw pages optimizer state", "no-checkpoint is not a litgpt checkpoint",
                    "no-data' does not exist"):
        assert problem in text, problem
    assert text.startswith("5 problems") and not (tmp_path / "plan").exists()
