"""The one inference layer: a checkpoint source in, a model with its tokenizer and rules out.

``onegpu serve`` (``submission/engine.py``) and ``onegpu eval val`` (``eval/lm.py``) both call
:func:`load`, so the HELM test and validation see the same weights, dtype, token ids and prompt
format; they add only their own request handling. :func:`export_hf` is the one Hugging Face export
(``finetune --export_hf``, the HFLM equality test and benchmark, ``onegpu model push``).

Sources are checked first without loading anything (``onegpu/checkpoints.py``: a litgpt checkpoint
dir, a LoRA adapter dir or a W&B model artifact). An adapter dir is merged with litgpt's
``merge_lora`` once and cached (:func:`merged_checkpoint`), so a server restart, a second eval or a
HELM run after a validation run reuse the merged weights.

The rules both paths must apply the same way live here and nowhere else:

* dtype (:func:`default_dtype`): bfloat16 on GPUs that support it, float16 on older GPUs (litgpt's
  own inference default; a 7B model does not fit a 16-24 GB card in float32), float32 on CPUs
  (bf16 matmuls there are hundreds of times slower).
* BOS (:func:`uses_bos`): prompts start with BOS when they did in fine-tuning, i.e. as litgpt's
  tokenizer of the *base* model decides.
* prompt format (:func:`resolve_prompt_style`): litgpt's ``prompt_style.yaml`` travels with the
  checkpoint; ``auto`` finds it (in the dir, else in the adapter's base), ``raw`` ignores it, a
  name forces one.

Both then run the model through :class:`onegpu.kvcache.CachedForward` (K/V-cache rows any forward
can address, the LM head only where logits are needed): the server's continuous batching, chunked
prefill and prefix cache, and validation's shared-context scoring (``eval/shared_context.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import BitsandbytesPrecision
from litgpt import GPT, Config
from litgpt.prompts import PromptStyle, has_prompt_style, load_prompt_style, prompt_styles
from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
from litgpt.scripts.merge_lora import merge_lora
from litgpt.tokenizer import Tokenizer
from litgpt.utils import load_checkpoint
from safetensors.torch import save_file

from onegpu.checkpoints import CheckpointRef, locate_checkpoint
from onegpu.contracts import QUANTIZE_MODES, read_json, staged_dir
from onegpu.errors import UserError
from onegpu.paths import cache_dir

DTYPES = ("float32", "bfloat16", "float16")
# What a Hugging Face model dir needs beside its weights (copied when present).
HF_CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json")


def merged_checkpoint(ref: CheckpointRef) -> Path:
    """A loadable (merged) litgpt checkpoint dir for ``ref``: as is, or base + adapter merged once."""
    if not ref.is_adapter:
        return ref.path
    adapter_dir, base = ref.path, ref.base
    lora = adapter_dir / "lit_model.pth.lora"
    key = hashlib.sha256(f"{lora.resolve()}|{lora.stat().st_size}|{lora.stat().st_mtime_ns}|{base.resolve()}"
                         .encode()).hexdigest()[:16]
    merged = cache_dir() / "merged" / f"{adapter_dir.name}-{key}"
    if (merged / "lit_model.pth").is_file():
        return merged
    with staged_dir(merged) as work:
        for item in base.iterdir():  # tokenizer + configs of the base, never its weights
            if item.is_file() and item.name != "lit_model.pth":
                (work / item.name).symlink_to(item.resolve())
        for item in adapter_dir.iterdir():  # the adapter's own files win (prompt_style.yaml, lineage...)
            if item.is_file() and item.name != "lit_model.pth":
                target = work / item.name
                if target.exists() or target.is_symlink():
                    target.unlink()
                shutil.copy2(item, target)
        print(f"[onegpu] merging LoRA adapter {adapter_dir} into base {base} -> {merged}", file=sys.stderr)
        merge_lora(work, pretrained_checkpoint_dir=base)  # precision: the adapter's hyperparameters.yaml
    return merged


# ------------------------------------------------------------------------------ device and dtype
def resolve_device(spec: str | None = "auto") -> torch.device:
    """``auto``/None -> cuda when a GPU is visible, else cpu; a GPU asked for but absent is a UserError."""
    if spec in (None, "auto"):
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {spec} was asked for but no CUDA GPU is visible", fix="use --device cpu")
    try:
        return torch.device(spec)
    except RuntimeError as err:
        raise UserError(f"unknown device {spec!r}", fix="use auto, cpu, cuda or cuda:N") from err


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype rule (see the module docstring): bf16 on GPUs with bf16, fp16 on older GPUs, fp32 on CPUs."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_dtype(spec: str | None, device: torch.device | str) -> torch.dtype:
    """``auto``/None -> :func:`default_dtype`; else one of ``DTYPES``."""
    if spec in (None, "auto"):
        return default_dtype(device)
    if spec not in DTYPES:
        raise UserError(f"unknown dtype {spec!r}", fix=f"use auto, {', '.join(DTYPES)}")
    return getattr(torch, spec)


def check_quantize(quantize: str | None, device: torch.device) -> str | None:
    """The bitsandbytes mode (one of ``QUANTIZE_MODES``; the ``bnb.`` prefix may be left out), CUDA only."""
    if quantize is None:
        return None
    mode = quantize if quantize.startswith("bnb.") else f"bnb.{quantize}"
    if mode not in QUANTIZE_MODES:
        raise UserError(f"unknown quantization {quantize!r}", fix=f"use one of {', '.join(QUANTIZE_MODES)}")
    if device.type != "cuda":
        raise UserError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes)", fix="drop --quantize on CPU")
    return mode


# ------------------------------------------------------------------------------ tokenizer, BOS, format
def uses_bos(ref: CheckpointRef, checkpoint_dir: Path) -> bool:
    """Whether prompts start with BOS: as litgpt's tokenizer of the base model decided in fine-tuning.

    litgpt decides this partly from the checkpoint dir's *name* (SmolLM2-*-Instruct, Llama-3*), so
    a fine-tune's ``out/final``, a merged copy or any renamed dir would silently lose the BOS its
    training data had. The base it was fine-tuned from (``ref.trained_from``) decides when it is at
    hand; otherwise the loadable dir ``checkpoint_dir`` does, as litgpt would.
    """
    base = ref.trained_from
    decides = base if base is not None and (base / "tokenizer_config.json").is_file() else checkpoint_dir
    return Tokenizer(decides).use_bos


def load_tokenizer(ref: CheckpointRef, checkpoint_dir: Path) -> Tokenizer:
    """litgpt's tokenizer of ``checkpoint_dir`` with ``use_bos`` set by :func:`uses_bos`."""
    tokenizer = Tokenizer(checkpoint_dir)
    tokenizer.use_bos = uses_bos(ref, checkpoint_dir)
    return tokenizer


