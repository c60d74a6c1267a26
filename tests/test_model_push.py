"""`onegpu model push` on a real fine-tune: the dry-run folder loads in transformers with the same
logits and token ids as the litgpt checkpoint, its card carries the lineage and scores; without
the hub it stops before any work, naming the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from onegpu.errors import UserError
from onegpu.paths import REPO_ROOT

RECIPE = {
    "name": "push-test", "seed": 7, "tokenizer": "bundled", "prompt_style": "alpaca", "max_seq_length": 256,
    "min_tokens": 8, "budget_tokens": 3000, "val_rows_per_source": 2, "languages": ["en"],
    "dedup": {"exact": True, "near": False}, "decontamination": {"eval_sets": ["truthfulqa"]},
    "sources": [{"name": "dolly", "count": 10}, {"name": "self_instruct_seed", "count": 10}],
}
QUESTION = "What is the capital of France?"


def _onegpu(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onegpu", *args], check=False, capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=900, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_datasets, bundled_checkpoint) -> dict[str, Path]:
    """A real pipeline in miniature: `data build` -> 3 LoRA steps -> `eval val` on 2 tasks."""
    from onegpu.data.build import build
    from onegpu.eval.validate import validate
    from onegpu.finetune.verbs import finetune

    root = tmp_path_factory.mktemp("push")
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    data = build(root / "recipe.yaml", out=root / "data", data_dir=shared_datasets)
    finetune(data=str(data), checkpoint_dir=bundled_checkpoint, out_dir=root / "ft", max_steps=3, micro_batch_size=2,
             global_batch_size=2, learning_rate=1e-3, warmup_steps=0, eval_interval=0, num_samples=0,
             save_interval=0, num_threads=2, progress=False)
    validate(checkpoint=root / "ft" / "final", tasks=["onegpu_truthfulqa_mc1", "onegpu_mmlu_philosophy"], limit=2,
             out=root / "eval-val", num_threads=2)
    return {"root": root, "data": data, "final": root / "ft" / "final", "eval": root / "eval-val"}


@pytest.mark.slow
def test_dry_run_folder_loads_in_transformers_with_the_same_logits_and_a_lineage_card(trained, tmp_path):
    from huggingface_hub import ModelCard
    from litgpt import GPT, Config, Tokenizer
    from litgpt.prompts import load_prompt_style
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, folder = trained["final"], tmp_path / "upload"
    res = _onegpu("model", "push", str(final), "--repo", "myteam/smol-lora", "--dry_run", str(folder),
                  "--results", str(trained["eval"]))
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip().splitlines()[-1]) == folder and "nothing uploaded" in res.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "prompt_style.yaml",
            "hyperparameters.yaml", "onegpu_lineage.json", "README.md"} <= {p.name for p in folder.iterdir()}

    # weights: transformers' logits equal litgpt's on the merged checkpoint
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    style = load_prompt_style(final)
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == tokenizer.bos_token + style.apply(QUESTION)  # the training format, BOS as litgpt adds it
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert ids == Tokenizer(final).encode(style.apply(QUESTION)).tolist()  # the token ids training used
    lit = GPT(Config.from_file(final / "model_config.yaml"))
    lit.load_state_dict(torch.load(final / "lit_model.pth", weights_only=True))
    lit.eval()
    with torch.no_grad():
        hf_logits, lit_logits = model(torch.tensor([ids])).logits, lit(torch.tensor([ids]))
    torch.testing.assert_close(hf_logits, lit_logits, rtol=1e-4, atol=1e-4)

    # the card: hub front matter + lineage + scores, all derived from the run's own files
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert "onegpu" in card.data.tags and "lora" in card.data.tags
    manifest = json.loads((trained["data"] / "manifest.json").read_text())
    run = json.loads((final.parent / "run.json").read_text())
    results = json.loads((trained["eval"] / "results.json").read_text())
    for needle in (manifest["content_hash"], manifest["recipe_hash"], "recipe `push-test`", run["git_sha"],
                   "r=8, alpha=16", f"val_score {results['val_score']:.4f}", "onegpu_mmlu_philosophy",
                   f"{results['tasks']['onegpu_mmlu_philosophy']['primary']:.4f}", "CC-BY-SA-3.0", "of 24h00m used"):
        assert needle in card.text, needle
    lineage = json.loads((folder / "onegpu_lineage.json").read_text())
    assert lineage["data"]["content_hash"] == manifest["content_hash"]
    assert lineage["scores"]["val"]["val_score"] == results["val_score"]
    portable = yaml.safe_load((folder / "hyperparameters.yaml").read_text())
    assert portable["checkpoint_dir"] == "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not any(isinstance(v, str) and v.startswith("/") for v in portable.values())

    # The hub route: what push publishes is all `onegpu model prepare ORG/NAME` needs (the image's build
    # step, no flag), through the one path a hub repo and a local dir share, this folder standing in for
    # the download, under a name litgpt does not know (as a team's repo is).
    from onegpu.inference import resolve_prompt_style

    repo, prepared = tmp_path / "smol-lora", tmp_path / "prepared"
    shutil.copytree(folder, repo)
    res = _onegpu("model", "prepare", str(repo), "--checkpoint_dir", str(prepared))
    assert res.returncode == 0, res.stderr
    assert lineage["litgpt_model_name"] == Config.from_file(final / "model_config.yaml").name
    provenance = json.loads((prepared / "onegpu_model.json").read_text())
    assert provenance["model_name"] == lineage["litgpt_model_name"] and provenance["pushed_by"] == "onegpu model push"
    assert provenance["base_hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((prepared / "onegpu_lineage.json").read_text()) == lineage  # the provenance travels
    served = resolve_prompt_style("auto", prepared)  # what PROMPT_STYLE=auto serves: the training format
    assert served is not None and served.apply(QUESTION) == style.apply(QUESTION)
    again = GPT(Config.from_file(prepared / "model_config.yaml"))
    again.load_state_dict(torch.load(prepared / "lit_model.pth", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(torch.tensor([ids])), lit_logits, rtol=1e-4, atol=1e-4)
    # without push's lineage the same repo is refused before any weights are fetched, naming the fix
    (repo / "onegpu_lineage.json").unlink()
    res = _onegpu("model", "prepare", str(repo), "--checkpoint_dir", str(tmp_path / "refused"))
    assert res.returncode == 2 and "--model_name" in res.stderr and not (tmp_path / "refused").exists()


def test_adapter_dry_run_merges_back_onto_the_base_to_the_same_weights(trained, tmp_path, bundled_checkpoint):
    from huggingface_hub import ModelCard

    from onegpu.inference import locate_checkpoint, merged_checkpoint
    from onegpu.submission.publish import push

    folder = tmp_path / "adapter"
    push(trained["final"], repo="myteam/smol-lora-adapter", dry_run=folder, weights="adapter")
    assert (folder / "lit_model.pth.lora").is_file() and not (folder / "model.safetensors").exists()
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "litgpt" and "onegpu model prepare bundled" in card.text
    # what the card tells a downloader to do, with the bundled base standing in for the prepared one
    merged = merged_checkpoint(locate_checkpoint(folder, base_checkpoint=bundled_checkpoint))
    got = torch.load(merged / "lit_model.pth", weights_only=True)
    want = torch.load(trained["final"] / "lit_model.pth", weights_only=True)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["offline", "no_token", "no_network"])
def test_push_without_the_hub_stops_before_any_work_and_names_the_fix(trained, tmp_path, case):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # no stored login token
    if case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    if case == "no_network":
        env["HF_TOKEN"] = "hf_not_a_real_token"
    res = _onegpu("model", "push", str(trained["final"]), "--repo", "myteam/smol-lora", env=env)
    assert res.returncode == 2, res.stderr
    assert "--dry_run DIR" in res.stderr and "Traceback" not in res.stderr
    expected = {"offline": ("HF_HUB_OFFLINE is set", "HF_TOKEN"), "no_token": ("no Hugging Face token", "HF_TOKEN"),
                "no_network": ("could not reach the Hugging Face hub", "network")}[case]
    if case == "no_network" and "refused this token" in res.stderr:
        expected = ("refused this token", "HF_TOKEN")  # a machine that can reach the hub
    for needle in expected:
        assert needle in res.stderr, res.stderr
    assert "[onegpu push]" not in res.stderr  # stopped before exporting anything


def test_push_refuses_inputs_that_would_publish_wrong_lineage(trained, tmp_path, bundled_checkpoint):
    from onegpu.submission.publish import push

    with pytest.raises(UserError, match="no --repo"):
        push(trained["final"], dry_run=tmp_path / "a")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier dry run"):
        push(trained["final"], repo="me/x", dry_run=foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"
    # scores of another checkpoint: the same eval dir, re-pointed at the base model
    other = tmp_path / "eval-of-base"
    shutil.copytree(trained["eval"], other)
    results = json.loads((other / "results.json").read_text())
    results.update(checkpoint=str(bundled_checkpoint), checkpoint_lineage={"source": "bundled"})
    (other / "results.json").write_text(json.dumps(results))
    with pytest.raises(UserError, match="scored .* not "):
        push(trained["final"], repo="me/x", dry_run=tmp_path / "b", results=[other])
    # a data dir whose manifest is not the one trained on
    data = tmp_path / "data-rebuilt"
    shutil.copytree(trained["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "seed": manifest["seed"] + 1}))
    with pytest.raises(UserError, match="not the manifest this model was trained on"):
        push(trained["final"], repo="me/x", dry_run=tmp_path / "c", data=data)
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))
