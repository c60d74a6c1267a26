"""Start ``onegpu serve`` in a child process and wait for ``/health`` (tests, benchmarks, eval helm).

    with running_server(checkpoint, "--max_batch_size", "8") as base_url:
        httpx.post(f"{base_url}/process", json={"prompt": "The capital of France is "})
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from onegpu.errors import UserError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base_url: str, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"onegpu serve exited with code {proc.returncode} before it was ready",
                            fix="read its log (printed above) for the cause")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise UserError(f"{base_url}/health did not answer 200 within {timeout:.0f} s",
                    fix="check the server log; a large model may need a longer timeout")


@contextlib.contextmanager
def running_server(checkpoint: str | Path | None, *serve_args: str, port: int | None = None, timeout: float = 300.0,
                   log_path: str | Path | None = None, command: list[str] | None = None,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``onegpu serve --checkpoint CHECKPOINT ...`` on 127.0.0.1; yields its base URL.

    ``command`` replaces ``onegpu serve --checkpoint ... --host ... --port ...`` (e.g. the
    Dockerfile's CMD with host and port rewritten); ``port`` must then be the one it names.
    """
    port = port or free_port()
    if command is None:
        command = [sys.executable, "-m", "onegpu", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if checkpoint is not None:
            command += ["--checkpoint", str(checkpoint)]
    cmd = [*command, *serve_args]
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {})))
    base_url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(base_url, proc, timeout)
        except UserError:
            log.seek(0)
            raise UserError(f"onegpu serve did not become healthy: {' '.join(cmd)}\n{log.read()[-3000:]}",
                            fix="run the command by hand to see the error") from None
        yield base_url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
