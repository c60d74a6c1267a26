"""``onegpu quickstart``: its plan (steps, step-bounded configs) and its summary, without running models.

The real runs behind it are tested where they live: the quickstart sweep's trials and the report's
winner sentence in test_sweeps.py; fine-tuning in test_finetune_lora.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from onegpu.sweeps import quickstart as Q
from onegpu.errors import UserError
from onegpu.finetune import options as O
from onegpu.paths import REPO_ROOT


def test_steps_run_in_pipeline_order_each_writing_under_out(tmp_path):
    dirs = Q.QuickstartDirs(tmp_path, Path("ckpt"))
    steps = [make(dirs, {"data", "finetune", "val", "reweight", "rebuild", "helm", "sweep"}) for make in Q.STEPS]
    assert [s.key for s in steps] == ["data", "finetune", "val", "reweight", "rebuild", "helm", "sweep", "report"]
    assert all(s.done_marker.is_relative_to(tmp_path) and s.command()[0] == "onegpu" for s in steps)
    # each step reads what an earlier one wrote
    assert str(dirs.data) in steps[1].args and str(dirs.finetune / "final") in steps[2].args
    assert str(dirs.eval_val) in steps[3].args and str(dirs.recipe_r2) in steps[4].args
    assert str(dirs.sweep) in steps[6].args and str(dirs.sweep) in steps[7].args[1]  # the report reads the sweep


def test_skipped_steps_take_the_steps_that_read_them_along_and_the_summary_lists_what_ran(tmp_path, capsys,
                                                                                             bundled_checkpoint):
    out = tmp_path / "qs"
    (out / "data").mkdir(parents=True)
    (out / "data" / "manifest.json").write_text("{}")  # the data step is done
    assert Q.quickstart(out=out, skip=["finetune", "sweep"]) == 0
    printed = capsys.readouterr().out
    assert "== data mix: already done" in printed and "== skip fine-tune (LoRA, CPU, a fixed number of steps) (--skip)" in printed
    for title in ("validation (lm-eval, offline suite)", "test (HELM, offline synthetic conf)", "report",
                  "reweight the mix from the validation scores"):
        assert f"== skip {title}: it reads the output of" in printed, title
    summary = printed.split("Where everything is:")[1]
    assert "data mix" in summary and not any(w in summary for w in ("fine-tune run", "validation ", "HELM test", "report "))
    assert sorted(p.name for p in out.iterdir()) == ["data"]


def test_skipping_helm_leaves_it_out_of_the_report_and_the_summary(tmp_path, capsys, bundled_checkpoint):
    """`--skip helm` with every other step done: the report reads only the dirs of steps that ran, and an
    older HELM result left in its dir is not summarized as this quickstart's."""
    out = tmp_path / "qs"
    dirs = Q.QuickstartDirs(out, bundled_checkpoint)
    done = [make(dirs, set()).done_marker for make in Q.STEPS if make is not Q.helm_step]
    for marker in done:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
    (out / "eval-helm").mkdir()
    (out / "eval-helm" / "results.json").write_text('{"test_score": 0.5}')  # from an earlier quickstart
    report = Q.report_step(dirs, {"data", "finetune", "val", "reweight", "rebuild", "sweep"})
    assert report.needs == () and str(dirs.eval_helm) not in report.args[1] and str(dirs.eval_val) in report.args[1]
    assert Q.quickstart(out=out, skip=["helm"]) == 0
    printed = capsys.readouterr().out
    assert "== skip test (HELM, offline synthetic conf) (--skip)" in printed and "== report: already done" in printed
    summary = printed.split("Where everything is:")[1]
    assert "report " in summary and "validation " in summary and "HELM test" not in summary


def test_unknown_skip_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match=r"unknown step\(s\) to skip: \['helms'\]") as err:
        Q.quickstart(out=tmp_path / "qs", skip=["helms"])
    assert "helm" in err.value.fix and not (tmp_path / "qs").exists()


def test_the_fine_tune_is_step_bounded_and_validates_along_the_way():
    doc = yaml.safe_load((REPO_ROOT / "finetune/configs/cpu-quickstart.yaml").read_text())
    options = O.finetune_options(**doc)
    assert options.budget.budget is None  # the clock is the track's 24 h: it reports, it never stops the run
    assert options.train.max_steps >= 12 and 0 < options.eval.eval_interval < options.train.max_steps
    assert options.eval.initial_validation  # the val curve starts at the base model


def test_summary_projects_the_measured_pace_to_24_hours():
    summary = {"steps": 16, "total_steps": 16, "first_loss": 2.5, "final_loss": 1.9, "val_loss": 2.1,
               "budget_elapsed_s": 480.0, "budget_used_pct": 100 * 480 / 86400, "tokens_seen": 16000}
    fine_tune, clock = Q.learning_lines(summary)
    assert "16/16 steps" in fine_tune and "2.500 -> 1.900" in fine_tune
    per_day = 86400 / 480  # 180 times the run
    assert "8.0 min of 24 h used (0.56%)" in clock
    assert f"~{16 * per_day:,.0f} steps" in clock and f"~{16000 * per_day / 1e6:,.1f}M tokens" in clock
