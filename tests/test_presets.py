"""The shipped GPU presets: every GPU config and every trial of every shipped GPU sweep names its base
model and fits its track by the analytic planner (litgpt's real model configs), with the planner's
safe headroom; sweep trials keep no merged model and cost what their header says."""

from __future__ import annotations

import re

import pytest

from onegpu import cli
from onegpu.contracts import TRACKS
from onegpu.finetune.planning.analytic import SAFE_HEADROOM, fit_on_track
from onegpu.paths import REPO_ROOT
from onegpu.sweeps import runner, schema

GPU_CONFIGS = sorted(p for p in (REPO_ROOT / "finetune" / "configs").glob("*.yaml") if not p.name.startswith("cpu-"))
GPU_SWEEPS = sorted(p for p in (REPO_ROOT / "sweeps").glob("*.yaml") if p.name != "quickstart.yaml")


def finetune_flat(argv: list[str]) -> dict:
    """``onegpu finetune ARGV`` read as the command line reads it (config files first), every option settled."""
    return cli.parse_verb_args(("finetune",), argv)


def assert_fits(flat: dict, where: str) -> None:
    from litgpt.config import name_to_config

    model = flat["checkpoint_dir"].name if flat["checkpoint_dir"] else None
    assert model in name_to_config, f"{where}: names no litgpt base model ({flat['checkpoint_dir']})"
    _config, _w, fit = fit_on_track(flat)
    memory = TRACKS[flat["track"]].memory_gib
    assert fit.fits and fit.headroom_gib >= SAFE_HEADROOM * memory, \
        f"{where}: {fit.configured_peak_gib:.1f} GiB of {memory:.1f} on {flat['track']}"


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_gpu_config_names_its_base_model_and_fits_its_track(path):
    flat = finetune_flat(["--config", str(path)])
    assert flat["track"] == ("rtx4090-24gb" if "rtx4090" in path.name else "a100-40gb")
    assert_fits(flat, path.name)


@pytest.mark.parametrize("path", GPU_SWEEPS, ids=lambda p: p.name)
def test_every_trial_of_every_shipped_gpu_sweep_fits_and_costs_what_it_says(path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT.parent)  # the shipped configs are found from anywhere
    cfg = schema.load_sweep_config(path)
    points = runner.validation_points(cfg)
    for point in points:
        argv = runner.render_command(cfg, point)[3:]
        flat = finetune_flat(argv)
        assert_fits(flat, f"{path.name} {point}")
        assert flat["merge"] is False and flat["final_checkpoint"] is False, "trials keep no merged model"
        assert flat["budget"], "every trial is a budgeted proxy run"
    # "Cost: N trials x M min = X GPU-hours, Y% of the 24 h day" in the header, and true
    cost = re.search(r"Cost: (?:at most )?(\d+) trials x (\d+) min = ([\d.]+) GPU-hours, (\d+)% of the", path.read_text())
    assert cost, f"{path.name} states no cost"
    trials, minutes, hours, share = int(cost[1]), int(cost[2]), float(cost[3]), int(cost[4])
    assert trials == (cfg.get("run_cap") or len(schema.grid_points(cfg)))
    assert f"{minutes}m" == str(cfg["parameters"]["budget"]["value"])
    assert trials * minutes / 60 == pytest.approx(hours) and round(100 * hours / 24) == share
