"""Measure the live-tensor peak of one real training step: the quantity ``finetune/planning/memory.py`` predicts.

The step is the trainer's own: ``lora.build_model`` (litgpt LoRA GPT, bitsandbytes QLoRA swap),
``lora.make_optimizer``, ``packing.collate`` / ``forward_hidden`` / ``loss_sum``, backward,
optimizer step, ``zero_grad(set_to_none=True)``, on synthetic full rows (random token ids, the
last part of every example carrying the loss).

How the peak is measured:

* **CUDA**: ``torch.cuda.max_memory_allocated`` over the step (live tensor bytes; the caching
  allocator's reserved bytes are reported beside it).
* **CPU**: RSS would include the Python/torch runtime and the allocator's free lists, so it is not
  used. Instead, ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
  of torch's CPU allocator during the step with the allocator's running total of live bytes; the
  step's peak is the largest running total, added to the bytes that were live before the step and
  stay live through it (parameters, buffers, bitsandbytes quantization state, optimizer states:
  their unique storages, counted once). The running total is summed from the events' signed sizes;
  a block allocated before the profiler started would never be seen freed, so nothing else may be
  alive when the region starts. The step creates its batch inside the measured region, as the
  trainer does.

A warm-up step on a short batch runs first, so the optimizer states exist (steady state).

``measure_litgpt_loop`` measures litgpt's ``finetune_lora`` loop body the same way (on CPU), the
reference the ``loop="litgpt"`` model is set against before it meets litgpt's published numbers.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import lightning as L
import torch
from bitsandbytes.autograd import _functions as bnb_functions
from litgpt import Config
from litgpt.lora import GPT, Config as LoRAConfig, LoRALinear, mark_only_lora_as_trainable
from litgpt.utils import chunked_cross_entropy
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from onegpu.finetune.lora import build_model, make_optimizer
from onegpu.finetune.options import LoRAArgs
from onegpu.finetune.packing import (IGNORE_INDEX, Example, batch_to, collate, forward_hidden, loss_sum,
                                     use_flex_attention)
from onegpu.finetune.planning.memory import Workload, base_config_fields, estimate_memory
from onegpu.finetune.tiny import save_random_checkpoint


@dataclass
class StepMeasurement:
    peak_bytes: int  # live tensor bytes at the step's peak
    resident_bytes: int  # live before the step (weights, quantization state, optimizer states)
    reserved_bytes: int | None  # CUDA caching allocator's peak reserved bytes
    tokens: int
    loss_tokens: int
    step_s: float


def synthetic_batch(w: Workload, vocab_size: int, examples_per_row: int = 2, seed: int = 0,
                    tokens: int | None = None) -> dict[str, Any]:
    """Full rows of ``max_seq_length`` random tokens; in each example the last ``loss_token_fraction`` carries the loss."""

    rng = random.Random(seed)
    T = tokens or w.max_seq_length
    per_row = examples_per_row if w.packing else 1
    examples, rows = [], []
    for _ in range(w.micro_batch_size):
        row = []
        for k in range(per_row):
            n = T // per_row + (T % per_row if k == 0 else 0)
            ids = [rng.randrange(vocab_size) for _ in range(n)]
            prompt = n - math.ceil(w.loss_token_fraction * n)
            row.append(len(examples))
            examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
        rows.append(row)
    return collate(examples, rows, pad_id=0, pad_multiple=8 if w.device == "cuda" else 1)


def resident_tensor_bytes(model: torch.nn.Module, optimizer: Any = None) -> int:
    """Bytes of the unique storages held by the model and optimizer (incl. bitsandbytes quant state)."""
    storages: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # 4-bit: absmax, code, offset; double quantization nests a second state
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
        for name in ("CB", "SCB"):  # int8
            add(getattr(t, name, None))
    for module in model.modules():  # bnb int8 layers keep CB/SCB on their matmul state
        state = getattr(module, "state", None)
        for name in ("CB", "SCB"):
            add(getattr(state, name, None))
    for param_state in (optimizer.state.values() if optimizer is not None else ()):
        for value in param_state.values():
            add(value)
    return sum(storages.values())


class LiveTensorPeak:
    """Context manager: peak live tensor bytes of the code inside it (see the module docstring)."""

    def __init__(self, device: torch.device, resident_bytes: int = 0):
        self.device = device
        self.resident_bytes = resident_bytes
        self.peak_bytes = 0
        self.reserved_bytes: int | None = None

    def __enter__(self) -> "LiveTensorPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
            return
        self._prof.__exit__(*exc)

        # The running total of the allocations and frees in time order (signed sizes). The allocator's own
        # `total_allocated` field drifts once blocks allocated before the profiler started are freed.
        events, stack = [], list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
                events.append((node.start_time_ns, node.typed[1].alloc_size))
        live = top = 0
        for _, size in sorted(events):
            live += size
            top = max(top, live)
        self.peak_bytes = self.resident_bytes + top


class StepHarness:
    """The trainer's model and optimizer for ``w``, built once; one training step per call.

    ``step(shape)`` takes a Workload whose step-level fields (micro_batch_size, max_seq_length,
    packing, activation_checkpointing, loss_token_fraction) may differ from the build's; the
    model-level ones (LoRA, quantize, precision, optimizer) are the build's.
    """

    def __init__(self, checkpoint_dir: Path, w: Workload, longest: int | None = None, seed: int = 0):
        self.w, self.seed = w, seed
        self.fabric = L.Fabric(accelerator=w.device, devices=1, precision=w.precision)
        self.fabric.seed_everything(seed, verbose=False)
        lora = LoRAArgs(lora_r=w.lora_r, lora_alpha=2 * w.lora_r, lora_dropout=w.lora_dropout,
                        lora_query=w.lora_query, lora_key=w.lora_key, lora_value=w.lora_value,
                        lora_projection=w.lora_projection, lora_mlp=w.lora_mlp, lora_head=w.lora_head)
        self.longest = longest or w.max_seq_length
        model = build_model(self.fabric, checkpoint_dir, lora, w.quantize, self.longest, w.precision)
        self.model = self.fabric.setup_module(model)
        self.inner = self.model.module if hasattr(self.model, "module") else self.model
        self.flex = self.fabric.device.type == "cuda" and use_flex_attention(self.inner)
        params = [p for p in self.inner.parameters() if p.requires_grad]
        self.optimizer = self.fabric.setup_optimizers(make_optimizer(w.optimizer, params, 1e-4, 0.0))
        self.inner.train()

    def step(self, batch: dict[str, Any], activation_checkpointing: bool = False) -> float:
        """One optimizer step of onegpu's trainer on a collated batch; returns the loss."""

        tb = batch_to(batch, self.fabric.device)
        hidden = forward_hidden(self.inner, tb, flex=self.flex and batch["packed"],
                                activation_checkpointing=activation_checkpointing)
        loss, n = loss_sum(self.inner, hidden, tb["labels"])
        self.fabric.backward(loss / max(1, n))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()) / max(1, n)

    def warm_up(self) -> None:
        """A short step: optimizer states, lazy buffers and compiled kernels exist afterwards."""
        self.step(synthetic_batch(replace(self.w, micro_batch_size=1), self.inner.config.vocab_size,
                                  tokens=min(64, self.longest)))

    def measure(self, shape: Workload) -> StepMeasurement:
        resident = resident_tensor_bytes(self.inner, self.optimizer) if self.fabric.device.type == "cpu" else 0
        t0 = time.perf_counter()
        with LiveTensorPeak(self.fabric.device, resident) as tracker:
            batch = synthetic_batch(shape, self.inner.config.vocab_size, seed=self.seed)
            self.step(batch, shape.activation_checkpointing)
        return StepMeasurement(tracker.peak_bytes, resident, tracker.reserved_bytes, batch["n_tokens"],
                               batch["n_loss_tokens"], time.perf_counter() - t0)


