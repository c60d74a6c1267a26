"""Data stage points 3, 4, 7, 8, 10: a real mix from ../shared/datasets through every filter, its
outputs (train/val/rejects/manifest/plot/W&B artifact), budgets and determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from onegpu.data.build import build
from onegpu.data.mix import FILTER_STAGES
from onegpu.data.rows import REQUIRED_FIELDS
from onegpu.paths import REPO_ROOT

SMALL = {
    "name": "small",
    "seed": 7,
    "tokenizer": "bundled",
    "prompt_style": "smollm2",
    "max_seq_length": 384,
    "min_tokens": 16,
    "budget_tokens": 6000,
    "val_rows_per_source": 2,
    "languages": ["en"],
    "decontamination": {"eval_sets": ["mmlu", "truthfulqa", "gsm8k_test", "bigbench"]},
    "sources": [
        {"name": "dolly", "weight": 2},
        {"name": "oasst1", "weight": 2},
        {"name": "natural_instructions", "weight": 1, "tasks": ["task307", "task141"], "max_per_task": 150},
        {"name": "flan_cot", "weight": 1, "subsets": ["strategyqa", "qasc"]},
        {"name": "cnn_dailymail", "count": 2},
    ],
}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory, shared_datasets, bundled_checkpoint):
    tmp = tmp_path_factory.mktemp("data")
    recipe = write_recipe(tmp / "small.yaml", SMALL)
    a = build(recipe, tmp / "a", data_dir=shared_datasets)  # tokenizers' pool, overlapped with near-dedup
    b = build(recipe, tmp / "b", data_dir=shared_datasets, parallel=False)  # one thread, stage after stage
    return recipe, a, b


@pytest.mark.slow
def test_build_writes_every_output(small_builds):
    _, out, _ = small_builds
    for name in ("train.jsonl", "val.jsonl", "rejects.jsonl", "manifest.json", "composition.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "composition.png").read_bytes()[:4] == b"\x89PNG"
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    for row in train + val:
        assert all(k in row for k in REQUIRED_FIELDS) and row["provenance"] == "human"
    assert not {r["id"] for r in train} & {r["id"] for r in val}, "val rows are held out of train"
    assert {r["source"] for r in train} == {s["name"] for s in SMALL["sources"]}
    assert len([r for r in val if r["source"] == "dolly"]) == 2


def test_manifest_records_lineage_counts_and_token_stats(small_builds):
    _, out, _ = small_builds
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["recipe_hash"]) == 64 and m["seed"] == 7
    assert m["prompt_style"] == "smollm2" and m["max_seq_length"] == 384
    assert m["tokenizer"]["name"] == "SmolLM2-135M-Instruct" and m["tokenizer"]["vocab_size"] > 1000
    assert {"datasets", "tokenizers", "datasketch"} <= set(m["versions"])
    train_bytes = (out / "train.jsonl").read_bytes()
    assert m["files"]["train.jsonl"] == hashlib.sha256(train_bytes).hexdigest()
    assert len(m["content_hash"]) == 64
    for name, c in m["counts"].items():
        assert set(FILTER_STAGES) <= set(c)
        assert c["train"] > 0 and c["available"] <= c["loaded"]
        assert c["remaining_after"]["too_short"] == c["available"]  # counts after each filter add up
    # the budget is met (weights share it; the last row of a source may overshoot a little)
    total = m["tokens"]["train"]["total"]
    assert 6000 <= total <= 6000 + 2 * 384 * len(SMALL["sources"])
    assert total == sum(c["train_tokens"] for c in m["counts"].values())
    assert m["tokens"]["train"]["max"] <= 384
    assert m["selection"]["dolly"]["target"] == pytest.approx(2 * m["selection"]["flan_cot"]["target"], abs=2)
    # filters actually ran on real data: synthetic OASST messages and StrategyQA/BIG-bench overlap
    assert m["counts"]["oasst1"]["llm_generated"] == 22
    assert m["counts"]["flan_cot"]["contaminated"] > 1000
    assert m["decontamination"]["eval_sets"]["bigbench"]["contaminated_rows_by_source"]["flan_cot"] > 1000
    assert m["counts"]["cnn_dailymail"]["too_long"] > 100


def test_every_dropped_row_is_in_rejects_with_reason_and_stage(small_builds):
    _, out, _ = small_builds
    m = json.loads((out / "manifest.json").read_text())
    rejects = read_jsonl(out / "rejects.jsonl")
    assert all(r["reason"] and r["stage"] and r["source"] and r["row"] is not None for r in rejects)
    for name, c in m["counts"].items():
        for stage in FILTER_STAGES[1:]:
            assert c[stage] == sum(1 for r in rejects if r["source"] == name and r["stage"] == stage), (name, stage)
    contaminated = [r for r in rejects if r["stage"] == "contaminated"]
    assert all(r["detail"].split(":")[0] in ("mmlu", "truthfulqa", "gsm8k_test", "bigbench") for r in contaminated)
    near = [r for r in rejects if r["stage"] == "near_duplicate"]
    assert near and all("near duplicate of" in r["detail"] for r in near)


def test_same_recipe_and_seed_give_byte_identical_outputs_parallel_or_plain(small_builds, tmp_path, shared_datasets):
    """Build a tokenizes on tokenizers' thread pool while near-dedup runs; build b on one thread, one
    stage after another. Same recipe and seed: the same files, byte for byte."""
    recipe, a, b = small_builds
    for name in ("train.jsonl", "val.jsonl", "rejects.jsonl", "manifest.json", "composition.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    m = json.loads((a / "manifest.json").read_text())
    for stage in ("near_duplicate", "contaminated", "too_long"):  # the stages that now overlap all dropped rows
        assert sum(c[stage] for c in m["counts"].values()) > 0, stage
    other = build(recipe, tmp_path / "c", data_dir=shared_datasets, seed=8)
    assert (other / "train.jsonl").read_bytes() != (a / "train.jsonl").read_bytes()


def test_offline_wandb_run_logs_the_dataset_artifact(small_builds):
    _, out, _ = small_builds
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "data" and run["exit_code"] == 0
    content_hash = json.loads((out / "manifest.json").read_text())["content_hash"]
    assert run["artifacts"] == [{"name": "data-small", "type": "dataset", "digest": content_hash, "path": str(out)}]
    offline = list((out / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))
    assert json.loads((out / "summary.json").read_text())["train_rows"] == len(read_jsonl(out / "train.jsonl"))


def test_exact_duplicates_count_and_tokens_caps_and_replacement(tmp_path, shared_datasets, bundled_checkpoint):
    dolly = (shared_datasets / "dolly/databricks-dolly-15k.first34.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in dolly[:10]]
    # the same rows again with case/spacing changes: exact duplicates after normalisation
    copies = [{**r, "instruction": "  " + r["instruction"].upper() + " "} for r in rows[:4]]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + copies))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "tokenizer": str(bundled_checkpoint), "prompt_style": "alpaca", "val_rows_per_source": 1,
        "decontamination": {"eval_sets": ["truthfulqa"]},
        "sources": [
            {"name": "mine", "path": "mine.jsonl", "fields": {"instruction": "instruction", "input": "context",
             "output": "response"}, "license": "CC-BY-SA-3.0", "provenance": "human", "count": 20, "replace": True},
            {"name": "cnn_dailymail", "tokens": 1500},
        ]})
    out = build(recipe, tmp_path / "out", data_dir=shared_datasets)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["mine"]["exact_duplicate"] == 4
    assert m["counts"]["mine"]["train"] == 20  # 9 unique rows - 1 val, sampled with replacement
    assert 1500 <= m["counts"]["cnn_dailymail"]["train_tokens"] < 1500 + 2048
    assert m["tokenizer"]["spec"] == str(bundled_checkpoint)


def test_manifest_token_counts_are_what_training_tokenizes_bos_included(small_builds, tmp_path, shared_datasets,
                                                                        bundled_checkpoint):
    """The manifest counts each row with the fine-tune's own tokenize_example: BOS + prompt + response + EOS."""
    from litgpt.tokenizer import Tokenizer

    from onegpu.data.schema import render
    from onegpu.finetune.packing import tokenize_example

    tok = Tokenizer(bundled_checkpoint)
    assert tok.use_bos
    alpaca = write_recipe(tmp_path / "alpaca.yaml", {**SMALL, "prompt_style": "alpaca", "sources": SMALL["sources"][:2]})
    for out, style in ((small_builds[1], "smollm2"), (build(alpaca, tmp_path / "out", data_dir=shared_datasets), "alpaca")):
        m = json.loads((out / "manifest.json").read_text())
        assert m["tokenizer"]["uses_bos"] and m["tokenizer"]["bos_id"] == tok.bos_id
        for split in ("train", "val"):
            examples = [tokenize_example(tok, *render(r, style), max_seq_length=10**6)
                        for r in read_jsonl(out / f"{split}.jsonl")]
            lengths = [len(e) for e in examples]
            assert sum(lengths) == m["tokens"][split]["total"] and max(lengths) == m["tokens"][split]["max"], (style, split)
            assert all(e.input_ids[0] == tok.bos_id for e in examples)  # alpaca's BOS is prepended and counted


