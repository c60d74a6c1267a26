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
from onegpu.processes import die_with_parent


LOG_TAIL_LINES = 40


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_server(checkpoint: str | Path | None, port: int, log_path: str | Path, serve_args: list[str] = (),
                 command: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``onegpu serve`` on 127.0.0.1:PORT in its own process group (``stop_process_group`` ends it all),
    stopped by the kernel (SIGTERM) if its parent dies without stopping it (SIGKILL).

    ``command`` replaces ``onegpu serve --checkpoint ... --host ... --port ...`` (e.g. the
    Dockerfile's CMD with host and port rewritten); ``port`` must then be the one it names.
    """
    if command is None:
        command = [sys.executable, "-m", "onegpu", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if checkpoint is not None:
            command += ["--checkpoint", str(checkpoint)]
    with open(log_path, "w", encoding="utf-8") as log:  # the child keeps its own copy
        return subprocess.Popen([*command, *serve_args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent(),
                                env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {})))


def wait_healthy(base_url: str, proc: subprocess.Popen | None = None, timeout: float = 300.0,
                 log_path: str | Path | None = None) -> dict:
    """Poll ``GET /health`` until 200 (returns its JSON); a dead or silent server is a UserError
    that shows the end of its log."""
    import httpx  # optional (the eval extra): the serving image has none

    def with_log(problem: str) -> str:
        return f"{problem}; its log ({log_path}) ends with:\n{log_tail(log_path)}" if log_path else problem

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(with_log(f"`onegpu serve` exited with code {proc.returncode} before it was ready"),
                            fix="fix the cause shown in the log (checkpoint, port, memory), then re-run")
        try:
            reply = httpx.get(f"{base_url}/health", timeout=2.0)
            if reply.status_code == 200:
                return reply.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise UserError(with_log(f"`onegpu serve` did not answer {base_url}/health within {timeout:.0f} s"),
                    fix="allow a longer timeout for large models (--server_timeout), or read the server log")


def stop_process_group(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM the child's whole process group, then SIGKILL whatever is left after ``grace``."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # The leader may be gone while group members linger (a worker that ignored SIGTERM).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def running_server(checkpoint: str | Path | None, *serve_args: str, port: int | None = None, timeout: float = 300.0,
                   log_path: str | Path | None = None, command: list[str] | None = None,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``onegpu serve --checkpoint CHECKPOINT ...`` on 127.0.0.1; yields its base URL."""
    port = port or free_port()
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "server.log"
        proc = start_server(checkpoint, port, log_path, list(serve_args), command=command, env=env)
        try:
            base_url = f"http://127.0.0.1:{port}"
            wait_healthy(base_url, proc, timeout, log_path=log_path)
            yield base_url
        finally:
            stop_process_group(proc, grace=15.0)
