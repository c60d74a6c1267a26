"""How a model's weights reach the submission image (``onegpu submission pack --weights ROUTE``).

Three routes, one result: a merged litgpt checkpoint at ``/models/model`` inside the image, so
``docker run --gpus all -p 8080:80 IMAGE`` needs no volume, key or flag.

* ``embed``: the merged checkpoint's serving files are copied into the bundle's ``model/`` and
  the Dockerfile ``COPY``s them; nothing is fetched at build or at start.
* ``hub:ORG/NAME[@REVISION]``: ``onegpu model prepare`` downloads and converts it at ``docker build``,
  at a pinned revision (pack asks the hub for the current commit when none is given); a gated
  model's token is the BuildKit secret ``hf_token``, mounted for that one step.
* ``wandb:ENTITY/PROJECT/NAME:VERSION``: ``onegpu submission fetch`` downloads the W&B ``model``
  artifact at build, the API key being the BuildKit secret ``wandb_api_key``. An adapter-only
  artifact (``lit_model.pth.lora``, no ``lit_model.pth``) needs ``--base hub:ORG/NAME@REVISION``:
  the base is prepared and the adapter merged into it during the same build step.

Every route is checked (and a hub revision pinned) before pack copies anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import HfApi

from onegpu.errors import UserError
from onegpu.tracking import download_wandb_artifact

MODEL_DIR = "/models/model"
# What the server reads from a merged checkpoint (engine + prompt style + lineage); never the LoRA
# weights, optimizer state or an HF export.
SERVING_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "generation_config.json", "config.json", "prompt_style.yaml", "onegpu_model.json")
ROUTES_HELP = "embed, hub:ORG/NAME[@REVISION] or wandb:ENTITY/PROJECT/NAME:VERSION"
_HUB = re.compile(r"[\w.-]+/[\w.-]+")
_WANDB = re.compile(r"[\w.-]+/[\w.-]+/[\w.-]+:[\w.-]+")


@dataclass(frozen=True)
class WeightsRoute:
    kind: Literal["embed", "hub", "wandb"]
    name: str = ""      # ORG/NAME (hub) or ENTITY/PROJECT/NAME:VERSION (wandb)
    revision: str = ""  # hub: the commit (or tag) fetched at build

    def __str__(self) -> str:
        if self.kind == "embed":
            return "embed"
        return f"{self.kind}:{self.name}" + (f"@{self.revision}" if self.revision else "")


def parse_route(spec: str) -> WeightsRoute:
    """``embed`` | ``hub:ORG/NAME[@REVISION]`` | ``wandb:ENTITY/PROJECT/NAME:VERSION``, or a UserError."""
    kind, _, rest = spec.partition(":")
    if spec == "embed":
        return WeightsRoute("embed")
    if kind == "hub":
        name, _, revision = rest.partition("@")
        if _HUB.fullmatch(name) and (not revision or re.fullmatch(r"[\w./-]+", revision)):
            return WeightsRoute("hub", name, revision)
    elif kind == "wandb" and _WANDB.fullmatch(rest):
        return WeightsRoute("wandb", rest)
    raise UserError(f"--weights {spec!r} is not a weights route", fix=f"use {ROUTES_HELP}")


def pin_revision(route: WeightsRoute) -> WeightsRoute:
    """A hub route with its revision fixed: as given, else the repo's current commit (asked of the hub)."""
    if route.kind != "hub" or route.revision:
        return route
    try:
        sha = HfApi().model_info(route.name, token=os.environ.get("HF_TOKEN") or None).sha
    except Exception as err:  # offline, unknown repo, gated without a token: all mean "cannot pin here"
        raise UserError(f"cannot pin a revision of {route.name} (asked the hub for its current commit: {err})",
                        fix=f"write the commit yourself: --weights hub:{route.name}@REVISION (the hash on the "
                            "model's 'Files and versions' page)") from None
    return WeightsRoute("hub", route.name, sha)


def embed_checkpoint(source: str | Path, out: Path, base_checkpoint: str | Path | None = None) -> list[str]:
    """Copy the serving files of ``source`` (merged first if it is an adapter dir) into ``out``.

    The copy is named ``model`` wherever it goes, and litgpt decides BOS partly from a dir's name, so
    the BOS rule the model was fine-tuned with (``onegpu.inference.uses_bos``) is written into the
    copy's ``tokenizer_config.json`` (``add_bos_token``) where the name alone would lose it.
    """
    from litgpt.tokenizer import Tokenizer  # the engine's (with torch): not for --help

    from onegpu.inference import locate_checkpoint, merged_checkpoint, uses_bos  # the engine: torch, litgpt

    ref = locate_checkpoint(source, base_checkpoint)
    merged = merged_checkpoint(ref)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SERVING_FILES:
        if (merged / name).is_file():
            shutil.copy2(merged / name, out / name)  # follows symlinks: the copy stands alone
            copied.append(name)
    bos = uses_bos(ref, merged)
    if Tokenizer(out).use_bos != bos:
        config_file = out / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        config_file.write_text(json.dumps({**config, "add_bos_token": bos}, indent=2), encoding="utf-8")
    return copied


def fetch(weights: str, out: Path = Path(MODEL_DIR), base_checkpoint: Path | None = None) -> Path:
    """Build step of the W&B route: download the artifact, merge an adapter, write the serving files.

    Runs inside ``docker build`` (the packed Dockerfile calls it with the API key from a build secret).

    Args:
        weights: the W&B model artifact, ``wandb:ENTITY/PROJECT/NAME:VERSION``.
        out: where the merged checkpoint's serving files go (the image's model dir).
        base_checkpoint: for an adapter-only artifact, the prepared base checkpoint to merge it into.
    """
    route = parse_route(weights)
    if route.kind != "wandb":
        raise UserError(f"onegpu submission fetch takes a wandb: route, got {weights!r}",
                        fix="embed and hub: routes need no fetch (the Dockerfile COPYs / prepares them)")
    copied = embed_checkpoint(download_wandb_artifact(route.name), Path(out), base_checkpoint)
    print(f"[onegpu fetch] {route} -> {out} ({', '.join(copied)})", file=sys.stderr)
    return Path(out)
