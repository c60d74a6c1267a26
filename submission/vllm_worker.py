"""The vLLM side of ``onegpu serve --engine vllm``: vLLM's engine behind a local socket.

Runs in vLLM's own Python (submission/vllm_env.py), started by submission/vllm_engine.py, and
imports nothing from the kit (the kit is not installed there). Why it is shaped this way:

* **A process of its own.** vLLM pins packages the kit pins differently, so the kit's server
  (FastAPI, the contract, the tokenizer) and vLLM cannot share an interpreter.
* **vLLM's Python API, fed token ids.** ``AsyncLLM.generate(TokensPrompt(ids))`` runs exactly the
  ids the kit tokenized (its BOS rule, its prompt style) and returns token ids with logprobs for the
  generated tokens and, for echo, the prompt's (``prompt_logprobs``). vLLM's OpenAI server would
  take text and re-tokenize it by its own rules (this model gets no BOS there), and key its top
  logprobs by text. Decoding and every response rule stay in the kit (submission/generation.py).
* **JSON lines over a Unix socket.** Standard library on both sides, no port to collide with and
  nothing reachable from outside the machine; one connection carries all concurrent requests,
  each reply matched to its request by ``id``, and vLLM batches them (continuous batching, paged
  attention, prefix caching; CUDA graphs on a GPU).

Messages (one JSON object per line): a request ``{"id", "prompt_ids", "max_tokens",
"temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "logprobs",
"prompt_logprobs"}`` is answered by ``{"id", "out_ids", "out_logprobs", "out_top", "prompt_logprobs",
"prompt_top", "finish_reason"}`` or ``{"id", "error"}``; ``{"id", "op": "stats"}`` by ``{"id",
"stats"}``. The socket accepts connections only once the engine is ready.

**Seeded sampling on CPU.** After a partial (chunked) prefill, vLLM rewinds the request's random
generator with ``get_offset``/``set_offset``, which only CUDA generators have: on the CPU build the
first seeded request with a long prompt kills the engine ("CPU Generator does not use offset") and
every later request fails. :func:`make_cpu_generators_rewindable` gives CPU generators that rewind
(the state before each sampling step is kept, and restored when vLLM undoes that step), so a seed
gives the same sample however the prompt was chunked. It is applied when this file is imported,
which also happens in every process vLLM starts from it (with the ``spawn`` start method the child
imports the parent's main module), and it checks that the vLLM code it adapts is still shaped as
expected: if not, seeded requests on CPU are run without their seed, and ``stats`` says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

import torch
import vllm
from vllm import AsyncEngineArgs, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

REWIND_STEP = 4  # vLLM undoes one sampling step with set_offset(get_offset() - 4) (CUDA's Philox offset)


def make_cpu_generators_rewindable() -> bool:
    """Let vLLM rewind per-request CPU generators (see the module docstring); False if it cannot."""
    try:  # vLLM internals, which a later vLLM may move: then seeds are ignored on CPU, as the docstring says
        from vllm.v1.sample.sampler import Sampler  # (internals: may be gone)
        from vllm.v1.worker.gpu_input_batch import InputBatch  # (internals: may be gone)
    except ImportError:
        return False
    if getattr(InputBatch.add_request, "rewindable", False):
        return True

    class RewindableCPUGenerator(torch.Generator):
        """A CPU generator whose last sampling step can be undone, as vLLM does with CUDA offsets."""

        draws = 0
        before_last_draw: torch.Tensor | None = None

        def get_offset(self) -> int:
            return REWIND_STEP * self.draws

        def set_offset(self, offset: int) -> None:
            if offset != REWIND_STEP * (self.draws - 1) or self.before_last_draw is None:
                raise RuntimeError(f"only the last sampling step can be undone (offset {offset}, "
                                   f"{self.draws} steps)")
            self.set_state(self.before_last_draw)
            self.draws -= 1
            self.before_last_draw = None

    add_request, sample = InputBatch.add_request, Sampler.forward

    def add_rewindable_request(self, request, *args, **kwargs):
        index = add_request(self, request, *args, **kwargs)
        generator = self.generators.get(index)
        if generator is not None and generator.device.type == "cpu" \
                and not isinstance(generator, RewindableCPUGenerator):
            rewindable = RewindableCPUGenerator(device="cpu")
            rewindable.set_state(generator.get_state())
            self.generators[index] = request.generator = rewindable  # kept if the request is preempted
        return index

    def sample_keeping_state(self, logits, sampling_metadata, *args, **kwargs):
        for generator in sampling_metadata.generators.values():
            if isinstance(generator, RewindableCPUGenerator):
                generator.before_last_draw = generator.get_state()
                generator.draws += 1
        return sample(self, logits, sampling_metadata, *args, **kwargs)

    add_rewindable_request.rewindable = True
    InputBatch.add_request, Sampler.forward = add_rewindable_request, sample_keeping_state
    return True


def _on_cpu() -> bool:
    return current_platform.is_cpu()


SEEDS_REWIND = make_cpu_generators_rewindable() if _on_cpu() else True


# ----------------------------------------------------------------------------------------------
# Requests


def sampling_params(msg: dict, seeds_ok: bool):
    greedy = msg["temperature"] <= 0
    stop = msg.get("stop") or []
    return SamplingParams(
        n=1, max_tokens=msg["max_tokens"], temperature=0.0 if greedy else msg["temperature"],
        top_k=0 if greedy else msg["top_k"], top_p=1.0 if greedy else msg["top_p"],
        seed=None if greedy or not seeds_ok else msg.get("seed"),
        # the kit decides where generation stops: its EOS and template stop tokens, its stop strings
        # (kept in the output: the kit cuts the text itself)
        ignore_eos=True, stop_token_ids=msg.get("stop_token_ids") or None, stop=stop or None,
        include_stop_str_in_output=True, skip_special_tokens=False, detokenize=bool(stop),
        logprobs=msg["logprobs"], prompt_logprobs=msg.get("prompt_logprobs"),
        output_kind=RequestOutputKind.FINAL_ONLY)


def top_pairs(entry: dict, k: int) -> list[list]:
    """vLLM's {token id: Logprob} of one position -> the top-k [id, logprob] pairs, best first."""
    ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k))
    return [[tid, logprob] for _rank, tid, logprob in ranked[:k]]


