"""``onegpu serve --engine vllm``: vLLM runs the model, the kit's server keeps the contract.

The server process (the kit's env) does what it does for its own engine: the kit's tokenizer and
BOS rule, the prompt style, truncation, stop sequences, echo and logprob shaping
(submission/generation.py). This engine only hands the token ids to a vLLM worker and brings back
token ids and logprobs. The worker (submission/vllm_worker.py, which says why it is a separate
process with that protocol) runs in vLLM's own Python (submission/vllm_env.py) on a checkpoint in
Hugging Face format: the checkpoint's ``hf/`` when it is up to date (``onegpu finetune --export_hf``
writes it, so does the vLLM image's build), else an export cached under ``$ONEGPU_CACHE/hf/``.

Memory: on a GPU vLLM takes ``gpu_memory_utilization`` of the card and gives what the weights and
its activation profile leave to the paged KV cache (prefix cache included). On a CPU the KV cache
is sized as the kit's engine sizes its own: ``max_batch_size`` rows of ``max_seq_length`` tokens
plus ``prefix_cache_mb``.

    python -m onegpu.submission.vllm_engine export CHECKPOINT   # writes CHECKPOINT/hf (the image's build step)
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import shutil
import socket as sockets  # `socket` names the worker's socket path below
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from litgpt import Config

from onegpu import inference
from onegpu.errors import UserError
from onegpu.paths import cache_dir
from onegpu.processes import die_with_parent
from onegpu.submission.generation import MAX_TOP_LOGPROBS, GenRequest, Generation, RequestRejected, TokenCodec
from onegpu.submission.bundle import kv_bytes_per_token
from onegpu.submission.vllm_env import vllm_python

WORKER = Path(__file__).with_name("vllm_worker.py")
LINE_LIMIT = 1 << 26  # one reply holds a 2048-token echo with top-20 logprobs per token


def hf_model_dir(checkpoint: Path) -> Path:
    """``checkpoint`` (a merged litgpt dir) in Hugging Face format: its ``hf/`` if newer than its
    weights, else an export cached under ``$ONEGPU_CACHE/hf/`` (made once)."""
    weights = checkpoint / "lit_model.pth"
    beside = checkpoint / "hf"
    exported = beside / "model.safetensors"
    if (beside / "config.json").is_file() and exported.is_file() and exported.stat().st_mtime >= weights.stat().st_mtime:
        return beside
    stat = weights.stat()
    key = hashlib.sha256(f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "hf" / f"{checkpoint.name}-{key}"
    if not (cached / "model.safetensors").is_file():
        print(f"[onegpu serve] exporting {checkpoint} to Hugging Face format for vLLM -> {cached} (once)",
              file=sys.stderr)
        inference.export_hf(checkpoint, cached)
    return cached


def export_beside(checkpoint: Path) -> Path:
    """Write ``checkpoint/hf`` (the vLLM image runs this at build, so start-up converts nothing)."""
    return inference.export_hf(checkpoint, Path(checkpoint) / "hf")


class VLLMEngine:
    """The :class:`submission.generation.ServingEngine` backed by a vLLM worker process."""

    name = "vllm"
    max_temperature = 2.0  # vLLM refuses more (its SamplingParams validation)

    def __init__(self, checkpoint: Path, device: str = "auto", dtype: str = "auto", max_batch_size: int = 16,
                 max_seq_length: int = 2048, prompt_style: str = "auto", base_checkpoint: Path | None = None,
                 num_threads: int | None = None, prefix_cache_mb: int = 1024, gpu_memory_utilization: float = 0.9,
                 vllm_args: dict | None = None, startup_timeout: float = 1800.0):
        if max_batch_size < 1:
            raise UserError(f"max_batch_size={max_batch_size}", fix="use 1 or more")
        if not 0 < gpu_memory_utilization <= 1:
            raise UserError(f"gpu_memory_utilization={gpu_memory_utilization}", fix="use a fraction in (0, 1], e.g. 0.9")
        loaded = inference.load(checkpoint, base_checkpoint=base_checkpoint, device=device, dtype=dtype,
                                prompt_style=prompt_style, who="onegpu serve", with_model=False)
        self.checkpoint, self.device, self.dtype = loaded.checkpoint, loaded.device, loaded.dtype
        self.prompt_style = loaded.prompt_style
        self.prompt_style_name = type(self.prompt_style).__name__ if self.prompt_style else "raw"
        self.codec = TokenCodec(loaded.tokenizer, self.prompt_style)
        config = Config.from_file(self.checkpoint / "model_config.yaml")
        self.max_seq_length = min(max_seq_length, config.block_size)
        self.vocab_size = config.padded_vocab_size
        self.max_batch_size = max_batch_size
        dtype_name = str(self.dtype).removeprefix("torch.")
        on_cpu = self.device.type == "cpu"
        self.kv_cache_bytes = (kv_bytes_per_token(config, dtype_name) * max_batch_size * self.max_seq_length
                               + (prefix_cache_mb << 20)) if on_cpu else 0
        self.gpu_memory_utilization = None if on_cpu else gpu_memory_utilization
        python = vllm_python()
        model_dir = hf_model_dir(self.checkpoint)
        self._dir = tempfile.mkdtemp(prefix="onegpu-vllm-")
        socket = os.path.join(self._dir, "worker.sock")
        cmd = [str(python), str(WORKER), "--model", str(model_dir), "--socket", socket, "--dtype", dtype_name,
               "--max_model_len", str(self.max_seq_length), "--max_num_seqs", str(max_batch_size),
               "--kv_cache_bytes", str(self.kv_cache_bytes), "--gpu_memory_utilization", str(gpu_memory_utilization),
               "--engine_args", json.dumps(vllm_args or {})]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        if on_cpu and num_threads:  # as many threads as the kit's engine would use, not pinned to cores
            env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(num_threads))
        print(f"[onegpu serve] starting vLLM ({python}) on {model_dir}; on a CPU its warm-up compile takes minutes",
              file=sys.stderr, flush=True)
        start = time.monotonic()
        self._process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent())
        self._client = _WorkerClient(socket, self._process, startup_timeout)
        self.startup_s = time.monotonic() - start
        self.worker_stats = self._client.call({"op": "stats"}).result(timeout=60)["stats"]
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0}
        # Single-token stops (EOS, most templates') end generation inside vLLM; a multi-token one is
        # given as its text so vLLM stops soon after it, and the server cuts at its exact ids.
        self._stop_token_ids = sorted({s[0] for s in self.codec.stop_token_seqs if len(s) == 1})
        self._stop_texts = [self.codec.raw_decode(s) for s in self.codec.stop_token_seqs if len(s) > 1]

    def top_k(self, top_k: int) -> int:
        """vLLM's top_k: 0 (no limit) for a k that keeps every token, as the onegpu engine does; vLLM
        itself fails on a k beyond a machine integer."""
        return top_k if top_k < self.vocab_size else 0

    def submit(self, request: GenRequest) -> Future:
        """Send ``request`` to the worker; the future resolves to its :class:`Generation`."""
        k = min(request.top_logprobs, MAX_TOP_LOGPROBS)
        message = {"prompt_ids": request.prompt_ids, "max_tokens": max(1, request.max_new_tokens),
                   "temperature": 0.0 if request.greedy else request.temperature, "top_k": self.top_k(request.top_k),
                   "top_p": request.top_p, "seed": request.seed,
                   "stop": list(request.stop_sequences) + self._stop_texts, "stop_token_ids": self._stop_token_ids,
                   "logprobs": k, "prompt_logprobs": k if request.echo else None}
        result: Future = Future()

        def done(reply: Future) -> None:
            try:
                answer = reply.result()
                if "error" in answer:
                    if answer["error"].startswith("VLLMValidationError"):  # e.g. temperature outside vLLM's [0, 2]
                        raise RequestRejected(f"the vLLM engine refuses this request: {answer['error']}")
                    raise RuntimeError(f"vLLM: {answer['error']}")
                n = request.max_new_tokens  # 0 (echo scoring): vLLM generated one token to be dropped
                generation = Generation(answer["out_ids"][:n], answer["out_logprobs"][:n],
                                        [[tuple(p) for p in top] for top in answer["out_top"][:n]],
                                        answer["prompt_logprobs"],
                                        [[tuple(p) for p in top] for top in answer["prompt_top"]])
                self.stats["requests"] += 1
                self.stats["prompt_tokens"] += len(request.prompt_ids)
                self.stats["generated_tokens"] += len(generation.out_ids)
                result.set_result(generation)
            except Exception as err:
                result.set_exception(err)

        self._client.call(message).add_done_callback(done)
        return result

    def kv_cache_gb(self) -> float | None:
        return round(self.kv_cache_bytes / 1e9, 3) if self.kv_cache_bytes else None

    def health(self) -> dict:
        """Raises RuntimeError once the worker is gone (the server answers 503)."""
        if self._client.dead:
            raise RuntimeError(self._client.dead)
        memory = ({"kv_cache_gb": self.kv_cache_gb()} if self.kv_cache_bytes
                  else {"gpu_memory_utilization": self.gpu_memory_utilization})
        return {"checkpoint": str(self.checkpoint), "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "max_seq_length": self.max_seq_length,
                "max_batch_size": self.max_batch_size, **memory, "startup_s": round(self.startup_s, 1),
                "stats": {**self.stats, "seeded_sampling": self.worker_stats["seeded_sampling"]}}

    def shutdown(self) -> None:
        self._client.close()
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


class _WorkerClient:
    """One connection to the worker's socket, driven by an event loop in a thread of its own, so any
    thread can send a request (``call``) and wait on a ``concurrent.futures.Future``."""

    def __init__(self, socket: str, process: subprocess.Popen, timeout: float):
        self.dead: str | None = None
        self._ids = itertools.count()
        self._pending: dict[int, Future] = {}
        self._connect_when_ready(socket, process, timeout)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="onegpu-vllm-client", daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._open(socket, process), self._loop).result(timeout=60)

    @staticmethod
    def _connect_when_ready(socket: str, process: subprocess.Popen, timeout: float) -> None:
        """Wait until the worker accepts connections (it listens once vLLM is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise UserError(f"the vLLM worker exited with code {process.returncode} before it was ready "
                                "(its log is above)", fix="fix the cause in the log (model format, memory, vLLM "
                                                          "install: `make vllm-venv`), or serve with --engine onegpu")
            if os.path.exists(socket):
                with sockets.socket(sockets.AF_UNIX) as probe:
                    try:
                        probe.connect(socket)
                        return
                    except OSError:
                        pass
            time.sleep(0.5)
        process.kill()
        raise UserError(f"vLLM was not ready within {timeout:.0f} s", fix="give it longer, or read its log above")

    async def _open(self, socket: str, process: subprocess.Popen) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(socket, limit=LINE_LIMIT)
        self._process = process
        asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while line := await self._reader.readline():
            answer = json.loads(line)
            future = self._pending.pop(answer["id"], None)
            if future is not None:
                future.set_result(answer)
        code = self._process.poll()
        self.dead = (f"the vLLM worker exited (code {code}); its log is in the server's output" if code is not None
                     else "the connection to the vLLM worker closed")
        for future in self._pending.values():
            future.set_exception(RuntimeError(self.dead))
        self._pending.clear()

    def call(self, message: dict) -> Future:
        """Send ``message`` (an ``id`` is added); the future resolves to the worker's reply."""
        future: Future = Future()
        if self.dead:
            future.set_exception(RuntimeError(self.dead))
            return future
        message = dict(message, id=next(self._ids))

        def send() -> None:
            if self.dead:
                future.set_exception(RuntimeError(self.dead))
                return
            self._pending[message["id"]] = future
            self._writer.write((json.dumps(message) + "\n").encode())

        self._loop.call_soon_threadsafe(send)
        return future

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "export":
        sys.exit("usage: python -m onegpu.submission.vllm_engine export CHECKPOINT_DIR")
    print(export_beside(Path(sys.argv[2])))
