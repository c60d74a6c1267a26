"""One-off export of a litgpt checkpoint to a Hugging Face model dir (to run lm-eval's own HFLM).

onegpu's evaluation never needs this (``eval/lm.py`` runs the litgpt model directly); it exists to
*prove* that wrapper: the equality test and ``benchmarks/eval_speed.py`` score the same weights
through HFLM. Uses litgpt's ``convert_lit_checkpoint`` and the checkpoint's own ``config.json``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from onegpu.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json")


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out/`` = config.json + model.safetensors + tokenizer files; returns ``out``."""
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
    from safetensors.torch import save_file

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "config.json").is_file():
        raise UserError(f"{checkpoint} has no config.json (the HF config) to export with",
                        fix="use a checkpoint made by `onegpu model prepare`, which keeps config.json")
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        convert_lit_checkpoint(checkpoint_dir=checkpoint, output_dir=Path(tmp))
        state = torch.load(Path(tmp) / "model.pth", map_location="cpu", weights_only=True)
    import json

    if json.loads((checkpoint / "config.json").read_text()).get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # tied: HF rebuilds it from the embeddings
    # safetensors refuses shared storage (tied embeddings): store independent copies.
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("config.json", *TOKENIZER_FILES):
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, out / name)
    return out