def reply(msg: dict, result) -> dict:
    out = result.outputs[0]
    k = msg["logprobs"]
    ids = list(out.token_ids)
    logprobs = out.logprobs or []
    answer = {"id": msg["id"], "out_ids": ids, "out_logprobs": [logprobs[i][t].logprob for i, t in enumerate(ids)],
              "out_top": [top_pairs(logprobs[i], k) for i in range(len(ids))], "finish_reason": out.finish_reason,
              "prompt_logprobs": [], "prompt_top": []}
    if msg.get("prompt_logprobs") is not None:
        prompt = msg["prompt_ids"]
        scored = result.prompt_logprobs or []
        answer["prompt_logprobs"] = [scored[i][prompt[i]].logprob for i in range(1, len(prompt))]
        answer["prompt_top"] = [top_pairs(scored[i], msg["prompt_logprobs"]) for i in range(1, len(prompt))]
    return answer


class Worker:
    def __init__(self, engine, seeds_ok: bool):
        self.engine = engine
        self.seeds_ok = seeds_ok
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "errors": 0,
                      "seeded_sampling": "exact" if seeds_ok else "seed ignored (this vLLM build cannot rewind "
                                                                    "CPU generators)"}
        self.counter = 0

    async def generate(self, msg: dict) -> dict:
        self.counter += 1
        final = None
        async for final in self.engine.generate(TokensPrompt(prompt_token_ids=msg["prompt_ids"]),
                                                sampling_params(msg, self.seeds_ok), f"onegpu-{self.counter}"):
            pass
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(msg["prompt_ids"])
        self.stats["generated_tokens"] += len(final.outputs[0].token_ids)
        return reply(msg, final)

    async def answer(self, msg: dict, writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        try:
            if msg.get("op") == "stats":
                answer = {"id": msg["id"], "stats": dict(self.stats)}
            else:
                answer = await self.generate(msg)
        except Exception as err:  # the request fails, not the connection; a dead engine ends the process
            self.stats["errors"] += 1
            answer = {"id": msg.get("id"), "error": f"{type(err).__name__}: {err}"}
            if type(err).__name__ == "EngineDeadError":
                print(f"[vllm worker] the vLLM engine died: {err}", file=sys.stderr, flush=True)
                os._exit(3)
        async with lock:
            writer.write((json.dumps(answer) + "\n").encode())
            await writer.drain()

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lock, tasks = asyncio.Lock(), set()
        while line := await reader.readline():
            task = asyncio.create_task(self.answer(json.loads(line), writer, lock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        writer.close()


def engine_args(args: argparse.Namespace):
    options = {"model": args.model, "dtype": args.dtype, "max_model_len": args.max_model_len,
               "max_num_seqs": args.max_num_seqs, "seed": 0}
    if args.kv_cache_bytes:
        options["kv_cache_memory_bytes"] = args.kv_cache_bytes
    else:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    options.update(json.loads(args.engine_args or "{}"))
    return AsyncEngineArgs(**options)


async def main(args: argparse.Namespace) -> None:
    start = time.monotonic()
    engine = AsyncLLM.from_engine_args(engine_args(args))
    on_cpu = _on_cpu()
    worker = Worker(engine, seeds_ok=SEEDS_REWIND or not on_cpu)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = await asyncio.start_unix_server(worker.serve_connection, path=args.socket, limit=1 << 26)
    print(f"[vllm worker] vLLM {vllm.__version__} ready in {time.monotonic() - start:.0f} s on "
          f"{'CPU' if on_cpu else 'GPU'}; seeded sampling: {worker.stats['seeded_sampling']}",
          file=sys.stderr, flush=True)
    # SIGTERM (the server shutting down) ends serve_forever, so vLLM's own shutdown stops its engine
    # processes instead of leaving them behind
    serving = asyncio.ensure_future(server.serve_forever())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, serving.cancel)
    try:
        await serving
    except asyncio.CancelledError:
        pass
    finally:
        server.close()
        engine.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="vLLM behind a Unix socket for `onegpu serve --engine vllm`")
    parser.add_argument("--model", required=True, help="a Hugging Face model dir")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max_model_len", type=int, required=True)
    parser.add_argument("--max_num_seqs", type=int, default=16)
    parser.add_argument("--kv_cache_bytes", type=int, default=0, help="KV cache size (CPU); 0: from the GPU share")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.9)
    parser.add_argument("--engine_args", default=None, help="more vLLM engine arguments, as a JSON object")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