def test_cli_build_prints_progress_and_uses_the_shipped_recipe_format(tmp_path, shared_datasets, bundled_checkpoint, capfd):
    from onegpu.cli import main

    recipe = yaml.safe_load((REPO_ROOT / "data/recipes/quickstart.yaml").read_text())
    assert recipe["prompt_style"] == "smollm2" and recipe["max_seq_length"] == 512
    recipe.update(budget_tokens=2000, sources=[{"name": "dolly", "weight": 1}, {"name": "lima", "count": 1, "val_rows": 0}])
    path = write_recipe(tmp_path / "q.yaml", recipe)
    assert main(["data", "build", str(path), "--out", str(tmp_path / "out"), "--data_dir", str(shared_datasets)]) == 0
    err = capfd.readouterr().err
    for bar in ("load", "tokenize", "near-dedup"):
        assert bar in err, bar
    assert (tmp_path / "out/manifest.json").is_file()


def test_recipe_language_filter_drops_other_scripts(tmp_path, shared_datasets, bundled_checkpoint):
    rows = [{"q": "Name three primary colours of light, please.", "a": "Red, green and blue are the three."},
            {"q": "Назовите три основных цвета света, пожалуйста.", "a": "Красный, зелёный и синий."},
            {"q": "请说出光的三原色是什么颜色。", "a": "光的三原色是红色、绿色和蓝色。"},
            {"q": "What is the boiling point of water at sea level?", "a": "It boils at 100 degrees Celsius."}]
    (tmp_path / "multi.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "tokenizer": "bundled", "val_rows_per_source": 0, "min_tokens": 1, "languages": ["en"],
        "decontamination": {"eval_sets": ["truthfulqa"]},
        "sources": [{"name": "multi", "path": "multi.jsonl", "fields": {"instruction": "q", "output": "a"},
                     "license": "CC0-1.0", "provenance": "human"}]})
    out = build(recipe, tmp_path / "out", data_dir=shared_datasets)
    rejects = read_jsonl(out / "rejects.jsonl")
    assert [r["stage"] for r in rejects] == ["language", "language"]
    assert {r["row"]["instruction"][:3] for r in rejects} == {"Наз", "请说出"}
    assert [r["instruction"][:4] for r in read_jsonl(out / "train.jsonl")].count("Name") == 1
