"""The test proxy during fine-tuning: HELM-faithful items scored on the live LoRA weights, logged as a
curve, and ``--select best_proxy`` putting the best evaluation's weights into ``final/``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from onegpu.errors import UserError
from onegpu.finetune.options import check_options, finetune_options

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_helm_mc import _data_dir, _qasc_rows  # noqa: E402  (the broken-template data)

TASK = "onegpu_helm_mmlu_philosophy"


def _curve(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["_step"], r["proxy/exact_match"]) for r in rows if "proxy/exact_match" in r]


@pytest.mark.slow
def test_proxy_curve_selects_the_final_checkpoint(bundled_checkpoint, shared_datasets, tmp_path):
    from onegpu.finetune.verbs import finetune

    suite = tmp_path / "proxy.yaml"  # one cheap task (1-token answers): a suite YAML by path
    suite.write_text(f"tasks:\n  - {{task: {TASK}}}\n")
    # Training on answers that start with a preamble ("The answer is B.") breaks HELM's letter format,
    # so the proxy falls from the base model's score (tests/test_eval_helm_mc.py shows it on val).
    data = _data_dir(tmp_path / "data", _qasc_rows(shared_datasets, 12, preamble=True))
    out = tmp_path / "ft"
    summary = finetune(str(data), out_dir=out, max_steps=2, micro_batch_size=4, global_batch_size=4,
                       learning_rate=1e-2, warmup_steps=0, lora_dropout=0.0, packing=False, eval_interval=0,
                       num_samples=0, save_interval=0, num_threads=2, progress=False, proxy_suite=str(suite),
                       proxy_interval=1, proxy_items=2, select="best_proxy")
    curve = _curve(out)
    assert [s for s, _ in curve] == [0, 1, 2]  # the base model, every step, the end
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_task = [r[f"proxy/{TASK}/exact_match"] for r in rows if "proxy/exact_match" in r]
    assert per_task == [em for _, em in curve]  # one task: the aggregate is its score
    assert all("proxy/seconds" in r and "proxy/format_failures" in r for r in rows if "proxy/exact_match" in r)
    assert curve[-1][1] < curve[0][1], curve  # the broken template shows on the proxy
    best_step = max(s for s, em in curve if em == max(e for _, e in curve))  # ties: the later step
    assert summary["select"] == "best_proxy" and summary["proxy_evaluations"] == 3 and summary["proxy_s"] > 0
    assert summary["proxy_best_step"] == summary["final_step"] == best_step != 2
    saved = json.loads((out / "summary.json").read_text())
    assert saved["final_step"] == best_step and saved["proxy_best_exact_match"] == max(e for _, e in curve)
    # final/ holds the best evaluation's LoRA weights, not the last step's (which the checkpoint keeps)
    final = torch.load(out / "final" / "lit_model.pth.lora", weights_only=True)["model"]
    best = torch.load(out / "proxy" / "best.pt", weights_only=True)
    last_ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    last = torch.load(last_ckpt / "state.pt", weights_only=False)["model"]
    assert set(final) == set(best) and all(torch.equal(final[k], best[k]) for k in final)
    assert any(not torch.equal(final[k], last[k]) for k in final)


def test_proxy_options_are_checked_before_any_work():
    with pytest.raises(UserError, match="need a test proxy"):
        check_options(finetune_options(data="x", select="best_proxy"))
    with pytest.raises(UserError, match="proxy_items must be > 0"):
        check_options(finetune_options(data="x", proxy_suite="offline", proxy_items=0))
    from onegpu.finetune.proxy import load_proxy_items

    with pytest.raises(UserError, match="unknown suite"):
        load_proxy_items("no-such-suite", 2)
