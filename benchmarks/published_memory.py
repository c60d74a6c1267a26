"""The analytic memory model (finetune/planning/memory.py) against litgpt's published peak-memory measurements.

litgpt published the ``torch.cuda.max_memory_allocated()`` of ``litgpt finetune_lora`` runs (in GB of
1e9 bytes) in two tables. Each row is planned with the model's ``loop="litgpt"`` terms and the
bitsandbytes of the measurement (both before 0.43.2, whose 4-bit matmul kept its input on ctx), so
every number below is a named term, not a correction factor:

* **A**: ``tutorials/resource-tables.md`` (updated 2023-10-20; lit-gpt commit 8641822, one
  A100-SXM4-40GB, PyTorch 2.1.0, bitsandbytes 0.41.1). Alpaca, loss on every token, LoRA r=8 on
  query and value (dropout 0.05), rows padded to the longest example of the micro-batch; the loop
  starts with the longest example (1,304 tokens for Llama 2). QLoRA with bitsandbytes' PagedAdamW.
* **B**: ``config_hub/finetune/README.md`` (QLoRA rows updated 2024-07-22, litgpt e5493986, which pins
  bitsandbytes 0.42.0; one A10G). Alpaca2k, max_seq_length 512, LoRA r=32 on query and value
  (dropout 0.05), the config files' micro-batch sizes. QLoRA with PagedAdamW (litgpt swaps it in).

"steady state" is a step whose previous step was as long (bitsandbytes' kept inputs and the old
logits are alive at the end of its forward: the planner's worst case); "first step" has no previous
step alive (table A's loop puts its longest example first). Prints the table of benchmarks/RESULTS.md.

    python benchmarks/published_memory.py
"""

from __future__ import annotations

from dataclasses import dataclass

BNB_NOW = "0.50.2"  # what this kit installs
TABLE_A = "litgpt tutorials/resource-tables.md (A100-40GB, bitsandbytes 0.41.1)"
TABLE_B = "litgpt config_hub/finetune/README.md (A10G, bitsandbytes 0.42.0)"


@dataclass(frozen=True)
class Published:
    table: str
    model: str  # litgpt config name
    quantize: str | None
    micro_batch_size: int
    tokens_per_row: int  # the longest row: what the peak step holds
    lora_r: int
    optimizer: str
    bnb_version: str
    peak_gb: float  # torch.cuda.max_memory_allocated() / 1e9, as published


def a(model: str, quantize: str | None, micro_batch_size: int, gb: float) -> Published:
    return Published(TABLE_A, model, quantize, micro_batch_size, 1304, 8,
                     "paged_adamw" if quantize else "adamw", "0.41.1", gb)


def b(model: str, quantize: str | None, micro_batch_size: int, gb: float) -> Published:
    return Published(TABLE_B, model, quantize, micro_batch_size, 512, 32,
                     "paged_adamw" if quantize else "adamw", "0.42.0", gb)


PUBLISHED = [
    a("Llama-2-7b-hf", None, 1, 21.30), a("Llama-2-7b-hf", "bnb.nf4", 1, 14.14),
    a("Llama-2-7b-hf", "bnb.nf4-dq", 1, 13.84), a("Llama-2-7b-hf", None, 2, 29.07),
    a("Llama-2-13b-hf", None, 1, 38.12), a("Llama-2-13b-hf", "bnb.nf4", 1, 23.14),
    a("Llama-2-13b-hf", "bnb.nf4-dq", 1, 22.55),
    b("Llama-2-7b-hf", None, 2, 19.77), b("Llama-2-7b-hf", "bnb.nf4", 2, 13.68),
    b("Mistral-7B-v0.1", None, 2, 20.66), b("Mistral-7B-v0.1", "bnb.nf4", 2, 14.29),
    b("Llama-3-8B", None, 1, 19.73), b("Llama-3-8B", "bnb.nf4", 2, 17.41),
]


def compare() -> list[dict]:
    """Each published row with the model's steady-state and first-step peaks and their terms (bytes)."""
    from dataclasses import replace

    from litgpt.config import Config

    from onegpu.finetune.planning.memory import Workload, estimate_memory

    rows = []
    for p in PUBLISHED:
        config = Config.from_name(p.model)
        w = Workload(precision="bf16-true", quantize=p.quantize, lora_r=p.lora_r, lora_dropout=0.05,
                     max_seq_length=p.tokens_per_row, micro_batch_size=p.micro_batch_size, packing=False,
                     optimizer=p.optimizer, loop="litgpt", bnb_version=p.bnb_version)
        e = estimate_memory(config, w)
        kept = e.activations - estimate_memory(config, replace(w, bnb_version="0.43.2")).activations
        terms = {"frozen linears (4-bit: the LM head too)": e.base_weights, "embeddings, norms (+ head unquantized)":
                 e.other_weights, "LoRA weights + gradients": e.lora_weights + e.lora_grads,
                 "optimizer states on the card": e.optimizer_states,
                 "activations autograd saves": e.activations - kept, "inputs bitsandbytes < 0.43.2 keeps on ctx": kept,
                 "batch + final hidden states": e.step_tensors,
                 "loss moment: logits kept, log-softmax, one chunk's gradients (or the head dequantized)": e.loss_peak,
                 "next forward: previous step's kept inputs + old and new logits + head dequantized": e.next_forward,
                 "one block's backward": e.block_backward}
        own = estimate_memory(config, replace(w, loop="onegpu", bnb_version=BNB_NOW))  # this trainer's terms only
        rows.append({"published": p, "steady_state": e.tensor_peak, "first_step": e.first_step_peak,
                     "without_litgpt_terms": own.tensor_peak,
                     "error": e.tensor_peak / (p.peak_gb * 1e9) - 1, "peak_moment": e.peak_moment, "terms": terms})
    return rows


def main() -> None:
    print("| table | model | method | micro-batch x tokens | plan, steady state (GB) | first step (GB) | "
          "published (GB) | error | peak moment | without litgpt's loop and old bitsandbytes (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = compare()
    for r in rows:
        p = r["published"]
        method = f"QLoRA {p.quantize}" if p.quantize else "LoRA bf16"
        print(f"| {'A' if p.table == TABLE_A else 'B'} | {p.model} | {method} | {p.micro_batch_size} x "
              f"{p.tokens_per_row} | {r['steady_state'] / 1e9:.2f} | {r['first_step'] / 1e9:.2f} | {p.peak_gb:.2f} | "
              f"{r['error']:+.1%} | {r['peak_moment']} | {r['without_litgpt_terms'] / 1e9:.2f} "
              f"({r['without_litgpt_terms'] / (p.peak_gb * 1e9) - 1:+.1%}) |")
    print(f"\nA = {TABLE_A}\nB = {TABLE_B}\n\nTerms of the QLoRA rows (GB):\n")
    quantized = [r for r in rows if r["published"].quantize]
    names = list(quantized[0]["terms"])  # the peak adds the first five, the batch, and the largest moment
    print("| term | " + " | ".join(f"{r['published'].model} {r['published'].quantize} ({'A' if r['published'].table == TABLE_A else 'B'})"
                                   for r in quantized) + " |")
    print("|---|" + "---|" * len(quantized))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r['terms'].get(name, 0) / 1e9:.2f}" for r in quantized) + " |")


if __name__ == "__main__":
    main()
