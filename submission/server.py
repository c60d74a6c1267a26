"""``onegpu serve``: the challenge's HTTP API (/process, /tokenize, /decode) over a litgpt checkpoint.

The contract is ../shared/reference/challenge-api.md; the decisions it leaves open are made here
and documented in docs/serving.md:

* /tokenize returns the ids the model is fed, including BOS when the tokenizer prepends one (HELM
  counts prompt length with /tokenize); /decode drops that leading BOS, so ids round-trip.
* Over-long prompts are left-truncated (BOS kept) to fit ``max_seq_length - max_new_tokens``;
  ``max_new_tokens >= max_seq_length - 1`` is a 422.
* ``echo_prompt`` scores the prompt as sent (no template); the first returned prompt token has
  logprob 0.0 and an empty top_logprob when there is no BOS to condition on.
* A prompt template (``--prompt_style``) wraps the prompt; the response never contains it.
  ``effective_prompt`` is the one place that happens; ``POST /effective_prompt`` shows its result.
* ``--postprocess`` rules (submission/postprocess.py) narrow completions; tokens follow the text.

Handlers are ``async`` and only tokenize and wait: the engine batches generation, so dozens of
concurrent HELM requests share each forward pass. Two engines run under the same contract code
(submission/generation.py): ``--engine onegpu`` (engine.py: continuous batching, chunked prefill,
prefix cache on litgpt modules) and ``--engine vllm`` (vllm_engine.py: vLLM in its own env).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from typing import Annotated

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field

from onegpu.contracts import EngineName, Quantize
from onegpu.errors import UserError
from onegpu.model import prepare
from onegpu.submission import postprocess as post
from onegpu.submission import schemas
from onegpu.submission.generation import GenRequest, RequestRejected, shape_response
from onegpu.submission.launch import free_port
from onegpu.submission.postprocess import parse_rules
from onegpu.submission.schemas import (DecodeResponse, EffectivePromptRequest, EffectivePromptResponse, ErrorResponse,
                                       ProcessResponse, TokenizeRequest, TokenizeResponse)
from onegpu.tracking import download_wandb_artifact


def _validation_message(errors: list) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def effective_prompt(engine, prompt: str, echo: bool = False) -> str:
    """The text the model is fed for ``prompt``: the checkpoint's template applied (not for echo scoring).

    Same call as the training side (``data.schema.render`` -> ``PromptStyle.apply(instruction)``),
    so a fine-tuned model sees its training format.
    """
    if engine.prompt_style is None or echo:
        return prompt
    return engine.prompt_style.apply(prompt)


# Every POST route's error responses, in the OpenAPI schema.
ERROR_RESPONSES = {400: {"model": ErrorResponse, "description": "the body is not UTF-8 JSON"},
                   422: {"model": ErrorResponse, "description": "invalid request (the message says what and why)"}}


def create_app(engine, postprocess: list[str] | None = None):
    """The FastAPI app serving ``engine`` (a :class:`submission.generation.ServingEngine`).

    ``postprocess``: rule names from :mod:`submission.postprocess`, applied to non-echo completions.
    """
    rules = parse_rules(postprocess)
    app = FastAPI(title="onegpu submission server",
                  description="NeurIPS LLM Efficiency Challenge API: /process, /tokenize, /decode",
                  version="1")
    _add_error_handlers(app)
    _add_health(app, engine, rules)
    _add_process(app, engine, rules)
    _add_effective_prompt(app, engine)
    _add_tokenize(app, engine)
    _add_decode(app, engine)
    return JSONBodies(app)


def _add_error_handlers(app) -> None:
    """422s and 400s with a ``detail`` message that says what is wrong."""
    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        return _reject(_validation_message(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException):
        detail = exc.detail
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "the request body is not valid UTF-8 JSON; send a JSON object such as {\"prompt\": \"...\"}"
        return JSONResponse(status_code=exc.status_code, content={"detail": detail}, headers=exc.headers)


def _reject(message: str):
    return JSONResponse(status_code=422, content={"detail": message})


def _add_health(app, engine, rules: list[str]) -> None:
    @app.get("/health")
    async def health():
        """200 once the model is loaded (the server listens only after that); 503 if the engine died."""
        try:
            facts = engine.health()
        except RuntimeError as err:
            return JSONResponse(status_code=503, content={"status": "error", "detail": str(err)})
        return {"status": "ok", "engine": engine.name, **facts, "prompt_style": engine.prompt_style_name,
                "postprocess": rules}


def _add_process(app, engine, rules: list[str]) -> None:
    # The schema states this model's and engine's real limits, so clients (and the fuzzer) see them up front.
    class ProcessRequest(schemas.ProcessRequest):
        temperature: float = Field(0.8, ge=0.0, le=engine.max_temperature,
                                   description=f"<= 1e-5 means greedy (HELM sends 1e-7); at most {engine.max_temperature:g} "
                                               f"on the {engine.name} engine")
        max_new_tokens: int = Field(50, ge=0, le=max(0, engine.max_seq_length - 2),
                                    description="upper bound on completion tokens (0 with echo_prompt scores the "
                                                f"prompt); at most {engine.max_seq_length - 2} for this model")

    async def process(body: ProcessRequest):
        start = time.perf_counter()
        echo = bool(body.echo_prompt)
        ids = engine.codec.encode(effective_prompt(engine, body.prompt, echo))
        limit = engine.max_seq_length
        if body.max_new_tokens > limit - 2:
            return _reject(f"max_new_tokens={body.max_new_tokens} leaves no room for a prompt in this model's "
                           f"context of {limit} tokens; ask for at most {limit - 2}")
        request = GenRequest(prompt_ids=_fit_context(engine, ids, body.max_new_tokens),
                             max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                             top_k=body.top_k, top_p=body.top_p, seed=body.seed,
                             stop_sequences=list(body.stop_sequences or []), echo=echo,
                             top_logprobs=body.top_k_per_token)
        try:
            generation = await asyncio.wrap_future(engine.submit(request))
        except RequestRejected as err:
            return _reject(str(err))
        result = shape_response(engine.codec, request, generation)
        if rules and not echo:
            result = post.apply(result, rules, body.prompt)
        return {"text": result["text"], "tokens": result["tokens"], "logprob": result["logprob"],
                "request_time": time.perf_counter() - start}

    process.__annotations__["body"] = ProcessRequest  # a local class: FastAPI cannot resolve the string annotation
    app.post("/process", response_model=ProcessResponse, responses=ERROR_RESPONSES)(process)


def _fit_context(engine, ids: list[int], max_new_tokens: int) -> list[int]:
    """``ids`` left-truncated to fit ``max_seq_length - max_new_tokens``: the end (the question) and BOS kept."""
    budget = engine.max_seq_length - max_new_tokens
    if len(ids) <= budget:
        return ids
    keep_bos = engine.codec.starts_with_bos(ids)
    ids = ids[:1] + ids[len(ids) - (budget - 1):] if keep_bos else ids[len(ids) - budget:]
    print(f"[onegpu serve] prompt left-truncated to {len(ids)} tokens to fit max_new_tokens="
          f"{max_new_tokens} in {engine.max_seq_length}", file=sys.stderr)
    return ids


def _add_effective_prompt(app, engine) -> None:
    @app.post("/effective_prompt", response_model=EffectivePromptResponse, responses=ERROR_RESPONSES)
    async def show_effective_prompt(body: EffectivePromptRequest):
        """Debug: the text and token ids /process would feed the model for this prompt."""
        text = effective_prompt(engine, body.prompt, bool(body.echo_prompt))
        return {"prompt": text, "tokens": engine.codec.encode(text), "prompt_style": engine.prompt_style_name}


def _add_tokenize(app, engine) -> None:
    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest):
        start = time.perf_counter()
        ids = engine.codec.encode(body.text)
        if body.truncation:
            ids = ids[: body.max_length]
        return {"tokens": ids, "request_time": time.perf_counter() - start}


def _add_decode(app, engine) -> None:
    tokenizer_vocab = engine.codec.vocab_limit()

    class DecodeRequest(schemas.DecodeRequest):
        tokens: list[Annotated[int, Field(ge=0, lt=tokenizer_vocab)]] = Field(
            ..., max_length=1_000_000, description=f"token ids, each in [0, {tokenizer_vocab})")

    async def decode(body: DecodeRequest):
        start = time.perf_counter()
        bad = [t for t in body.tokens if not 0 <= t < tokenizer_vocab]
        if bad:
            return _reject(f"token ids {bad[:5]} are not in this tokenizer's vocabulary [0, {tokenizer_vocab})")
        return {"text": engine.codec.decode(body.tokens), "request_time": time.perf_counter() - start}

    decode.__annotations__["body"] = DecodeRequest  # a local class, as for /process
    app.post("/decode", response_model=DecodeResponse, responses=ERROR_RESPONSES)(decode)


class JSONBodies:
    """ASGI wrapper: POST bodies are JSON whatever Content-Type says.

    ``curl -d '{...}'`` sends ``application/x-www-form-urlencoded``; the organizers' health check
    and hand-written clients should not get a 422 for a missing header.
    """

    def __init__(self, app):
        self.app = app

    def __getattr__(self, name):  # expose the FastAPI app's attributes (openapi(), routes...)
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


# Environment fallbacks, so the Dockerfile's CMD stays one fixed exec-form command and the model
# source comes from build args / `docker run -e` (see Dockerfile).
ENV_DEFAULTS = {"checkpoint": "ONEGPU_CHECKPOINT", "wandb_artifact": "ONEGPU_WANDB_ARTIFACT",
                "hub_model": "ONEGPU_HUB_MODEL", "base_checkpoint": "ONEGPU_BASE_CHECKPOINT",
                "prompt_style": "ONEGPU_PROMPT_STYLE", "quantize": "ONEGPU_QUANTIZE",
                "max_batch_size": "ONEGPU_MAX_BATCH_SIZE", "postprocess": "ONEGPU_POSTPROCESS",
                "dtype": "ONEGPU_DTYPE", "engine": "ONEGPU_ENGINE",
                "gpu_memory_utilization": "ONEGPU_GPU_MEMORY_UTILIZATION"}
ENGINES = ("onegpu", "vllm")


def serve(checkpoint: Path | None = None, host: str = "127.0.0.1", port: int = 8080, device: str = "auto",
          dtype: str | None = None, prompt_style: str | None = None, postprocess: str | None = None,
          max_batch_size: int | None = None, max_seq_length: int = 2048, quantize: Quantize | None = None,
          wandb_artifact: str | None = None, hub_model: str | None = None, base_checkpoint: Path | None = None,
          num_threads: int | None = None, prefix_cache_mb: int = 1024, prefill_chunk: int = 256,
          engine: EngineName | None = None, gpu_memory_utilization: float | None = None,
          vllm_args: dict | None = None, access_log: bool = False) -> None:
    """Serve a checkpoint over the challenge's HTTP API until interrupted.

    Exactly one model source: ``--checkpoint`` (a litgpt checkpoint dir, or a LoRA adapter dir
    whose hyperparameters.yaml names its base), ``--wandb_artifact`` or ``--hub_model``. Options
    left unset fall back to environment variables, which is how the Docker image is configured:
    the source from ONEGPU_WANDB_ARTIFACT, else ONEGPU_HUB_MODEL, else ONEGPU_CHECKPOINT (first set
    wins); ONEGPU_BASE_CHECKPOINT, ONEGPU_PROMPT_STYLE, ONEGPU_POSTPROCESS, ONEGPU_DTYPE,
    ONEGPU_QUANTIZE, ONEGPU_MAX_BATCH_SIZE, ONEGPU_ENGINE, ONEGPU_GPU_MEMORY_UTILIZATION.

    Args:
        checkpoint: litgpt checkpoint dir (e.g. what `onegpu model prepare` printed, or a fine-tune's
            out/final), or an adapter-only dir (lit_model.pth.lora + hyperparameters.yaml).
        host: interface to bind (0.0.0.0 inside Docker).
        port: TCP port (80 inside Docker).
        device: auto (cuda if visible, else cpu), cpu, cuda or cuda:N.
        dtype: auto (the default; bfloat16 on GPUs that support it, float16 on older ones, float32 on CPU),
            float32, bfloat16 or float16.
        prompt_style: raw (prompt as sent), auto (the checkpoint's prompt_style.yaml if present,
            else raw with a warning; the default) or a litgpt prompt-style name (alpaca, smollm2, ...).
        postprocess: comma-separated output rules, off by default: drop_answer_prefix, mc_letter,
            cut_blank_line, strip (see submission/postprocess.py and docs/serving.md for the HELM metric
            each affects). Returned tokens/logprob are narrowed with the text.
        max_batch_size: sequences decoded together (KV-cache rows; default 16); more uses more memory.
        max_seq_length: context length served (prompt + completion), capped at the model's.
            HELM's neurips/local deployment uses 2048.
        quantize: bitsandbytes weight quantization on CUDA (bnb.nf4, bnb.nf4-dq, bnb.fp4,
            bnb.fp4-dq, bnb.int8).
        wandb_artifact: a W&B model artifact (entity/project/name:alias) to download and serve
            (network and W&B login needed).
        hub_model: a Hugging Face hub id to download and convert with `onegpu model prepare`.
        base_checkpoint: for an adapter-only source, the base checkpoint dir to merge into (default:
            the checkpoint_dir its hyperparameters.yaml names).
        num_threads: torch CPU threads (default: torch's choice).
        prefix_cache_mb: memory for K/V of recent prompt prefixes (HELM repeats the same few-shot
            examples in every prompt of a scenario; those are computed once). 0 turns it off.
        prefill_chunk: prompt tokens computed per forward between two decode steps, so a long new
            prompt does not stall the running requests (0: each prompt group in one forward).
        engine: onegpu (the default: the kit's engine) or vllm (vLLM in its own env, created on first
            use: `make vllm-venv`); the same API, tokenizer, BOS rule and prompt style either way.
        gpu_memory_utilization: vllm on a GPU: the share of the card vLLM takes for weights,
            activations and its KV cache (default 0.9). On a CPU its KV cache is max_batch_size x
            max_seq_length tokens + prefix_cache_mb, as for the onegpu engine.
        vllm_args: more vLLM engine arguments, e.g. '{"enforce_eager": true}' (vLLM's names).
        access_log: log every HTTP request.
    """
    # bad names fail before the model loads
    rules = parse_rules(postprocess if postprocess is not None else _env("postprocess"))
    prompt_style = prompt_style or _env("prompt_style") or "auto"
    dtype = dtype or _env("dtype") or "auto"
    quantize = quantize or _env("quantize")
    max_batch_size = max_batch_size or int(_env("max_batch_size") or 16)
    engine = engine or _env("engine") or "onegpu"
    gpu_memory_utilization = gpu_memory_utilization or float(_env("gpu_memory_utilization") or 0.9)
    check_engine_options(engine, quantize, vllm_args)
    base_checkpoint = base_checkpoint or _env("base_checkpoint")
    checkpoint, wandb_artifact, hub_model = _model_source(checkpoint, wandb_artifact, hub_model)
    check_port(host, port)  # before the model loads, not after
    checkpoint = _local_checkpoint(checkpoint, wandb_artifact, hub_model)
    print(f"[onegpu serve] loading {checkpoint} (engine {engine})", file=sys.stderr)
    common = dict(device=device, dtype=dtype, max_batch_size=max_batch_size, max_seq_length=max_seq_length,
                  prompt_style=prompt_style, num_threads=num_threads, prefix_cache_mb=prefix_cache_mb,
                  base_checkpoint=Path(base_checkpoint) if base_checkpoint else None)
    if engine == "vllm":
        serving = vllm_engine(Path(checkpoint), gpu_memory_utilization=gpu_memory_utilization, vllm_args=vllm_args,
                              **common)
    else:
        serving = onegpu_engine(Path(checkpoint), quantize=quantize, prefill_chunk=prefill_chunk, **common)
    _print_ready(serving, rules, host, port)
    try:
        uvicorn.run(create_app(serving, rules), host=host, port=port, log_level="warning", access_log=access_log)
    finally:
        serving.shutdown()


def onegpu_engine(checkpoint: Path, **options):
    from onegpu.submission.engine import Engine  # the engine: torch and litgpt load here, not for --help

    return Engine(checkpoint, **options)


def vllm_engine(checkpoint: Path, **options):
    from onegpu.submission.vllm_engine import VLLMEngine  # the engine: torch here, vLLM in its own env

    return VLLMEngine(checkpoint, **options)


def check_engine_options(engine: str, quantize: str | None, vllm_args) -> None:
    """UserError for an unknown engine or options that do not apply to it (before anything loads)."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}", fix=f"use one of: {', '.join(ENGINES)}")
    if engine == "vllm" and quantize:
        raise UserError(f"--quantize {quantize} is the onegpu engine's bitsandbytes loading",
                        fix="drop --quantize, or give vLLM its own: --vllm_args '{\"quantization\": \"bitsandbytes\"}'")
    if engine != "vllm" and vllm_args:
        raise UserError("--vllm_args applies to --engine vllm only", fix="add --engine vllm, or drop --vllm_args")
    if vllm_args is not None and not isinstance(vllm_args, dict):
        raise UserError(f"--vllm_args {vllm_args!r} is not a JSON object", fix="""write e.g. '{"enforce_eager": true}'""")


def _env(option: str) -> str | None:
    """The environment's value for a ``serve`` option (ENV_DEFAULTS), None when unset or empty."""
    return os.environ.get(ENV_DEFAULTS[option]) or None


def _model_source(checkpoint, wandb_artifact: str | None, hub_model: str | None) -> tuple:
    """(checkpoint, wandb_artifact, hub_model) with exactly one set: the one given, else the environment's
    (the first set of ONEGPU_WANDB_ARTIFACT, ONEGPU_HUB_MODEL, ONEGPU_CHECKPOINT); else a UserError."""
    if not (checkpoint or wandb_artifact or hub_model):
        wandb_artifact = _env("wandb_artifact")
        hub_model = None if wandb_artifact else _env("hub_model")
        checkpoint = None if wandb_artifact or hub_model else _env("checkpoint")
    sources = [s for s in (checkpoint, wandb_artifact, hub_model) if s]
    if len(sources) != 1:
        raise UserError(f"onegpu serve needs exactly one model source, got {len(sources)}",
                        fix="pass one of --checkpoint DIR, --wandb_artifact NAME, --hub_model ID "
                            "(or set ONEGPU_CHECKPOINT / ONEGPU_WANDB_ARTIFACT / ONEGPU_HUB_MODEL)")
    return checkpoint, wandb_artifact, hub_model


def check_port(host: str, port: int) -> None:
    """UserError unless ``host:port`` can be bound now (as uvicorn binds it: SO_REUSEADDR set)."""
    if not 0 < port < 65536:
        raise UserError(f"port {port} is out of range", fix="use 1-65535")
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}",
                        fix="pass --host 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as err:  # EADDRINUSE; EACCES for ports < 1024 without root
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}",
                        fix=f"pass a free port (e.g. --port {free_port()}), or stop the process that holds {port} "
                            f"(`ss -ltnp 'sport = :{port}'` shows it)") from None


def _local_checkpoint(checkpoint, wandb_artifact: str | None, hub_model: str | None):
    """The checkpoint dir to load: ``checkpoint``, or the W&B artifact downloaded, or the hub model prepared."""
    if wandb_artifact:
        return download_wandb_artifact(wandb_artifact)
    if hub_model:
        return prepare(hub_model)
    return checkpoint


def _print_ready(engine, rules: list[str], host: str, port: int) -> None:
    facts = engine.health()
    memory = (f"KV cache {facts['kv_cache_gb']:.2f} GB" if facts.get("kv_cache_gb")
              else f"gpu_memory_utilization {facts.get('gpu_memory_utilization')}")
    print(f"[onegpu serve] ready: {facts['checkpoint']} with the {engine.name} engine on {facts['device']} "
          f"({facts['dtype']}), max_batch_size={facts['max_batch_size']}, max_seq_length={facts['max_seq_length']}, "
          f"{memory}, prompt style {engine.prompt_style_name}, postprocess {','.join(rules) or 'none'}; "
          f"listening on http://{host}:{port}", file=sys.stderr)
