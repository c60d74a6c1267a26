"""`onegpu report` on run dirs written by the real tracker (onegpu.tracking.Run, W&B disabled): the
identical-runs notes, consistent units and the per-task score charts. The browser check of the page
is in tests/test_sweeps.py (real sweep trials)."""

from __future__ import annotations

import json
import statistics

import pytest

from onegpu.sweeps.report import report
from onegpu.tracking import Run


def _finetune_run(path, lora_r: int, losses: list[float], mfu: list[float] | None = None) -> None:
    run = Run("finetune", path, {"lora_r": lora_r, "precision": "32-true", "learning_rate": 3e-4, "out_dir": str(path)})
    for step, loss in enumerate(losses, start=1):
        run.log({"loss": loss, "tokens_per_s": 100.0 * step, "mfu": (mfu or [0.01] * len(losses))[step - 1],
                 "mem/rss_gib": 1.0 + step / 10, "wall_clock_s": 30.0 * step}, step=step)
    run.log({"val_loss": losses[-1] + 0.1}, step=len(losses))
    run.summary(steps=len(losses), budget_s=600.0, budget_elapsed_s=30.0 * len(losses))
    run.finish()


@pytest.fixture()
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    _finetune_run(tmp_path / "a", 4, [2.5, 2.25, 2.0])
    _finetune_run(tmp_path / "b", 16, [2.5, 2.25, 2.0])  # another rank, the same losses: curves hide each other
    _finetune_run(tmp_path / "c", 8, [2.5, 2.0, 1.5], mfu=[0.02, 0.03, 0.05])
    _finetune_run(tmp_path / "d", 8, [2.5, 2.1, 1.7])  # c's configuration, other losses
    return [tmp_path / n for n in "abcd"]


def test_identical_runs_are_named_with_what_differs(runs, tmp_path):
    index = report(runs, out=tmp_path / "report")
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    notes = {n["kind"]: n for n in doc["identical"]}
    assert notes["results"]["runs"] == [1, 2] and "lora_r (4 vs 16)" in notes["results"]["text"]
    assert notes["configuration"]["runs"] == [3, 4] and "losses differ" in notes["configuration"]["text"]
    page = index.read_text()
    assert page.count("class=identical") == 2 and "Runs 1 (a), 2 (b) logged identical losses" in page


def test_mfu_is_a_percentage_and_task_scores_are_charted(runs, tmp_path):
    # an eval of run c's checkpoint, in `onegpu eval val`'s results.json format
    (runs[2] / "final").mkdir()
    tasks = {"onegpu_bbq": ("acc", 0.5), "onegpu_gsm8k": ("exact_match,flexible-extract", 0.125)}
    ev = tmp_path / "eval-val"
    ev.mkdir()
    (ev / "results.json").write_text(json.dumps({
        "stage": "eval-val", "checkpoint": str(runs[2] / "final"), "val_score": 0.3125,
        "tasks": {t: {"primary_metric": m, "primary": v} for t, (m, v) in tasks.items()}}))
    index = report([*runs, ev], out=tmp_path / "report")
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    row = doc["runs"][2]
    assert len(doc["runs"]) == 4 and row["val score"] == 0.3125  # the eval is attached to run c, not a row
    assert row["MFU %"] == pytest.approx(100 * statistics.median([0.03, 0.05]))  # first window left out
    assert doc["charts"][:1] == ["val_tasks"] and "test_scenarios" not in doc["charts"]
    page = index.read_text()
    for task, (metric, value) in tasks.items():  # real text in the inline SVG: task, metric and value
        assert f"{task} ({metric})" in page.replace("\n", "") or task in page
        assert f" {value:.4g}" in page
    assert "MFU (%)" in page and "memory in use (GiB)" in page and "budget-clock time (min)" in page


def test_a_diverged_run_does_not_flatten_the_others(runs, tmp_path):
    from onegpu.sweeps.report import load_runs, plot_losses

    _finetune_run(tmp_path / "e", 8, [2.5, 12.0, 19.0])  # learning rate too high: the loss blows up
    figure = plot_losses(load_runs([*runs, tmp_path / "e"]))
    train, val = figure.axes[:2]
    assert train.get_ylim()[1] < 3.0 and val.get_ylim()[1] < 3.0  # the other runs' 1.5-2.6 fill the panels
    notes = [t.get_text() for ax in (train, val) for t in ax.texts]
    assert notes == ["off scale: run 5 (up to 19)", "off scale: run 5 (up to 19.1)"]
    page = report([*runs, tmp_path / "e"], out=tmp_path / "report").read_text()
    assert "off scale: run 5 (up to 19.1)" in page
