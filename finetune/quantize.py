"""QLoRA: quantize the frozen base Linear layers with bitsandbytes, on CPU or CUDA.

Lightning's ``BitsandbytesPrecision`` refuses non-CUDA devices, but bitsandbytes 0.50 runs
``Linear4bit`` / ``Linear8bitLt`` on CPU, so onegpu swaps the layers itself: every frozen
``.linear`` inside litgpt's LoRA layers of the transformer blocks becomes a bnb layer holding the
pretrained weight quantized (the LoRA A/B matrices stay in the training precision). The LM head and
the embeddings stay unquantized (as in the QLoRA paper's setup they are small next to the blocks,
and quantizing the head costs the most quality). One code path for CPU and CUDA: the weight is
quantized when the bnb layer is moved to the device.
"""

from __future__ import annotations

import torch
from litgpt.lora import LoRALinear

from onegpu.contracts import QUANTIZE_MODES
from onegpu.errors import UserError


def quantize_frozen_linears(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype,
                            device: torch.device) -> int:
    """Replace the frozen base linears of the blocks in place; returns how many were quantized."""
    if mode not in QUANTIZE_MODES:
        raise UserError(f"unknown quantize mode {mode!r}", fix=f"use one of {', '.join(QUANTIZE_MODES)}")
    # bitsandbytes probes its kernels and warns as it loads: only QLoRA and the 8-bit/paged optimizers load it
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.transformer.h.named_modules()):
        if not isinstance(module, LoRALinear) or not isinstance(module.linear, torch.nn.Linear):
            continue
        lin = module.linear
        weight = lin.weight.data.detach().to("cpu", torch.float32 if device.type == "cpu" else compute_dtype)
        bias = lin.bias
        if mode == "bnb.int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            quant_type = "nf4" if mode.startswith("bnb.nf4") else "fp4"
            double = mode.endswith("-dq")
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias is not None,
                                  compute_dtype=compute_dtype, quant_type=quant_type, compress_statistics=double)
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double)
        if bias is not None:
            q.bias = torch.nn.Parameter(bias.data.clone(), requires_grad=False)
        module.linear = q.to(device)  # quantizes here
        count += 1
    return count