def hf_tokenizer(checkpoint_dir: Path, bos: bool):
    """The same tokenizer files as a ``transformers`` tokenizer (what lm-eval's plumbing calls), adding
    BOS exactly when ``bos`` says so, as ``HFLM(add_bos_token=bos)`` does; pad = EOS when it has none."""
    from transformers import AutoTokenizer  # optional (the train extra): the serving image has none

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), add_bos_token=bos)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_prompt_style(spec: str, checkpoint: Path, base: Path | None = None,
                         who: str = "onegpu") -> PromptStyle | None:
    """``raw`` -> None; ``auto`` -> the checkpoint's (or its base's) prompt_style.yaml, else None
    with a warning; otherwise a litgpt prompt-style name (unknown names list the known ones)."""
    if spec == "raw":
        return None
    if spec == "auto":
        for d in (checkpoint, base):
            if d is not None and has_prompt_style(Path(d)):
                return load_prompt_style(Path(d))
        print(f"[{who}] warning: {checkpoint} has no prompt_style.yaml; prompts go in raw "
              "(pass --prompt_style NAME to wrap them in a template)", file=sys.stderr)
        return None
    if spec not in prompt_styles:
        raise UserError(f"unknown prompt style {spec!r}",
                        fix=f"use raw, auto, or one of litgpt's: {', '.join(sorted(prompt_styles))}")
    return PromptStyle.from_name(spec)


# ------------------------------------------------------------------------------ the model
def load_model(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype, quantize: str | None = None) -> GPT:
    """litgpt ``GPT`` of a merged checkpoint dir, in eval mode; ``quantize`` (a checked mode, CUDA)
    loads the Linear weights through Lightning's bitsandbytes plugin."""
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    path = checkpoint_dir / "lit_model.pth"
    if quantize is not None:
        return _load_quantized(config, path, dtype, quantize)
    with torch.device("meta"):
        model = GPT(config)
    state = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state), assign=True)
    # The RoPE buffers were created on the meta device: build real ones before moving the model.
    model.cos, model.sin = model.rope_cache(device=torch.device("cpu"))
    return model.to(device=device, dtype=dtype).eval()


