"""The kill-anywhere harness: run a real ``onegpu`` command, stop it at a point of its own progress,
check what it left, SIGKILL its process group; then re-run the same command (tests/test_kill_anywhere.py).

A kill point is read from the process's own progress, never from a clock:

* ``line``: a line it printed (regex over its output so far), polled from outside;
* ``file``: a file or dir it wrote appears (glob under the run's base dir), polled from outside;
* ``op`` + ``path``: a file operation it is about to make (``rename`` to, ``write`` to, ``read``
  from, ``rmtree`` of a path matching the regex; the ``nth`` such). An audit hook installed in
  the process (``BOOT``) stops it with SIGSTOP just before, so even a window of microseconds (two
  renames in a row) is hit on every run.

At the point the command's process group is frozen (SIGSTOP), so what the test inspects is what a
SIGKILL at that moment leaves, then SIGKILLed. Processes it started in their own session (servers,
helm-run, sweep trials) are not frozen (they write only through atomic renames, or are another
program's files the test leaves alone), and every one of them must be gone soon after the kill: none
may outlive a killed parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# `python -c BOOT VERB ARGS...` runs `onegpu VERB ARGS...` exactly as the console script does, with
# the audit hook of an `op` kill point installed first (its spec in ONEGPU_TEST_STOP_AT, removed from
# the environment at once so that the processes the command starts do not inherit it).
BOOT = r"""
import json, os, re, signal, sys
spec = json.loads(os.environ.pop("ONEGPU_TEST_STOP_AT", "null"))
if spec:
    pattern, seen = re.compile(spec["path"]), [0]
    WRITE = os.O_WRONLY | os.O_RDWR

    def target(event, args):
        if event == "os.rename":
            return "rename", args[1]
        if event == "shutil.rmtree":
            return "rmtree", args[0]
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1], args[2] or 0
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE)
            return ("write" if writes else "read"), args[0]
        return None, None

    def hook(event, args):
        op, path = target(event, args)
        if op == spec["op"] and pattern.search(os.path.abspath(os.fsdecode(path))):
            seen[0] += 1
            if seen[0] == spec["nth"]:
                os.kill(os.getpid(), signal.SIGSTOP)

    sys.addaudithook(hook)
sys.argv[0] = "onegpu"
from onegpu.cli import entrypoint
entrypoint()
"""


def onegpu(*args: str) -> list[str]:
    """The argv of ``onegpu ARGS...`` (through ``BOOT``, so any kill point can stop it)."""
    return [sys.executable, "-c", BOOT, *map(str, args)]


@dataclass(frozen=True)
class KillPoint:
    name: str
    line: str | None = None
    file: str | None = None
    op: str | None = None  # rename | write | read | rmtree
    path: str | None = None
    nth: int = 1
    process: str | None = None  # or: a process it started whose command line matches this regex


@dataclass
class Attempt:
    """One run of the command: its output, and (when killed) the processes it had started."""

    log: Path
    returncode: int | None = None
    children: list[psutil.Process] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def run(cmd: list[str], base: Path, log: Path, env: dict[str, str], timeout: float = 900) -> Attempt:
    """Run the command to its end in ``base``."""
    with open(log, "w") as fh:
        code = subprocess.run(cmd, cwd=base, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
    return Attempt(log, code)


@contextlib.contextmanager
def frozen_at(cmd: list[str], base: Path, point: KillPoint, log: Path, env: dict[str, str],
              timeout: float = 900) -> Iterator[Attempt]:
    """Run the command in ``base`` until ``point``; yield with its process group frozen there; then
    SIGKILL the group and check that every process it had started is gone."""
    attempt = Attempt(log)
    if point.op:
        env = {**env, "ONEGPU_TEST_STOP_AT": json.dumps({"op": point.op, "path": point.path, "nth": point.nth})}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=base, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not reached(point, proc, base, attempt):
            if proc.poll() is not None:
                raise AssertionError(f"{point.name}: the command ended (exit {proc.returncode}) before the kill "
                                     f"point; its output ends with:\n{attempt.output[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{point.name}: not reached in {timeout:.0f} s:\n{attempt.output[-3000:]}")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGSTOP)
        attempt.children = _descendants(proc.pid)
        yield attempt
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        attempt.returncode = proc.wait()
    assert attempt.returncode == -signal.SIGKILL, f"{point.name}: exit {attempt.returncode}, not killed"
    outlived = wait_gone(attempt.children, timeout=120)
    assert not outlived, f"{point.name}: processes outlived the killed command: {outlived}"


def reached(point: KillPoint, proc: subprocess.Popen, base: Path, attempt: Attempt) -> bool:
    if point.op:
        return _status(proc.pid) == psutil.STATUS_STOPPED
    if point.line:
        return re.search(point.line, attempt.output) is not None
    if point.file:
        return any(base.glob(point.file))
    if point.process:
        return any(re.search(point.process, " ".join(_cmdline(p))) for p in _descendants(proc.pid))
    raise ValueError(point)


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[str]:
    """Those still running after ``timeout`` s (as ``pid: command line``)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if _status(p.pid, p) not in (None, psutil.STATUS_ZOMBIE)]
        if not alive or time.monotonic() > deadline:
            return [f"{p.pid}: {' '.join(_cmdline(p))[:200]}" for p in alive]
        time.sleep(0.2)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _status(pid: int, process: psutil.Process | None = None) -> str | None:
    try:
        process = process or psutil.Process(pid)
        return process.status() if process.is_running() else None
    except psutil.Error:
        return None


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


# ---------------------------------------------------------------------------------- what it left
TEMP = re.compile(r"^\..+\.\d+@[0-9a-f]{6}\.[A-Za-z0-9_]+\.tmp$")  # onegpu.contracts.TEMP_NAME
APPEND_ONLY = ("metrics.jsonl",)  # appended line by line (a reader skips a cut last line)


def visible_files(base: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Files under ``base`` a reader can see: not inside an atomic write's temp file or dir, not W&B's
    own files, not logs, not under the ``skip`` globs (relative to ``base``)."""
    found = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if path.is_dir() or any(TEMP.match(part) for part in rel.parts) or "wandb" in rel.parts:
            continue
        if path.suffix == ".log" or any(rel.match(pattern) for pattern in skip):
            continue
        found.append(path)
    return found


def assert_whole(path: Path) -> None:
    """``path`` is a complete file of its format (JSON, JSONL, YAML, torch, safetensors, PNG, zip)."""
    name = path.name
    if name in APPEND_ONLY:
        for line in path.read_text(encoding="utf-8").splitlines()[:-1]:
            json.loads(line)
    elif name.endswith(".jsonl"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert line.strip(), f"{path}:{n} is empty"
            json.loads(line)
        assert path.stat().st_size == 0 or path.read_bytes().endswith(b"\n"), f"{path} ends mid-line"
    elif name.endswith(".json"):
        json.loads(path.read_text(encoding="utf-8"))
    elif name.endswith((".yaml", ".yml")):
        import yaml

        yaml.safe_load(path.read_text(encoding="utf-8"))
    elif name.endswith((".pth", ".pt", ".lora")):
        import torch

        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    elif name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                fh.get_tensor(key)
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None, f"{path} has a corrupt member"


def temps_left(*dirs: Path) -> list[Path]:
    """Temp files/dirs of atomic writes under ``dirs`` (none may outlive a finished run)."""
    return [p for d in dirs for p in d.rglob(".*") if TEMP.match(p.name)]
