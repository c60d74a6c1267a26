"""Analytic memory and speed model of one onegpu training step: no weights, no GPU, no data.

From a litgpt ``Config`` and the options that shape a step (:class:`Workload`), it predicts the
peak of live tensor bytes, broken down, and the LoRA-correct FLOPs per token. Every term follows
what the trainer (``finetune/lora.py`` + ``finetune/packing.py``) and its libraries really keep:

* **Weights.** The model is built by litgpt on the ``meta`` device (no memory, exact shapes), so
  parameter counts and linear shapes are litgpt's own. The frozen linears of the blocks (every
  ``LoRALinear`` under ``transformer.h``, the set ``finetune/quantize.py`` swaps) are stored as
  bitsandbytes does: 4-bit = packed nibbles + one fp32 absmax per 64 weights; ``-dq`` (double
  quantization) = packed nibbles + one uint8 absmax per 64 weights + one fp32 absmax per 256 of
  those + a 256-entry fp32 code and an fp32 offset; int8 = one byte per weight + one fp32 scale per
  output row. Embeddings, LM head, norms and LoRA stay in the training dtype.
* **LoRA gradients and optimizer states.** torch AdamW keeps two states in the parameter's dtype;
  bitsandbytes ``paged_adamw`` two fp32 states, paged to CPU under pressure for tensors of >= 1e5
  elements (listed, not counted in the peak); ``adamw8bit`` one byte per state and element + one
  fp32 absmax per 256 elements and state (fp32 states below 4096 elements).
* **Activations** (per token and layer, bytes): what autograd saves for LoRA on a frozen base, read
  off litgpt's ``Block`` (and checked against ``saved_tensors_hooks`` in the tests). A frozen linear
  saves no input (no weight gradient); a LoRA branch saves its input (or dropout's output and mask)
  and its rank-r middle; RMSNorm saves an fp32 copy of its input and the fp32 rsqrt; SDPA / Flex
  save q, k, v (GQA heads already repeated by litgpt; with MHA, v is a view that keeps the whole
  qkv output alive), the output and an fp32 logsumexp; SwiGLU saves both branches and the SiLU
  output. With activation checkpointing a layer keeps only its input, and during backward one
  block is recomputed at a time.
* **Logits and loss.** The LM head runs only on the loss tokens (``packing.loss_sum``), upcast to
  fp32: the forward holds logits + fp32 logits + log-softmax; the backward the saved log-softmax +
  its gradient + the logits' gradient, 12 bytes per logit: usually the peak.
* **Transients**: one block's backward (gradients of the MLP intermediates), one dequantized base
  weight (bitsandbytes dequantizes a 4-bit weight for each matmul of large batches and in backward).
* **Outside the tensors** (GPU only): CUDA context + kernels (:data:`CUDA_CONTEXT_BYTES`, assumed)
  and caching-allocator slack (:data:`ALLOCATOR_SLACK`, assumed share of the tensor peak).
* **Which bitsandbytes.** Before 0.43.2 (PR #1270), ``MatMul4Bit.forward`` kept its input on
  ``ctx`` for the backward it never used it in: every 4-bit linear whose input carries a gradient
  then holds that input until the graph dies (int8's matmul still does). ``Workload.bnb_version``
  says which behaviour to model (default: the installed bitsandbytes).
* **Whose loop** (``Workload.loop``). ``onegpu``: this trainer (head and embeddings unquantized,
  loss on response tokens only). ``litgpt``: litgpt's ``finetune_lora``, to set the model against
  litgpt's published measurements: Lightning's ``BitsandbytesPrecision`` swaps *every*
  ``nn.Linear``, the LM head included, quantizing from fp16 (so bf16 training dequantizes to fp16,
  then casts: two transient copies of a weight: ``Workload.dequant_bytes``); rows padded, not packed; the head runs in chunks of
  128 positions and ``chunked_cross_entropy`` takes the loss on every position in the training
  dtype: the loop keeps the logits, the log-softmax output is saved, and backward differentiates
  one chunk at a time (measured on CPU: 2 + 2 x 128/T copies of the logits).

The peak is the larger of two moments: the loss backward (every layer's activations still saved)
and the first block backward (loss tensors gone, one block's gradients and recompute alive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import torch
from litgpt.config import Config as BaseConfig
from litgpt.lora import GPT, Config, LoRALinear
from packaging.version import Version

from onegpu.contracts import QUANTIZE_MODES
from onegpu.finetune.options import LoRAArgs
from onegpu.finetune.telemetry import linear_shapes, step_flops

GIB = 2**30
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context, cuBLAS workspace, compiled kernels (assumed; measured by gpu_check)
ALLOCATOR_SLACK = 0.07  # caching allocator: reserved over allocated at the peak (assumed)
BNB_4BIT_BLOCK = 64  # bitsandbytes quantize_4bit default blocksize
BNB_DQ_BLOCK = 256  # blocksize of the second-level (absmax) quantization
BNB_PAGED_MIN_NUMEL = 100_000  # bnb get_state_buffer: smaller tensors are not paged
BNB_8BIT_MIN_NUMEL = 4096  # bnb Optimizer2State min_8bit_size
BNB_8BIT_OPT_BLOCK = 256
BNB_4BIT_INPUT_FREED = "0.43.2"  # bitsandbytes PR #1270: MatMul4Bit no longer keeps its input on ctx
LITGPT_HEAD_CHUNK = 128  # litgpt finetune_lora: model(x, lm_head_chunk_size=128) + chunked_cross_entropy
DTYPE_BYTES = {"32-true": 4, "bf16-true": 2, "16-true": 2, "bf16-mixed": 2, "16-mixed": 2}
OPTIMIZERS = ("adamw", "paged_adamw", "adamw8bit")
# Families whose block this module models term by term; others get the same accounting, flagged.
MODELED_MLPS = ("LLaMAMLP", "GemmaMLP", "GptNeoxMLP")


@dataclass(frozen=True)
class Workload:
    """The options of a training step that shape its memory and speed (defaults: the trainer's)."""

    precision: str = "bf16-true"
    quantize: str | None = None
    # LoRA: the trainer's defaults (finetune/options.py LoRAArgs), where the layers are the same names
    lora_r: int = LoRAArgs.lora_r
    lora_dropout: float = LoRAArgs.lora_dropout
    lora_query: bool = LoRAArgs.lora_query
    lora_key: bool = LoRAArgs.lora_key
    lora_value: bool = LoRAArgs.lora_value
    lora_projection: bool = LoRAArgs.lora_projection
    lora_mlp: bool = LoRAArgs.lora_mlp
    lora_head: bool = LoRAArgs.lora_head
    max_seq_length: int = 2048
    micro_batch_size: int = 1
    packing: bool = True
    activation_checkpointing: bool = False
    optimizer: str = "adamw"
    loss_token_fraction: float = 1.0  # share of a row's tokens that carry a loss (1.0 = worst case)
    device: Literal["cuda", "cpu"] = "cuda"
    loop: Literal["onegpu", "litgpt"] = "onegpu"  # whose training step (module docstring)
    bnb_version: str | None = None  # the bitsandbytes modeled (None: the installed one)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]

    @property
    def weight_bytes(self) -> int:
        """Bytes per element of unquantized weights (mixed precision keeps fp32 master weights)."""
        return 4 if self.precision.endswith("mixed") or self.precision.startswith("32") else 2

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.max_seq_length

    @property
    def loss_tokens(self) -> int:
        return math.ceil(self.loss_token_fraction * self.tokens)

    @property
    def attention(self) -> str:
        """The kernel the trainer uses: FlexAttention for packed rows on CUDA, else SDPA."""
        return "flex" if self.device == "cuda" and self.packing else "sdpa"

    @property
    def qkv_lora(self) -> int:
        return int(self.lora_query) + int(self.lora_key) + int(self.lora_value)

    @property
    def matmul_keeps_input(self) -> bool:
        """bitsandbytes' matmul keeps its input on ctx: int8 always, 4-bit before 0.43.2."""
        if self.quantize is None:
            return False
        return self.quantize == "bnb.int8" or bnb_keeps_4bit_input(self.bnb_version)

    @property
    def quantized_head(self) -> bool:
        """litgpt quantizes the LM head with the blocks (Lightning's plugin swaps every nn.Linear)."""
        return self.loop == "litgpt" and self.quantize is not None

    @property
    def dequant_bytes(self) -> int:
        """Bytes per weight element that a 4-bit matmul dequantizes into (transient). litgpt (Lightning's
        plugin) quantizes from fp16, so any other dtype dequantizes to fp16, then casts; onegpu
        quantizes from the training dtype."""
        if self.loop == "litgpt" and self.precision != "16-true":
            return 2 + self.dtype_bytes
        return self.dtype_bytes


def bnb_keeps_4bit_input(version: str | None = None) -> bool:
    """Whether this bitsandbytes' ``MatMul4Bit`` keeps its input on ctx (before 0.43.2)."""

    version = version or installed_bnb_version()
    return version is not None and Version(version) < Version(BNB_4BIT_INPUT_FREED)


def installed_bnb_version() -> str | None:
    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


@dataclass
class MemoryEstimate:
    """Peak bytes of one training step, by where they go."""

    base_weights: int  # frozen linears of the blocks (quantized when QLoRA)
    other_weights: int  # embeddings, LM head, norms, RoPE cache
    lora_weights: int
    lora_grads: int
    optimizer_states: int  # on the device
    paged_optimizer_states: int  # bitsandbytes paged states: evictable to CPU, not in the peak
    activations: int  # saved for backward by all layers (checkpointing: the layers' inputs)
    step_tensors: int  # batch, masks, RoPE gathers, the final hidden states the loop holds
    loss_peak: int  # logits / log-softmax and their gradients at the loss backward
    block_backward: int  # one block's backward: recompute (checkpointing) + its gradients + dequant buffer
    cuda_context: int
    # litgpt's loop: at the end of the next forward, the previous step's graph is still referenced by its
    # `loss` and `logits` (the inputs bitsandbytes < 0.43.2 kept on ctx, the old logits) beside the new logits
    next_forward: int = 0
    per_token_layer: dict[str, float] = field(default_factory=dict)  # activation bytes per token and layer
    peak_moment: str = ""

    @property
    def static(self) -> int:
        return self.base_weights + self.other_weights + self.lora_weights + self.lora_grads + self.optimizer_states

    @property
    def tensor_peak(self) -> int:
        """Peak of live tensor bytes (what ``torch.cuda.max_memory_allocated`` reports)."""
        return self.static + self.activations + self.step_tensors + max(self.loss_peak, self.block_backward,
                                                                        self.next_forward)

    @property
    def first_step_peak(self) -> int:
        """The tensor peak of a step with no earlier step's graph alive (the first one of a run)."""
        return self.static + self.activations + self.step_tensors + max(self.loss_peak, self.block_backward)

    @property
    def allocator_slack(self) -> int:
        return int(ALLOCATOR_SLACK * self.tensor_peak) if self.cuda_context else 0

    @property
    def device_peak(self) -> int:
        """What the card must hold: tensors + allocator slack + CUDA context."""
        return self.tensor_peak + self.allocator_slack + self.cuda_context

    def rows(self) -> list[tuple[str, int]]:
        return [("base weights", self.base_weights), ("embeddings, LM head, norms", self.other_weights),
                ("LoRA weights", self.lora_weights), ("LoRA gradients", self.lora_grads),
                ("optimizer states", self.optimizer_states), ("activations saved for backward", self.activations),
                ("batch, masks, final hidden states", self.step_tensors),
                ("logits + loss (peak moment)" if self.peak_moment == "loss backward" else "logits + loss",
                 self.loss_peak),
                ("one block's backward" + (" (peak moment)" if self.peak_moment == "first block backward" else ""),
                 self.block_backward),
                *([("previous step's graph, next forward" + (" (peak moment)" if self.peak_moment == "next forward"
                                                             else ""), self.next_forward)] if self.next_forward else []),
                ("allocator slack", self.allocator_slack), ("CUDA context + kernels", self.cuda_context)]


# ------------------------------------------------------------------------------------- model shape
def meta_model(config: Any, workload: Workload) -> Any:
    """litgpt's LoRA GPT for ``config`` on the meta device: exact shapes, no memory, milliseconds."""

    lora = {k: getattr(workload, k) for k in ("lora_r", "lora_dropout", "lora_query", "lora_key", "lora_value",
                                              "lora_projection", "lora_mlp", "lora_head")}
    cfg = Config(**{**base_config_fields(config), **lora, "lora_alpha": 2 * workload.lora_r})
    with torch.device("meta"):
        model = GPT(cfg)
    return model


def base_config_fields(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(BaseConfig) if f.init and hasattr(config, f.name)}


def quantized_bytes(out_features: int, in_features: int, mode: str | None, dtype_bytes: int) -> int:
    """Bytes bitsandbytes stores for one frozen weight (out x in) in ``mode`` (None = unquantized)."""
    n = out_features * in_features
    if mode is None:
        return n * dtype_bytes
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {mode!r}")
    if mode == "bnb.int8":
        return n + 4 * out_features  # int8 weights + fp32 scale per row
    blocks = math.ceil(n / BNB_4BIT_BLOCK)
    packed = (n + 1) // 2
    code = 16 * 4  # the 4-bit code table
    if mode.endswith("-dq"):
        blocks2 = math.ceil(blocks / BNB_DQ_BLOCK)
        return packed + blocks + 4 * blocks2 + 256 * 4 + 4 + code
    return packed + 4 * blocks + code


def optimizer_state_bytes(numels: list[int], optimizer: str, param_bytes: int,
                          device: str) -> tuple[int, int]:
    """(device bytes, paged bytes) of the optimizer states for trainable tensors of these sizes."""
    device_bytes = paged = 0
    for n in numels:
        if optimizer == "adamw":
            device_bytes += 2 * n * param_bytes + 4  # exp_avg, exp_avg_sq in the param dtype + step
        elif optimizer == "paged_adamw":
            if device == "cuda" and n >= BNB_PAGED_MIN_NUMEL:
                paged += 8 * n
            else:
                device_bytes += 8 * n
        elif optimizer == "adamw8bit":
            if n < BNB_8BIT_MIN_NUMEL:
                device_bytes += 8 * n
            else:
                device_bytes += 2 * n + 2 * 4 * math.ceil(n / BNB_8BIT_OPT_BLOCK)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
    return device_bytes, paged


@dataclass
class WeightCounts:
    total_params: int  # logical (unquantized) count
    trainable_params: int
    base_linear_params: int  # frozen linears of the blocks (the quantized ones with QLoRA)
    base_bytes: int
    other_bytes: int
    lora_bytes: int
    lora_numels: list[int]
    max_linear: int  # largest frozen block weight (elements): the dequant buffer
    flop_shapes: dict[str, Any]


def count_weights(model: Any, workload: Workload) -> WeightCounts:
    """Walk the meta model: which weights are quantized, which are LoRA, what the FLOP formula needs."""

    wb = workload.weight_bytes
    base_ids: set[int] = set()
    base_bytes = base_params = max_linear = 0
    for module in model.transformer.h.modules():
        if isinstance(module, LoRALinear):
            w = module.linear.weight
            base_ids.add(id(w))
            base_params += w.numel()
            base_bytes += quantized_bytes(w.shape[0], w.shape[1], workload.quantize, wb)
            max_linear = max(max_linear, w.numel())
            if module.linear.bias is not None:
                base_ids.add(id(module.linear.bias))
                base_params += module.linear.bias.numel()
                base_bytes += module.linear.bias.numel() * wb
    if workload.quantized_head:  # litgpt: the head is one more bitsandbytes linear (kept out of max_linear:
        head = model.lm_head.linear.weight  # its dequantized copy is counted with the loss, where it peaks)
        base_ids.add(id(head))
        base_bytes += quantized_bytes(head.shape[0], head.shape[1], workload.quantize, wb)
    total = trainable = other = lora = 0
    lora_numels = []
    for name, p in model.named_parameters():
        total += p.numel()
        if "lora_" in name:
            trainable += p.numel()
            lora += p.numel() * wb
            lora_numels.append(p.numel())
        elif id(p) not in base_ids:
            other += p.numel() * wb
    other += 2 * workload.max_seq_length * model.config.rope_n_elem * wb  # the RoPE cos/sin cache
    return WeightCounts(total, trainable, base_params, base_bytes, other, lora, lora_numels, max_linear,
                        linear_shapes(model))


# ---------------------------------------------------------------------------------- activations
def layer_activation_bytes(config: Any, w: Workload, first: bool = False) -> dict[str, float]:
    """Bytes autograd saves per token in one block, by tensor (no checkpointing)."""
    b, r = w.dtype_bytes, w.lora_r
    d, hh = config.n_embd, config.n_head * config.head_size
    kv = config.n_query_groups * config.head_size
    mask_b = 1 if w.device == "cuda" else b  # dropout mask: bool on CUDA, input dtype on CPU
    drop = w.lora_dropout > 0
    keeps = w.matmul_keeps_input  # bitsandbytes keeps each base linear's input on ctx (int8; 4-bit < 0.43.2)
    # layer 0's qkv input carries no gradient (frozen embeddings): a 4-bit matmul keeps nothing there
    keeps_qkv = w.quantize == "bnb.int8" or (keeps and not first)

    def linear_input(width: int, lora_branches: int, input_free: bool = False, kept: bool = keeps) -> float:
        """What a frozen linear's input costs: a LoRA branch saves it (or dropout's output + mask per
        branch); bitsandbytes may keep it too. ``input_free``: it shares storage with a tensor counted elsewhere."""
        own = 0 if input_free else width * b
        if lora_branches and drop:
            return lora_branches * width * (b + mask_b) + (own if kept else 0)
        return own if lora_branches or kept else 0

    def norm(saved_input_bytes: float) -> float:
        if config.norm_class_name == "RMSNorm":
            return 4 * d + 4  # fp32 copy of the input (or the fp32 input itself) + fp32 rsqrt
        return saved_input_bytes + 8  # LayerNorm: input + fp32 mean and rstd

    parts: dict[str, float] = {}
    if not first:
        parts["norm_1 input"] = norm(d * b)
    attn_grad = w.qkv_lora > 0 or not first  # layer 0's attention sees no grad unless LoRA is on q/k/v
    if w.qkv_lora or keeps_qkv:
        parts["qkv input (LoRA / bnb) + rank-r middle"] = (linear_input(d, int(w.qkv_lora > 0), kept=keeps_qkv)
                                                           + r * w.qkv_lora * b)
    if 0 < w.qkv_lora < 3:  # litgpt's zero_pad: index_copy_ keeps the LoRA output of the enabled q/k/v parts
        parts["qkv LoRA output (zero-padded)"] = (hh * w.lora_query + kv * w.lora_key + kv * w.lora_value) * b
    if attn_grad:
        if config.n_query_groups == config.n_head:  # MHA: v is a view that keeps the whole qkv output
            parts["q, k (RoPE'd) + qkv output (v view)"] = (2 * hh + hh + 2 * kv) * b
        else:  # GQA/MQA: litgpt repeats k and v to every head before attention
            parts["q (RoPE'd), k and v repeated to all heads"] = 3 * hh * b
        parts["attention output + fp32 logsumexp"] = hh * b + 4 * config.n_head
        # (sliding-window layers get the same packed mask, the window folded in: packing.sliding_windows)
        if w.packing and w.attention == "sdpa":  # a boolean mask reaches SDPA as a float (B, 1, T, T) bias
            parts["packed attention mask (float)"] = w.max_seq_length * b
    if w.lora_projection or keeps:
        shared = w.device == "cuda" and w.attention == "sdpa"  # flash/efficient output is already (B, T, h, hs)
        parts["proj input (LoRA / bnb) + middle"] = (linear_input(hh, int(w.lora_projection), input_free=shared)
                                                      + (r * b if w.lora_projection else 0))
    mlp_inputs = 2 if config.mlp_class_name in ("LLaMAMLP", "GemmaMLP") else 1
    if not config.parallel_residual:
        parts["norm_2 input"] = norm(d * b)
    elif config.norm_class_name != "RMSNorm":
        parts["norm_2 statistics"] = 8.0
    if w.lora_mlp or keeps:
        parts["MLP input (LoRA / bnb) + middles"] = (linear_input(d, mlp_inputs if w.lora_mlp else 0)
                                                      + (mlp_inputs * r * b if w.lora_mlp else 0))
    I = config.intermediate_size
    if mlp_inputs == 2:
        parts["MLP: fc_1, fc_2, activation outputs"] = 3 * I * b
    else:
        parts["MLP: fc output (GELU input)"] = I * b
    if w.lora_mlp or keeps:
        parts["MLP proj input (LoRA / bnb) + middle"] = (linear_input(I, int(w.lora_mlp))
                                                          + (r * b if w.lora_mlp else 0))
    return parts


def kept_input_bytes(config: Any, w: Workload, first: bool = False) -> float:
    """Per token and layer: the base linears' inputs bitsandbytes keeps on ctx (0 unless it keeps them).

    Kept as plain ctx attributes, not saved tensors, so backward does not free them: they live as long
    as the graph is referenced. qkv's input in layer 0 carries no gradient (4-bit keeps nothing there);
    the projection's input is the attention output itself on CUDA's SDPA; fc_1 and fc_2 share theirs.
    """
    if not w.matmul_keeps_input:
        return 0.0
    d, hh, I = config.n_embd, config.n_head * config.head_size, config.intermediate_size
    qkv = d if (w.quantize == "bnb.int8" or not first) else 0
    proj = 0 if (w.device == "cuda" and w.attention == "sdpa") else hh
    return (qkv + proj + d + I) * w.dtype_bytes


def checkpointed_layer_bytes(config: Any, w: Workload) -> dict[str, float]:
    """Per token and layer with activation checkpointing: the block input, plus what escapes the hooks."""
    parts = {"block input (checkpoint)": config.n_embd * w.dtype_bytes}
    if w.matmul_keeps_input:  # kept on ctx, outside autograd's saved tensors: the recompute does not free them
        hh, b = config.n_head * config.head_size, w.dtype_bytes
        # qkv input, proj input, MLP input (shared by fc_1/fc_2), MLP proj input
        parts["matmul inputs kept by bitsandbytes"] = (2 * config.n_embd + hh + config.intermediate_size) * b
    return parts


def block_backward_bytes(config: Any, w: Workload) -> float:
    """Per token: gradients alive at once inside one block's backward, above its saved tensors.

    MLP: the gradient of the proj input, then of both SwiGLU branches (the proj input itself is
    already freed when LoRA saved it); attention: dq, dk, dv, dout (+ flash's fp32 dq accumulator).
    """
    b, d, hh = w.dtype_bytes, config.n_embd, config.n_head * config.head_size
    I = config.intermediate_size
    mlp = ((3 if config.mlp_class_name in ("LLaMAMLP", "GemmaMLP") else 2) - int(w.lora_mlp)) * I * b
    attention = 4 * hh * b + (4 * hh if w.device == "cuda" else 0)
    return max(mlp, attention) + 2 * d * b  # + the stream's gradient in and out


# --------------------------------------------------------------------------------------- estimate
def estimate_memory(config: Any, w: Workload, weights: WeightCounts | None = None) -> MemoryEstimate:
    """Peak live bytes of one training step of ``config`` under ``w`` (see the module docstring)."""
    weights = weights or count_weights(meta_model(config, w), w)
    b, N, N_loss, L = w.dtype_bytes, w.tokens, w.loss_tokens, config.n_layer
    d, V = config.n_embd, config.padded_vocab_size
    states, paged = optimizer_state_bytes(weights.lora_numels, w.optimizer, w.weight_bytes, w.device)
    full = layer_activation_bytes(config, w)
    first = layer_activation_bytes(config, w, first=True)
    final_norm = 4 * d + 4 if config.norm_class_name == "RMSNorm" else d * b + 8
    loss_index = 8 * N_loss if w.loop == "onegpu" else 0  # hidden[keep] saves the int64 positions
    if w.activation_checkpointing:
        per_layer = checkpointed_layer_bytes(config, w)
        activations = N * (L * sum(per_layer.values()) + final_norm) + loss_index
        # the recomputed block's fp32 norm_1 input is the checkpointed input itself when training in fp32
        # the recomputed block saves what hooks see (int8's ctx-held inputs die with the recompute graph);
        # its fp32 norm_1 input is the checkpointed input itself when training in fp32
        hooked = layer_activation_bytes(config, replace(w, quantize=None))
        recompute = N * (sum(hooked.values()) - (4 * d if b == 4 else 0))
    else:
        per_layer = full
        activations = N * ((L - 1) * sum(full.values()) + sum(first.values()) + final_norm) + loss_index
        recompute = 0
    dequant = weights.max_linear * w.dequant_bytes if w.quantize else 0
    block = int(recompute + N * block_backward_bytes(config, w) + dequant)
    next_forward = 0
    if w.loop == "litgpt":
        loss = litgpt_loss_bytes(config, w)
        step = N * (2 * 8 + d * b)  # input_ids, targets + the final hidden states
        kept = N * ((L - 1) * kept_input_bytes(config, w) + kept_input_bytes(config, w, first=True))
        head = V * d * w.dequant_bytes if w.quantized_head else 0
        next_forward = int(kept + 2 * N * V * b + head)  # previous step's kept inputs + old and new logits
    else:
        loss_fwd = N_loss * V * (b + (4 if b != 4 else 0) + 4)  # logits, fp32 logits, log-softmax
        loss_bwd = N_loss * V * 12  # saved log-softmax + its gradient + the logits' gradient (fp32)
        loss = max(loss_fwd, loss_bwd)
        step = N * (4 * 8 + d * b)  # input_ids, labels, positions, segment ids + the loop's final hidden states
    if w.packing:
        rope = config.rope_n_elem
        step += 2 * N * rope * w.weight_bytes  # cos/sin gathered at the restarting positions
        if w.attention == "sdpa":
            step += w.micro_batch_size * w.max_seq_length**2  # the boolean block-diagonal mask
    return MemoryEstimate(
        base_weights=weights.base_bytes, other_weights=weights.other_bytes, lora_weights=weights.lora_bytes,
        lora_grads=weights.lora_bytes, optimizer_states=states, paged_optimizer_states=paged,
        activations=int(activations), step_tensors=int(step), loss_peak=int(loss),
        block_backward=block, cuda_context=CUDA_CONTEXT_BYTES if w.device == "cuda" else 0,
        next_forward=next_forward,
        per_token_layer={"without checkpointing": sum(full.values()),
                         "with checkpointing": sum(checkpointed_layer_bytes(config, w).values())},
        peak_moment=max((loss, "loss backward"), (block, "first block backward"), (next_forward, "next forward"))[1],
    )


def litgpt_loss_bytes(config: Any, w: Workload) -> int:
    """Loss-time bytes of litgpt's loop: the head in chunks of 128 positions and ``chunked_cross_entropy``
    on every position, in the training dtype. The loop keeps the logits, cross-entropy saves the
    log-softmax output, and backward differentiates one chunk at a time: 2 + 2 x 128/T copies of the
    logits (measured on CPU at T = 256, 512, 1024). A quantized head's backward dequantizes it
    (V x d x ``dequant_bytes``) while the logits and their gradient are alive."""
    logits = w.tokens * config.padded_vocab_size * w.dtype_bytes
    chunk = logits * min(1.0, LITGPT_HEAD_CHUNK / w.max_seq_length)
    head = config.padded_vocab_size * config.n_embd * w.dequant_bytes if w.quantized_head else 0
    return int(2 * logits + max(2 * chunk, head))


def largest_micro_batch(config: Any, w: Workload, memory_bytes: float, weights: WeightCounts,
                        limit: int = 256) -> int:
    """The largest micro-batch whose device peak fits ``memory_bytes`` (0 if not even 1 does)."""
    best = 0
    for mb in range(1, limit + 1):
        if estimate_memory(config, replace(w, micro_batch_size=mb), weights).device_peak > memory_bytes:
            break
        best = mb
    return best


def flops_per_token(weights: WeightCounts, w: Workload, example_tokens: int | None = None) -> float:
    """LoRA-correct useful FLOPs per real token (telemetry.step_flops), examples of ``example_tokens``."""

    L = example_tokens or w.max_seq_length
    n_examples = max(1, w.max_seq_length // L)
    tokens = n_examples * L
    loss_tokens = math.ceil(w.loss_token_fraction * tokens)
    return step_flops(weights.flop_shapes, tokens, loss_tokens, [L] * n_examples) / tokens


def recompute_factor(weights: WeightCounts) -> float:
    """Work per useful FLOP with activation checkpointing: the blocks' forward runs twice.

    With a frozen base, a block's forward is half its linear work (forward + input gradient, no
    weight gradient), so recomputation costs ~50% more, not the 33% of full fine-tuning.
    """
    s = weights.flop_shapes
    linear = 4 * s["frozen_in_out"] + 6 * s["lora_in_out"]
    forward = 2 * s["frozen_in_out"] + 2 * s["lora_in_out"]
    return (linear + forward) / linear