def measure_steps(checkpoint_dir: Path, w: Workload, shapes: list[dict[str, Any]], seed: int = 0) -> list[StepMeasurement]:
    """Build once, warm up, then measure one step per shape (fields overriding ``w``)."""
    longest = max(s.get("max_seq_length", w.max_seq_length) for s in shapes)
    harness = StepHarness(checkpoint_dir, w, longest, seed)
    harness.warm_up()
    return [harness.measure(replace(w, **fields)) for fields in shapes]


def compare(checkpoint_dir: Path, w: Workload, shapes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Analytic vs measured peak for each shape: rows of the validation table."""

    config = Config.from_file(Path(checkpoint_dir) / "model_config.yaml")
    rows = []
    for fields, m in zip(shapes, measure_steps(checkpoint_dir, w, shapes)):
        shape = replace(w, **fields, loss_token_fraction=m.loss_tokens / m.tokens)
        analytic = estimate_memory(config, shape).tensor_peak
        rows.append({"model": config.name, "method": f"QLoRA {w.quantize}" if w.quantize else "LoRA",
                     "lora": lora_label(w), "micro_batch_size": shape.micro_batch_size,
                     "max_seq_length": shape.max_seq_length, "packing": shape.packing,
                     "activation_checkpointing": shape.activation_checkpointing,
                     "analytic_bytes": analytic, "measured_bytes": m.peak_bytes,
                     "error": analytic / m.peak_bytes - 1, "step_s": m.step_s})
    return rows


def lora_label(w: Workload) -> str:
    layers = "".join(c for c, on in (("q", w.lora_query), ("k", w.lora_key), ("v", w.lora_value),
                                     ("o", w.lora_projection), ("m", w.lora_mlp)) if on)
    return f"r={w.lora_r} {layers}" + (f" dropout {w.lora_dropout}" if w.lora_dropout else "")


def tiny_llama_config(vocab: int = 8192, n_layer: int = 4, n_query_groups: int = 2) -> Any:
    """A small random-init LLaMA-shaped litgpt config (the validation's second model)."""

    return Config(name="tiny-llama", block_size=1024, vocab_size=vocab, padded_vocab_size=vocab, n_layer=n_layer,
                  n_head=4, n_query_groups=n_query_groups, n_embd=128, head_size=32, rotary_percentage=1.0,
                  parallel_residual=False, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                  intermediate_size=352, rope_base=10000)


def validation_cases(work: Path, bundled_checkpoint: Path) -> list[tuple[Path, Workload, list[dict[str, Any]]]]:
    """(checkpoint, build workload, step shapes) of the analytic-vs-measured validation (CPU, fp32)."""

    tiny = save_random_checkpoint(Path(work) / "tiny-llama", tiny_llama_config())
    cpu = {"precision": "32-true", "device": "cpu", "loss_token_fraction": 0.5}
    return [
        (tiny, Workload(lora_r=8, lora_dropout=0.0, **cpu),
         [{"micro_batch_size": 2, "max_seq_length": 256},
          {"micro_batch_size": 1, "max_seq_length": 512, "activation_checkpointing": True},
          {"micro_batch_size": 4, "max_seq_length": 128, "packing": False}]),
        (tiny, Workload(lora_r=16, lora_dropout=0.05, quantize="bnb.nf4", lora_key=True, lora_projection=True,
                        lora_mlp=True, **cpu),
         [{"micro_batch_size": 2, "max_seq_length": 256},
          {"micro_batch_size": 2, "max_seq_length": 256, "activation_checkpointing": True}]),
        (Path(bundled_checkpoint), Workload(lora_r=8, lora_dropout=0.0, **cpu),
         [{"micro_batch_size": 1, "max_seq_length": 128}, {"micro_batch_size": 2, "max_seq_length": 128,
                                                            "activation_checkpointing": True}]),
        (Path(bundled_checkpoint), Workload(lora_r=16, lora_dropout=0.05, quantize="bnb.nf4", lora_mlp=True, **cpu),
         [{"micro_batch_size": 1, "max_seq_length": 128, "activation_checkpointing": True}]),
    ]


# ------------------------------------------------------------------------------- litgpt's loop
@contextlib.contextmanager
def bnb_keeping_4bit_input() -> Iterator[None]:
    """bitsandbytes before 0.43.2: ``MatMul4Bit.forward`` kept its input on ctx (``ctx.tensors = (A, B)``;
    PR #1270 made it ``(None, B)``). Restores that one line for the block, to measure what it cost."""

    current = bnb_functions.MatMul4Bit.forward

    def forward(ctx, A, B, out=None, bias=None, quant_state=None):
        output = current(ctx, A, B, out, bias, quant_state)
        if any(ctx.needs_input_grad[:2]):
            ctx.tensors = (A, ctx.tensors[1])
        return output

    bnb_functions.MatMul4Bit.forward = staticmethod(forward)
    try:
        yield
    finally:
        bnb_functions.MatMul4Bit.forward = current


def quantize_like_lightning(model: torch.nn.Module, mode: str) -> None:
    """What Lightning's ``BitsandbytesPrecision`` does for litgpt: every ``nn.Linear`` (the LM head too)
    becomes a 4-bit layer quantized from an fp16 copy of the weight (``_Linear4bit.quantize``)."""

    quant_type, double = ("nf4" if "nf4" in mode else "fp4"), mode.endswith("-dq")
    for module in model.modules():
        if isinstance(module, LoRALinear):
            lin = module.linear
            layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=lin.weight.dtype, quant_type=quant_type, compress_statistics=double)
            layer.weight = bnb.nn.Params4bit(lin.weight.data.half(), requires_grad=False, quant_type=quant_type,
                                             compress_statistics=double)
            module.linear = layer.to(lin.weight.device)


def measure_litgpt_loop(config: Any, w: Workload, iterations: int = 3, seed: int = 0) -> int:
    """Peak live tensor bytes of litgpt ``finetune_lora``'s loop body on CPU, ``iterations`` full steps in a row.

    The body as litgpt writes it: ``logits = model(x, lm_head_chunk_size=128)``, the last chunk
    shifted, ``loss = chunked_cross_entropy(...)``, backward, AdamW step; ``logits`` and ``loss`` are
    rebound only when the next step computes them, as in litgpt. Rows are full (padded to the same
    length), the loss on every position; QLoRA per :func:`quantize_like_lightning`, with the
    bitsandbytes behaviour of ``w.bnb_version``.
    """
    torch.manual_seed(seed)
    dtype = {"32-true": torch.float32, "bf16-true": torch.bfloat16}[w.precision]
    lora = {"lora_r": w.lora_r, "lora_alpha": 2 * w.lora_r, "lora_dropout": w.lora_dropout, "lora_query": w.lora_query,
            "lora_key": w.lora_key, "lora_value": w.lora_value, "lora_projection": w.lora_projection,
            "lora_mlp": w.lora_mlp, "lora_head": w.lora_head}

    model = GPT(LoRAConfig(**{**base_config_fields(config), **lora})).to(dtype)
    mark_only_lora_as_trainable(model)
    if w.quantize:
        quantize_like_lightning(model, w.quantize)
    model.max_seq_length = w.max_seq_length
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    keeping = bnb_keeping_4bit_input() if w.matmul_keeps_input and w.quantize != "bnb.int8" else contextlib.nullcontext()
    logits = loss = None

    def step() -> None:
        nonlocal logits, loss
        ids = torch.randint(0, config.padded_vocab_size, (w.micro_batch_size, w.max_seq_length), generator=generator)
        logits = model(ids, lm_head_chunk_size=128)
        logits[-1] = logits[-1][..., :-1, :]
        loss = chunked_cross_entropy(logits, ids[..., 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    with keeping:
        step()  # optimizer states exist from here on
        logits = loss = None
        with LiveTensorPeak(torch.device("cpu"), resident_tensor_bytes(model, optimizer)) as tracker:
            for _ in range(iterations):
                step()
    return tracker.peak_bytes
