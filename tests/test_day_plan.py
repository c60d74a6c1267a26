"""`onegpu day plan`: the GPU day laid out on a CPU in seconds, every step checked against the track,
every command parsed by its verb, a day that cannot work refused with the fix; README shows its output."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
import yaml

from onegpu import cli
from onegpu.contracts import TRACKS
from onegpu.finetune.planning.analytic import SAFE_HEADROOM
from onegpu.paths import REPO_ROOT

STEPS = ["set-up", "memory check", "sweep: 8 x 30m", "final run", "validation", "HELM", "pack + image"]


@pytest.fixture(autouse=True)
def assumed_mfu(monkeypatch, tmp_path):
    """No GPU check results: the forecast uses the assumed MFU (as in README)."""
    monkeypatch.setenv("ONEGPU_GPU_CHECK", str(tmp_path / "no-gpu-check.json"))


def parse_every_command(day_sh: str, tmp_path) -> int:
    """Each `onegpu VERB ...` line of day.sh through its verb's own parser (--print_config stops before running)."""
    parsed = 0
    for line in day_sh.splitlines():
        if not line.startswith("onegpu "):
            continue
        with pytest.raises(SystemExit) as done:
            cli.main(shlex.split(line)[1:] + ["--print_config"])
        assert done.value.code in (0, None), line
        parsed += 1
    return parsed


@pytest.mark.slow
@pytest.mark.parametrize("track,model", [("rtx4090-24gb", "Mistral-7B-v0.1"), ("a100-40gb", "Llama-2-13b-hf")])
def test_the_day_fits_and_every_command_parses(track, model, tmp_path, capsys):
    data = tmp_path / "data"  # a mix of 40 M training tokens: the plan says how many epochs the final run trains
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"tokens": {"train": {"total": 40_000_000}}}))
    out = tmp_path / "day"
    assert cli.main(["day", "plan", "--track", track, "--model", model, "--data", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "day_plan.json").read_text())
    assert [s["name"] for s in plan["steps"]] == STEPS and not plan["problems"]
    assert plan["planned_s"] == pytest.approx(24 * 3600)
    memory = TRACKS[track].memory_gib
    for step in plan["steps"]:
        if step["peak_gib"] is not None:  # every step on the card keeps the safe headroom free
            assert step["peak_gib"] <= (1 - SAFE_HEADROOM) * memory, step["name"]
    final = next(s for s in plan["steps"] if s["name"] == "final run")
    epochs = plan["data"]["epochs"]
    assert 0 < epochs and f"= {epochs:.2f} epochs of {data}" in final["note"]
    assert (out / "day_plan.md").read_text().count(printed.strip().splitlines()[0]) == 1
    # the files a competitor runs: final.yaml and sweep.yaml are the verbs' own inputs
    options = yaml.safe_load((out / "final.yaml").read_text())
    assert options["track"] == track and options["checkpoint_dir"].endswith(model)
    assert options["budget"] == "17h20m" and options["data"] == str(data)
    sweep = yaml.safe_load((out / "sweep.yaml").read_text())
    assert sweep["parameters"]["merge"]["value"] is False and sweep["parameters"]["budget"]["value"] == "30m"
    (out / "sweep").mkdir()  # what the sweep leaves for the final run: its winner's values
    (out / "sweep" / "best.yaml").write_text(yaml.safe_dump({"learning_rate": 2e-4, "lora_r": 16}))
    day_sh = (out / "day.sh").read_text()
    assert subprocess.run(["bash", "-n", str(out / "day.sh")]).returncode == 0
    assert parse_every_command(day_sh, tmp_path) == 9  # prepare, plan, sweep, report, finetune, val x2, helm, pack


@pytest.mark.slow
def test_a_day_that_cannot_work_exits_2_naming_every_fix(tmp_path, capsys):
    """Llama-2-13B trains on a 4090 (4-bit), but its bf16 weights leave vLLM no room: both eval steps are refused
    with their fixes, then the fixes planned again make the day fit; steps overrunning the day are refused."""
    args = ["day", "plan", "--track", "rtx4090-24gb", "--model", "Llama-2-13b-hf", "--out", str(tmp_path / "a")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "serving (HELM and the image) with vLLM: Llama-2-13b-hf's bf16 weights" in err
    assert "--serve_quantize bnb.nf4" in err
    assert "eval val (bf16 weights)" in err and "--validation 0m" in err
    assert (tmp_path / "a" / "day_plan.md").is_file()  # written before refusing: the plan says what does not work
    assert cli.main([*args, "--serve_quantize", "bnb.nf4", "--validation", "0m"]) == 0
    capsys.readouterr()
    assert cli.main(["day", "plan", "--helm", "20h", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "the final run gets 0s of the 24h00m day" in err and "more than the 24h00m day" in err


def test_readme_shows_the_day_plan_as_it_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--out runs/day` is relative: the README's block is what a checkout prints
    assert cli.main(["day", "plan", "--track", "rtx4090-24gb", "--model", "Mistral-7B-v0.1", "--out", "runs/day"]) == 0
    printed = capsys.readouterr().out.strip()
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"onegpu day plan --track rtx4090-24gb --model Mistral-7B-v0.1 --out runs/day\n```\n\n```\n(.*?)\n```",
                      readme, re.S)
    assert block, "README has no GPU-day section with the plan's output"
    assert block.group(1).strip() == printed
