"""Processes a stage starts or leaves behind: who wrote a file, whether it still runs, and children
that do not outlive their parent.

* ``this_process`` / ``process_alive``: a process is named by (host, pid, start time), so a pid the
  kernel gave to a new process since is not taken for the old one. Run dirs (``run.json``),
  temp files of atomic writes and sweep trials record it; a reader tells "still running" from
  "killed" (SIGKILL, OOM killer, power loss) with it.
* ``die_with_parent``: a ``preexec_fn`` that makes the kernel signal a child when its parent dies,
  so the server of ``eval helm`` / ``submission pack``, helm-run and a sweep's trial never keep
  running (holding the GPU, writing into the run dir) after their parent was killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import psutil


def host_id() -> str:
    """A short stable name of this machine (file names use it to tell this host's processes apart)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def start_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), or None when there is no such process (or a zombie)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
        return None


def this_process() -> dict[str, Any]:
    """{host, pid, started} of the running process (recorded in run.json and sweep state)."""
    return {"host": host_id(), "pid": os.getpid(), "started": start_time(os.getpid())}


def process_alive(pid: int | None, started: float | None = None, host: str | None = None) -> bool | None:
    """True while that process runs, False once it is gone, None when it ran on another host.

    ``started`` (its start time as recorded) tells it from a later process that got the same pid.
    """
    if not pid:
        return False
    if host is not None and host != host_id():
        return None
    now = start_time(int(pid))
    if now is None:
        return False
    return started is None or abs(now - float(started)) < 1.0


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM, also: Callable[[], None] | None = None) -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets ``sig`` when the parent dies (Linux; elsewhere None: no hook).

    SIGTERM lets the child end cleanly (a fine-tune saves a checkpoint, a server closes). ``also``
    runs first in the child (another ``preexec_fn``).
    """
    if not sys.platform.startswith("linux"):
        return also
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def hook() -> None:
        if also is not None:
            also()
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the hook was armed
            os.kill(os.getpid(), sig)

    return hook
