"""`onegpu data reweight`: real `eval val` results -> a recipe that `data build` builds, by the stated rule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from onegpu.data.families import DEFAULT_AFFINITY, read_affinity
from onegpu.data.reweight import family_weakness, read_scores, source_pull, update_shares
from onegpu.paths import REPO_ROOT

RECIPE = REPO_ROOT / "data" / "recipes" / "quickstart.yaml"


def _onegpu(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "onegpu", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_reweight_real_val_results_into_a_recipe_that_builds(bundled_checkpoint, shared_datasets, tmp_path):
    val = tmp_path / "val"
    proc = _onegpu("eval", "val", "--checkpoint", str(bundled_checkpoint), "--out", str(val), "--num_threads", "2",
                   "--tasks", "[onegpu_helm_mmlu_philosophy, onegpu_bbq, onegpu_gsm8k]", "--limit", "3",
                   "--num_fewshot", "0", "--log_samples", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "recipes" / "quickstart-r2.yaml"
    proc = _onegpu("data", "reweight", "--results", str(val), "--recipe", str(RECIPE), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the new weights are the stated rule applied to the real scores, through the shipped table
    old = yaml.safe_load(RECIPE.read_text())
    new = yaml.safe_load(out.read_text())
    weighted = [s for s in old["sources"] if "weight" in s]
    total = sum(s["weight"] for s in weighted)
    shares = {s["name"]: s["weight"] / total for s in weighted}
    table = read_affinity(DEFAULT_AFFINITY)
    weakness, unknown = family_weakness(read_scores([val]), table)
    assert set(weakness) == {"mmlu", "bbq", "gsm8k"} and unknown == []
    expected = update_shares(shares, source_pull(list(shares), weakness, table), 2.0, 0.1, 0.05)
    got = {s["name"]: s["weight"] for s in new["sources"] if s["name"] in shares}
    for name, share in expected.items():
        assert got[name] == pytest.approx(share * total, abs=1e-3), name
        assert share >= 0.05 - 1e-9 and abs(share - shares[name]) <= 0.1 + 1e-9  # floor, bounded step
    assert sum(got.values()) == pytest.approx(total, abs=1e-2)
    # count/tokens sources and every other setting are kept; the comment block says what changed and why
    assert [s for s in new["sources"] if "weight" not in s] == [s for s in old["sources"] if "weight" not in s]
    assert {k: v for k, v in new.items() if k not in ("sources", "name")} == \
        {k: v for k, v in old.items() if k not in ("sources", "name")}
    head = out.read_text().split("\n\n")[0]
    assert all(line.startswith("# ") for line in head.splitlines())
    assert "rule: target = share * exp(" in head and "weakness (1 - score) per task family" in head
    for name in shares:
        assert f"# {name}" in head
    assert "new recipe:" in proc.stdout

    # ... and it builds
    built = tmp_path / "data-r2"
    proc = _onegpu("data", "build", str(out), "--out", str(built), "--data_dir", str(shared_datasets))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["name"] == "quickstart-r2" and (built / "train.jsonl").stat().st_size > 0


def test_update_rule_moves_toward_weak_tasks_with_a_bounded_step_and_a_floor():
    shares = {"a": 0.5, "b": 0.3, "c": 0.2}
    pull = {"a": 0.1, "b": 0.5, "c": 0.9}  # c feeds the weakest tasks
    new = update_shares(shares, pull, rate=2.0, max_step=0.1, floor=0.15)
    assert sum(new.values()) == pytest.approx(1.0)
    assert new["c"] > shares["c"] and new["a"] < shares["a"]
    assert all(abs(new[s] - shares[s]) <= 0.1 + 1e-9 and new[s] >= 0.15 - 1e-9 for s in shares)
    # an extreme rate only reaches the bounds
    wild = update_shares(shares, pull, rate=1000.0, max_step=0.1, floor=0.15)
    assert wild["c"] == pytest.approx(0.3) and wild["a"] == pytest.approx(0.4)
    # no pull difference: nothing moves
    assert update_shares(shares, {s: 0.4 for s in shares}, 2.0, 0.1, 0.05) == pytest.approx(shares)
    # with no bounds in the way it is exactly the exponentiated pull, renormalised
    free = update_shares(shares, pull, rate=0.5, max_step=1.0, floor=0.0)
    mean = sum(shares[s] * pull[s] for s in shares)
    raw = {s: shares[s] * math.exp(0.5 * (pull[s] - mean)) for s in shares}
    assert free == pytest.approx({s: v / sum(raw.values()) for s, v in raw.items()})


@pytest.mark.parametrize("kwargs, problem", [
    ({"results": ["{missing}"]}, "is not an `onegpu eval val` results dir"),
    ({"results": ["{val}"], "affinity": "{missing}"}, "affinity table"),
    ({"results": ["{val}"], "floor": 0.5}, "leaves nothing to move"),
    ({"results": ["{val}"], "max_step": 0}, "out of range"),
    ({"results": ["{odd_val}"]}, "no evaluated task belongs to a family"),
])
def test_bad_input_is_a_user_error(tmp_path, kwargs, problem):
    from onegpu.data.reweight import reweight
    from onegpu.errors import UserError

    val, odd = tmp_path / "val", tmp_path / "odd"
    for d, task in ((val, "onegpu_bbq"), (odd, "my_task")):
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"stage": "eval-val", "tasks": {task: {"primary": 0.5}}}))
    subs = {"missing": str(tmp_path / "nope"), "val": str(val), "odd_val": str(odd)}
    kwargs = {k: ([x.format(**subs) for x in v] if isinstance(v, list) else v.format(**subs) if isinstance(v, str)
                  else v) for k, v in kwargs.items()}
    with pytest.raises(UserError, match=problem.replace("`", ".").replace("(", ".").replace(")", ".")):
        reweight(recipe=RECIPE, out=tmp_path / "r2.yaml", **kwargs)
    assert not (tmp_path / "r2.yaml").exists()


@pytest.mark.slow
def test_cli_bad_input_exits_2(tmp_path):
    proc = _onegpu("data", "reweight", "--results", str(tmp_path / "nope"), "--recipe", str(RECIPE),
                   "--out", str(tmp_path / "r2.yaml"))
    assert proc.returncode == 2 and "is not an `onegpu eval val` results dir" in proc.stderr, proc.stderr
