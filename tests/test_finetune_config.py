"""The typed config: one flat option list (the CLI's) that agrees with the option groups, and
``resolve()`` settling every default in one place (on a real data dir and a real litgpt checkpoint)."""

from __future__ import annotations

import inspect
import json
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from onegpu import cli
from onegpu.errors import UserError
from onegpu.finetune import config as C
from onegpu.finetune import options as O
from onegpu.finetune.tiny import make_data_dir, make_tiny_checkpoint


def test_flat_signature_is_the_option_groups_field_for_field():
    """finetune_options' signature (the CLI surface) is the groups' fields, in order, typed, defaulted and
    documented (the string under each field) as there."""
    signature = inspect.signature(O.finetune_options).parameters
    grouped = [(f.name, typing.get_type_hints(cls)[f.name], f.default)
               for cls in O.option_groups().values() for f in fields(cls)]
    assert [name for name, *_ in grouped] == list(signature) == O.option_names()
    assert [(p.name, p.annotation, p.default) for p in signature.values()] == grouped
    docs = cli.option_docs(O.FinetuneOptions)
    assert list(docs) == O.option_names() and all(docs.values())
    assert all(f"    {name}: {docs[name].splitlines()[0]}" in O.finetune_options.__doc__ for name in signature)
    # the defaults land in the right groups, and the flat view round-trips
    options = O.finetune_options()
    assert options.flat() == {name: p.default for name, p in signature.items()}
    assert O.FinetuneOptions.from_flat(options.flat()) == options
    assert options.replace(lora_r=4).lora.lora_r == 4 and options.replace(lora_r=4).train == options.train
    assert O.finetune_options("runs/mix", lora_r=4).data.data == "runs/mix"  # positional, as the signature says
    with pytest.raises(TypeError):
        O.finetune_options(lora_rank=4)


def test_cli_verbs_take_exactly_the_flat_options():
    """`onegpu finetune` and `onegpu finetune plan` parse the flat names (what sweep YAMLs and users write),
    each with the doc of its field for --help."""
    from jsonargparse import ArgumentParser

    from onegpu.finetune.verbs import finetune, plan

    def options(fn) -> dict[str, tuple]:
        parser = ArgumentParser()
        parser.add_function_arguments(fn, as_group=False, as_positional=True, fail_untyped=True)
        return {a.dest: (a.default, a.help) for a in parser._actions if a.dest not in ("help",)}

    reference = options(O.finetune_options)
    assert options(finetune) == reference
    assert list(reference) == O.option_names()
    assert all(help_text.startswith(doc.split()[0]) for (_d, help_text), doc in
               zip(reference.values(), cli.option_docs(O.FinetuneOptions).values()))
    plan_own = [f.name for f in fields(O.PlanArgs)]
    assert list(options(plan)) == [*plan_own, *O.option_names()]
    # the CLI's error messages, --help types and bare boolean flags see the same options
    assert list(cli.verb_parameters(finetune)) == O.option_names()
    assert list(cli.verb_parameters(plan)) == [*plan_own, *O.option_names()]


def test_option_checks_need_no_files_and_report_every_problem():
    options = O.finetune_options(lora_r=0, global_batch_size=3, budget="soon", data="/nonexistent")
    problems = [p.problem for p in O.option_problems(options)]
    assert len(problems) == 3 and "lora_r must be > 0" in problems[0]
    assert "positive multiple" in problems[1] and "cannot read the duration" in problems[2]
    with pytest.raises(UserError, match="lora_r must be > 0"):
        O.check_options(options)
    assert O.option_problems(O.finetune_options()) == []


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, bundled_checkpoint, shared_datasets):
    root = tmp_path_factory.mktemp("config")
    return {"ckpt": make_tiny_checkpoint(root / "ckpt", bundled_checkpoint),  # block_size 1024
            "data": make_data_dir(root / "data", shared_datasets, n_train=8, n_val=4, max_seq_length=256)}


def test_resolve_settles_every_default_once(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("ONEGPU_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    cfg = C.resolve(O.finetune_options(data=str(inputs["data"]), checkpoint_dir=inputs["ckpt"], device="cpu",
                                       budget="2h"))
    manifest = json.loads((inputs["data"] / "manifest.json").read_text())
    assert cfg.data.max_seq_length == manifest["max_seq_length"] == 256  # the manifest's
    assert cfg.data.prompt_style == manifest["prompt_style"]
    assert (cfg.model.device, cfg.model.precision) == ("cpu", "32-true")
    assert cfg.checkpoints.out_dir == tmp_path / "runs" / "finetune"
    assert cfg.clock.budget_s == 7200 and cfg.clock.reserve_s == 720
    assert len(cfg.dataset.train_rows) == 8 and len(cfg.dataset.val_rows) == 4
    flat = cfg.flat()
    assert flat["max_seq_length"] == 256 and flat["device"] == "cpu" and "dataset" not in flat

    # explicit values win; the model's block size caps them (one rule)
    assert C.resolve(O.finetune_options(data=str(inputs["data"]), checkpoint_dir=inputs["ckpt"],
                                        max_seq_length=64)).data.max_seq_length == 64
    assert C.resolve(O.finetune_options(data=str(inputs["data"]), checkpoint_dir=inputs["ckpt"],
                                        max_seq_length=4096)).data.max_seq_length == 1024
    # under `wandb agent` each trial gets its own out dir
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")
    monkeypatch.setenv("WANDB_RUN_ID", "run1")
    cfg = C.resolve(O.finetune_options(data=str(inputs["data"]), checkpoint_dir=inputs["ckpt"]))
    assert cfg.checkpoints.out_dir == tmp_path / "runs" / "sweep-abc" / "run1"


def test_plan_mode_runs_the_config_one_micro_batch_per_step(inputs, tmp_path, monkeypatch):
    from onegpu.finetune.planning.plan import plan_options

    monkeypatch.setenv("ONEGPU_RUNS", str(tmp_path))
    options = plan_options(O.finetune_options(data=str(inputs["data"]), micro_batch_size=2, global_batch_size=16,
                                              resume="auto", lora_dropout=0.1), steps=3)
    assert (options.train.global_batch_size, options.train.max_steps, options.lora.lora_dropout) == (2, 3, 0.0)
    assert options.checkpoints.resume is None and options.checkpoints.out_dir == Path(tmp_path) / "finetune-plan"
