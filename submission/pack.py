"""``onegpu submission pack``: a self-contained, reproducible submission folder for one track.

    onegpu submission pack --model out/final --track rtx4090-24gb --out runs/submission

What it writes (the organizers run `docker build` in it, then `docker run --gpus all -p 8080:80`):

    Dockerfile        the repo's (Dockerfile; --engine vllm: Dockerfile.vllm, on vLLM's image), with the
                      model step for the weights route and the server options baked in (ARG defaults)
    model/            --weights embed: the merged checkpoint's serving files (weights, config,
                      tokenizer, prompt_style.yaml, onegpu_model.json); hub:/wandb: routes fetch
                      them at build instead (submission/weights.py)
    requirements.txt  exact pins of everything the server imports (torch comes from the base image)
    server.yaml       the server config, usable as `onegpu serve --config server.yaml` outside Docker
    README.md         how to build, run and probe it; the memory estimate
    pack.json         the same facts, machine-readable (source, route, track, estimate, verification)
    onegpu/ data/ ... the kit's source, so `docker build` needs nothing else
    ../<out>.zip      a zip of the folder (--zip false skips it)

Before writing anything, the weights route is checked (a hub revision pinned) and the inference
memory is checked against the track's GPU; a config that does not fit is refused with the numbers.
The onegpu engine needs weights at the chosen dtype/quantization + its KV cache (max_batch_size rows
x max_seq_length positions) + the prefix cache + a fixed overhead. vLLM takes
``gpu_memory_utilization`` of the card and gives its paged KV cache what the weights and the
overhead leave: that share must hold at least one max_seq_length sequence (vLLM refuses to start
otherwise), and holds max_batch_size of them for HELM's parallel requests to run without waiting. After writing, the packed server
config is started outside Docker (on the embedded model, else the local source, else the bundled
model) and sent the organizers' health request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from onegpu.contracts import TRACKS, EngineName, Quantize, Track
from onegpu.errors import UserError
from onegpu.submission.postprocess import parse_rules
from onegpu.submission.server import check_engine_options
from onegpu.submission.weights import parse_route


def check_options(track: str | None, prompt_style: str, postprocess: str | None, max_batch_size: int,
                  max_seq_length: int, prefix_cache_mb: int, engine: str = "onegpu", quantize: str | None = None,
                  gpu_memory_utilization: float = 0.9) -> list[str]:
    """UserError for a missing track, impossible sizes or unknown names; returns the output rules (the prompt style is checked by the engine)."""
    check_engine_options(engine, quantize, None)
    if not 0 < gpu_memory_utilization < 1:
        raise UserError(f"gpu_memory_utilization={gpu_memory_utilization}", fix="use a fraction below 1, e.g. 0.9")

    if track not in TRACKS:
        raise UserError("no --track given" if track is None else f"unknown track {track!r}",
                        fix=f"pass --track with one of: {', '.join(TRACKS)}")
    if max_batch_size < 1 or max_seq_length < 2 or prefix_cache_mb < 0:
        raise UserError(f"max_batch_size={max_batch_size}, max_seq_length={max_seq_length}, "
                        f"prefix_cache_mb={prefix_cache_mb}", fix="use max_batch_size >= 1, max_seq_length >= 2, "
                                                                  "prefix_cache_mb >= 0")
    return parse_rules(postprocess)


def pack(model: str | None = None, track: Track | None = None, out: Path = Path("runs/submission"),
         weights: str | None = None, base: str | None = None,
         prompt_style: str = "auto", postprocess: str | None = None,
         dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto", quantize: Quantize | None = None,
         max_batch_size: int = 16, max_seq_length: int = 2048, prefix_cache_mb: int = 1024,
         engine: EngineName = "onegpu", gpu_memory_utilization: float = 0.9,
         verify: bool = True, zip: bool = True, force: bool = False) -> dict:
    """Write a self-contained submission folder (Dockerfile, model or its fetch step, pins, server config, README).

    Refuses, with the numbers, a config whose estimated inference memory exceeds the track's GPU, and
    a weights route that cannot work, before writing anything. Then serves the packed config outside
    Docker and sends the organizers' health request.

    Args:
        model: the model source: a local checkpoint dir (a fine-tune's out/final or an adapter dir),
            a W&B model artifact (entity/project/name:alias) or a hub id (org/name). Optional when
            --weights names a hub or W&B model.
        track: the challenge track whose GPU the estimate is checked against: a100-40gb or rtx4090-24gb.
        out: the folder to write (the zip goes beside it as OUT.zip). It appears whole or not at all; a
            re-run with the same inputs and options reuses a finished one (by its pack.json).
        weights: how the weights reach the image: embed (copied into the folder; the default for a
            local checkpoint), hub:ORG/NAME[@REVISION] (fetched at build, revision pinned; the default
            for a hub id) or wandb:ENTITY/PROJECT/NAME:VERSION (fetched at build; the default for a
            W&B artifact). `docker run` needs nothing either way.
        base: for a wandb: route whose artifact is adapter-only: hub:ORG/NAME[@REVISION] of the base
            model it is merged into at build.
        prompt_style: raw, auto (the checkpoint's prompt_style.yaml, else raw) or a litgpt style name.
        postprocess: comma-separated output rules (drop_answer_prefix, mc_letter, cut_blank_line, strip);
            off by default.
        dtype: weights/KV dtype in the image (auto = bfloat16 on both tracks' GPUs).
        quantize: bitsandbytes weight quantization for the image (bnb.nf4, bnb.nf4-dq, bnb.fp4,
            bnb.fp4-dq, bnb.int8).
        max_batch_size: sequences the server decodes together (KV-cache rows; HELM's parallel requests
            beyond it wait in the queue).
        max_seq_length: context served; HELM's neurips/local deployment uses 2048.
        prefix_cache_mb: memory for cached few-shot prefixes (part of the estimate).
        engine: onegpu (the kit's engine on a CUDA PyTorch base) or vllm (`onegpu serve --engine vllm` on
            vLLM's image; its memory plan in vLLM's terms).
        gpu_memory_utilization: --engine vllm: the share of the GPU vLLM takes (weights, activations,
            its paged KV cache).
        verify: start the packed config outside Docker and send the health request (on the embedded
            model, else the source if it is a local checkpoint, else the bundled model).
        zip: also write OUT.zip (with embedded weights it is as large as they are).
        force: overwrite a non-empty OUT.
    """
    # flags rather than positionals (`--model X --track Y`), as the submission docs write them
    if weights is not None and not model and parse_route(weights).kind != "embed":
        model = parse_route(weights).name  # (a malformed route fails here, before anything is resolved)
    if not model:
        raise UserError("no --model given", fix="pass --model DIR|entity/project/name:alias|org/name, or --weights "
                                                "hub:ORG/NAME[@REVISION] / wandb:ENTITY/PROJECT/NAME:VERSION")
    rules = check_options(track, prompt_style, postprocess, max_batch_size, max_seq_length, prefix_cache_mb, engine,
                          quantize, gpu_memory_utilization)
    if weights is not None:
        parse_route(weights)
    options = {"track": track, "prompt_style": prompt_style, "postprocess": ",".join(rules) or None, "dtype": dtype,
               "quantize": quantize, "max_batch_size": max_batch_size, "max_seq_length": max_seq_length,
               "prefix_cache_mb": prefix_cache_mb, "engine": engine, "gpu_memory_utilization": gpu_memory_utilization}
    from onegpu.submission import bundle  # the engine: torch and litgpt load here, not for --help

    return bundle.write_submission(model, Path(out), weights, base, options, verify, zip, force)
