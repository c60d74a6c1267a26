"""``onegpu model push``: publish a fine-tuned checkpoint to the Hugging Face Hub with its lineage.

Everything that goes up is first written into one folder (``--dry_run DIR`` writes it there and
stops before any network call):

* ``--weights merged`` (default): HF-format weights (``config.json`` + ``model.safetensors``) that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads; ``--weights adapter``: litgpt's
  LoRA weights (``lit_model.pth.lora`` + ``hyperparameters.yaml``) plus the base model's hub id,
  to merge onto that base;
* the tokenizer, with a chat template made from the checkpoint's ``prompt_style.yaml`` (the
  format it was trained with; else the base's template), and ``prompt_style.yaml`` itself;
* ``onegpu_lineage.json`` and ``README.md``, the model card: front matter the hub reads
  (base_model, license, tags, library_name) and the lineage in the body: data recipe + content
  hash, base model, LoRA config, git SHA, budget used, validation and test scores.

Then ``HfApi.create_repo`` + ``upload_folder``. Sources of the lineage: the checkpoint's
``onegpu_model.json`` / ``hyperparameters.yaml``, its fine-tune run dir (``final/``'s parent:
``run.json``, ``summary.json``), the data dir's ``manifest.json`` and ``--results`` eval dirs.
This module is the verb (its options and the checks before any work); the folder, the card and the
hub calls are its engine, submission/hub_push.py.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from onegpu.checkpoints import locate_checkpoint
from onegpu.contracts import PUSHED_LINEAGE, scratch_dir, staged_dir
from onegpu.errors import UserError
from onegpu.paths import cache_dir

Weights = Literal["merged", "adapter"]
LINEAGE = PUSHED_LINEAGE


def push(checkpoint: Path, repo: str | None = None, dry_run: Path | None = None, weights: Weights = "merged",
         results: list[Path] | None = None, data: Path | None = None, private: bool = False,
         revision: str | None = None, commit_message: str | None = None, license: str | None = None,
         token: str | None = None) -> dict[str, Any]:
    """Upload a fine-tuned checkpoint to the Hugging Face Hub with a model card that carries its lineage.

    Args:
        checkpoint: a fine-tune's ``out/final`` (or any litgpt checkpoint / LoRA adapter dir, or
            ``wandb:ENTITY/PROJECT/NAME:ALIAS``).
        repo: the hub repo to create or update, ``ORG/NAME`` (required; a flag, not a positional).
        dry_run: write the exact folder that would be uploaded into this dir and stop before any
            network call (the dir must be new, empty, or an earlier dry run).
        weights: ``merged`` (HF-format safetensors, loads with transformers) or ``adapter`` (litgpt's
            LoRA weights + the base model's hub id, for a base from `onegpu model prepare`).
        results: ``onegpu eval val`` / ``onegpu eval helm`` out dirs (with ``results.json``) whose
            scores go into the card, e.g. ``--results runs/eval-val runs/eval-helm``.
        data: the data dir the model was trained on, when it is no longer where
            ``onegpu_model.json`` says (its manifest gives the recipe and content hash).
        private: create the repo private.
        revision: a branch to push to (created if missing). Default: main.
        commit_message: the hub commit message. Default: names the checkpoint and its git SHA.
        license: the card's licence id (e.g. ``apache-2.0``, ``llama2``). Default: the base model's.
        token: HF token with write access. Default: ``HF_TOKEN``, else the ``hf auth login`` token.
    """
    _check_repo_id(repo)
    ref = locate_checkpoint(checkpoint)
    from onegpu.submission import hub_push  # the engine: torch, litgpt, transformers load here, not for --help

    lineage = hub_push.collect_lineage(ref, [Path(r) for r in results or []], Path(data) if data else None)
    api = None if dry_run else hub_push.hub_session(token or os.environ.get("HF_TOKEN"))  # fails before the export
    if dry_run:
        folder = _fresh_dry_run_dir(Path(dry_run))
        with staged_dir(folder) as staging:  # whole or absent: a killed dry run never leaves half a folder
            hub_push.write_upload_folder(ref, staging, repo, weights, lineage, license)
        print(f"[onegpu push] dry run: wrote the folder that would go to https://huggingface.co/{repo} "
              f"(nothing uploaded)", file=sys.stderr)
        print(folder)
        return {"dry_run": str(folder), "repo": repo, "files": sorted(p.name for p in folder.iterdir())}
    with scratch_dir(_scratch_dir(), "push") as tmp:  # a killed push's (a merged 7B: ~14 GB) goes next time
        folder = hub_push.write_upload_folder(ref, tmp / "upload", repo, weights, lineage, license)
        message = commit_message or (f"onegpu push: {ref.path.name} (git {lineage['run'].get('git_sha') or '?'})")
        url = hub_push.upload(api, folder, repo, private=private, revision=revision, commit_message=message)
    print(f"[onegpu push] uploaded {ref.path} -> {url}", file=sys.stderr)
    print(url)
    return {"repo": repo, "url": url}


def _scratch_dir() -> Path:
    # beside the checkpoints, not in /tmp: a merged 7B export is ~14 GB
    cache_dir().mkdir(parents=True, exist_ok=True)
    return cache_dir()


def _check_repo_id(repo: str | None) -> None:
    if repo is None:
        raise UserError("no --repo given",
                        fix="name the hub repo: --repo ORG/NAME (with --dry_run DIR it only writes the folder)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo or ""):
        raise UserError(f"--repo {repo!r} is not a hub repo id", fix="write it as ORG/NAME, e.g. myteam/llama2-7b-lora")


def _fresh_dry_run_dir(folder: Path) -> Path:
    """``folder`` when it is new, empty or an earlier dry run (replaced once the new one is written)."""
    if folder.exists() and any(folder.iterdir()) and not (folder / LINEAGE).is_file():
        raise UserError(f"--dry_run {folder} exists and is not an earlier dry run",
                        fix="pass a new or empty dir (its whole content is what would be uploaded)")
    return folder