def _load_quantized(config, path: Path, dtype: torch.dtype, quantize: str) -> GPT:
    mode = quantize.removeprefix("bnb.")
    precision_dtype = torch.float16 if mode == "int8" else dtype  # bitsandbytes' int8 kernels are fp16
    fabric = L.Fabric(accelerator="cuda", devices=1, plugins=BitsandbytesPrecision(mode, precision_dtype))
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    model = fabric.setup_module(model)
    load_checkpoint(fabric, model, path)
    return model.module.eval()


@dataclass
class LoadedModel:
    """What :func:`load` returns: everything an inference path needs, decided once."""

    ref: CheckpointRef
    checkpoint: Path          # the merged dir the weights and tokenizer came from
    model: GPT | None         # None when another engine runs the weights (``load(..., with_model=False)``)
    tokenizer: Tokenizer      # litgpt's, ``use_bos`` set by :func:`uses_bos`
    device: torch.device
    dtype: torch.dtype
    prompt_style: PromptStyle | None


def load(checkpoint: str | Path, *, base_checkpoint: str | Path | None = None, device: str | None = "auto",
         dtype: str | None = "auto", quantize: str | None = None, prompt_style: str = "auto",
         who: str = "onegpu", with_model: bool = True) -> LoadedModel:
    """Load a checkpoint source for inference; every option is checked before anything heavy runs.

    Args:
        checkpoint: a merged litgpt dir, an adapter-only dir, or ``wandb:ENTITY/PROJECT/NAME:ALIAS``.
        base_checkpoint: the base of an adapter-only dir (default: its hyperparameters.yaml's).
        device: ``auto`` (cuda if visible), ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``auto`` (:func:`default_dtype`) or one of ``DTYPES``.
        quantize: one of ``QUANTIZE_MODES`` (CUDA only) or None.
        prompt_style: ``auto``, ``raw`` or a litgpt prompt-style name.
        who: the prefix of warnings (``onegpu serve``, ``onegpu eval``).
        with_model: False decides everything (merge included) but leaves the weights unloaded, for an
            engine that loads them itself (``onegpu serve --engine vllm``).
    """
    ref = locate_checkpoint(checkpoint, base_checkpoint)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    mode = check_quantize(quantize, torch_device)
    style = resolve_prompt_style(prompt_style, ref.path, ref.base, who=who)
    merged = merged_checkpoint(ref)
    model = load_model(merged, torch_device, torch_dtype, mode) if with_model else None
    return LoadedModel(ref=ref, checkpoint=merged, model=model,
                       tokenizer=load_tokenizer(ref, merged), device=torch_device, dtype=torch_dtype,
                       prompt_style=style)


# ------------------------------------------------------------------------------ Hugging Face export
def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out/`` = ``model.safetensors`` + ``config.json`` + tokenizer files; returns ``out``.

    Any checkpoint source (an adapter-only dir is merged first). Weights are renamed by litgpt's
    ``convert_lit_checkpoint``; tied embeddings (``tie_word_embeddings``) are stored once, as HF
    rebuilds ``lm_head`` from them. ``out`` is written beside and renamed into place (replacing it).
    """
    ref = locate_checkpoint(checkpoint)
    if not any((d / "config.json").is_file() for d in (ref.path, ref.base) if d is not None):
        raise UserError(f"{ref.path} has no config.json (the HF config) to export with",
                        fix="prepare the base model with `onegpu model prepare`, which keeps config.json "
                            "(or drop --export_hf)")
    source = merged_checkpoint(ref)
    with staged_dir(out) as work:
        converted = work / ".litgpt-export"  # inside the staged dir: a kill leaves nothing elsewhere
        converted.mkdir()
        with contextlib.redirect_stdout(io.StringIO()):
            convert_lit_checkpoint(checkpoint_dir=source, output_dir=converted)  # pprints its locals
        state = torch.load(converted / "model.pth", map_location="cpu", weights_only=True)
        shutil.rmtree(converted)
        if read_json(source / "config.json").get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        # safetensors refuses tensors that share storage: store independent, contiguous copies.
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(work / "model.safetensors"),
                  metadata={"format": "pt"})
        # safetensors writes its file private (0600); the export is read by other users like its config
        # files (the vLLM image's server runs as a non-root user)
        (work / "model.safetensors").chmod(0o644)
        for name in HF_CONFIG_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, work / name)
    return Path(out)
