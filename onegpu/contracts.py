"""The hand-offs between stages, in one place: what each stage writes and the next one reads.

Stages talk through files (data dir -> checkpoint dir -> results JSON). This module is the one
definition of those files and of the small rules every stage must apply the same way:

* ``QUANTIZE_MODES`` / ``Quantize``: the bitsandbytes weight formats (training and serving);
* ``TRACKS`` / ``Track``: the challenge's two hardware tracks (GPU, its memory, the 24 h budget);
* ``atomic_path`` / ``atomic_write_text`` / ``atomic_write_json`` / ``staged_dir``: write-to-temp-
  then-rename, so a kill mid-write leaves the old file (or dir) or the new one, never half of one
  (``scratch_dir``: temp work of the same kind that is never handed over);
* ``read_manifest`` / ``write_manifest``: a data dir's ``manifest.json``;
* ``artifact_name`` / ``dataset_digest`` / ``checkpoint_digest`` / ``model_input``: the name and digest under which
  a stage logs its output and under which every later stage records it as an input (lineage);
* ``RunDir`` / ``find_run_dirs``: a run directory (``run.json``, ``metrics.jsonl``,
  ``summary.json``, ``results.json``) as every reader (report, compare, sweep) sees it.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from onegpu.errors import UserError
from onegpu.processes import host_id, process_alive

# ------------------------------------------------------------------------------ quantization
Quantize = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"]
QUANTIZE_MODES: tuple[str, ...] = get_args(Quantize)


# ------------------------------------------------------------------------------------ tracks
Track = Literal["rtx4090-24gb", "a100-40gb"]
# The serving engines, by name: the kit's own (default) and vLLM (its own env; the GPU image's recommended engine).
EngineName = Literal["onegpu", "vllm"]


@dataclass(frozen=True)
class TrackSpec:
    """One hardware track of the challenge."""

    name: str
    gpu: str
    memory_mib: int  # what the driver reports as usable (nvidia-smi "Total")
    budget: str  # the wall-clock budget of a run

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


# What `onegpu model push` adds to a model repo beside the HF files, and `onegpu model prepare` reads back:
# the litgpt config, the data, the base and the scores (machine-readable), and the training format.
PUSHED_LINEAGE = "onegpu_lineage.json"
PUSHED_FILES = (PUSHED_LINEAGE, "prompt_style.yaml")

TRACKS: dict[str, TrackSpec] = {
    "rtx4090-24gb": TrackSpec("rtx4090-24gb", "NVIDIA GeForce RTX 4090", 24_564, "24h"),
    "a100-40gb": TrackSpec("a100-40gb", "NVIDIA A100-SXM4-40GB", 40_960, "24h"),
}
assert tuple(TRACKS) == get_args(Track)


# ----------------------------------------------------------------------------- atomic writes
# Every file and dir a stage hands over is written under a temp name beside its final name and
# renamed into place, so a kill at any moment leaves the old one or the new one, never half of one.
# The temp name carries the writer (pid and host): the next write in that dir removes the leftovers
# of writers that are gone (killed), and only theirs.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[0-9a-f]{6})\.[A-Za-z0-9_]+\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.{os.getpid()}@{host_id()}."


def remove_stale_temps(final: str | Path) -> list[Path]:
    """Remove the temp files/dirs beside ``final`` whose writers are no longer running; returns them.

    Run before each atomic write, so a killed writer's leftovers (a half-written 14 GB merge, say)
    go the next time anything is written there. A live writer's temp is kept.
    """
    final = Path(final)
    removed = []
    for temp in final.parent.glob(".*.tmp") if final.parent.is_dir() else ():
        match = TEMP_NAME.match(temp.name)
        if match is None or process_alive(int(match["pid"]), host=match["host"]) is not False:
            continue
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        removed.append(temp)
        print(f"[onegpu] removed {temp}: an interrupted run (pid {match['pid']}) left it half-written; it is "
              "written again from the start", file=sys.stderr)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write in any way (``torch.save``, ``savefig``, a zip);
    when the block ends without an exception it is synced to disk and renamed to ``path``.

    The temp name ends in ``.tmp``: writers that pick a format from the suffix must be told it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        # mkstemp makes 0600 files: give the result the mode a plain open() would (other users, e.g.
        # the non-root user of the serving image, must be able to read what root wrote at build)
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        with open(tmp, "rb") as fh:  # the data on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same dir and an atomic rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def atomic_write_json(path: str | Path, doc: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(doc, indent=indent, default=str))


def _temp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final), suffix=".tmp"))
    os.chmod(work, 0o777 & ~_umask())  # mkdtemp makes 0700 dirs; see atomic_path
    return work


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temp dir beside ``final``; on success it replaces ``final`` in one rename.

    On an exception the temp dir is removed and ``final`` is left as it was.
    """
    final = Path(final)
    work = _temp_dir(final)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    os.rename(work, final)


@contextlib.contextmanager
def scratch_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """A temp dir ``PARENT/.NAME.<pid>@<host>.*.tmp`` for work that is never handed over (e.g. the
    folder an upload is made from), removed when the block ends; a killed run's, by the next one."""
    work = _temp_dir(Path(parent) / name)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------- manifest
MANIFEST = "manifest.json"


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """A data dir's ``manifest.json`` (UserError naming the fix when it is missing or broken)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{Path(data_dir)} has no {MANIFEST}", fix="pass the output dir of `onegpu data build`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})", fix="rebuild the data dir with `onegpu data build`") from err
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a JSON object", fix="rebuild the data dir with `onegpu data build`")
    return doc


def write_manifest(data_dir: str | Path, manifest: dict[str, Any]) -> Path:
    return atomic_write_json(Path(data_dir) / MANIFEST, manifest)


# ----------------------------------------------------------------------------------- lineage
ARTIFACT_PREFIX = {"dataset": "data", "model": "model"}


def artifact_name(type: str, stem: str) -> str:
    """The W&B artifact name of a stage's output: ``data-<recipe name>``, ``model-<fine-tune run id>``.

    The one rule: the producing stage logs under this name and every consuming stage records (and,
    online, ``use_artifact``s) the same name. Characters W&B does not allow become ``-``.
    """
    return f"{ARTIFACT_PREFIX[type]}-{re.sub(r'[^A-Za-z0-9._-]', '-', str(stem))}"


def dataset_content_hash(train_sha256: str, val_sha256: str) -> str:
    """A data dir's digest: sha256 over the sha256s of its train.jsonl and val.jsonl bytes."""
    return hashlib.sha256(f"{train_sha256}\n{val_sha256}".encode()).hexdigest()


def dataset_digest(data_dir: str | Path, manifest: dict[str, Any]) -> str:
    """The dataset artifact's digest: the manifest's ``content_hash`` (computed the same way when absent)."""
    if manifest.get("content_hash"):
        return str(manifest["content_hash"])
    shas = []
    for name in ("train.jsonl", "val.jsonl"):
        path = Path(data_dir) / name
        shas.append(hashlib.sha256(path.read_bytes() if path.is_file() else b"").hexdigest())
    return dataset_content_hash(*shas)


def checkpoint_digest(checkpoint: str | Path) -> str:
    """A model checkpoint's digest, cheap even for 7B weights and unchanged by copying.

    The lineage file, config and LoRA adapter are hashed by content (the merged ``lit_model.pth``
    follows from base + adapter); a checkpoint without an adapter (a base model) adds the size and
    mtime of its weights instead of reading gigabytes.
    """
    checkpoint = Path(checkpoint)
    h = hashlib.sha1()
    adapter = (checkpoint / "lit_model.pth.lora").is_file()
    for name in ("onegpu_model.json", "model_config.yaml", "lit_model.pth.lora", "lit_model.pth"):
        p = checkpoint / name
        if not p.is_file():
            continue
        h.update(name.encode())
        if name != "lit_model.pth":
            h.update(p.read_bytes())
        elif not adapter:
            st = p.stat()
            h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def model_input(checkpoint: str | Path) -> dict[str, Any]:
    """How a stage that reads a checkpoint records it: the model artifact's name and digest.

    The name is the one the fine-tune logged (``onegpu_model.json``'s ``model_artifact``); a
    checkpoint no fine-tune made (a prepared base model) is named after its dir.
    """
    checkpoint = Path(checkpoint)
    lineage = read_json(checkpoint / "onegpu_model.json")
    name = lineage.get("model_artifact") or artifact_name("model", lineage.get("wandb_run_id") or checkpoint.name)
    return {"artifact": name, "type": "model", "digest": checkpoint_digest(checkpoint)}


# ---------------------------------------------------------------------------------- run dirs
def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML mapping a user wrote (a recipe, a suite, a sweep, a table): every way it can be wrong is a
    ``UserError`` naming ``what``, the file, the problem (with the line of a syntax error) and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist", fix="check the path (relative paths start where you run)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{what} {path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}",
                        fix="fix the YAML (indentation, a missing colon, an unclosed quote or bracket)") from err
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UserError(f"{what} {path} is a YAML {type(doc).__name__}, not a mapping of keys to values",
                        fix="write it as `key: value` lines")
    return doc


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} when it is missing, unreadable or not an object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL log; a last line cut by a kill mid-write is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands: ``running``, ``finished``, ``stopped`` (SIGTERM / Ctrl-C), ``failed`` (an
    error), ``crashed`` (ended with no exit recorded: SIGKILL, the OOM killer, power loss), ``unknown``
    (no exit recorded, ran on another host) or ``none`` (no run there)."""

    state: str
    stage: str
    last_step: int | None = None  # the last step it logged
    total_steps: int | None = None
    last_alive_at: str | None = None  # its last heartbeat or logged row (UTC)
    started_at: str | None = None
    pid: int | None = None
    exit_code: int | None = None

    @property
    def progress(self) -> str:
        """``after step 7 of 12``, ``before its first step`` (a run with steps), else ''."""
        if self.last_step is None:
            return "before its first step" if self.total_steps else ""
        return f"after step {self.last_step}" + (f" of {self.total_steps}" if self.total_steps else "")

    @property
    def text(self) -> str:
        """``killed after step 7 of 12 (last sign of life 2026-12-05T01:02:03Z, pid 123 is gone)``."""
        if self.state != "crashed":
            return self.state
        when = (f"last sign of life {self.last_alive_at}" if self.last_alive_at
                else f"started {self.started_at}" if self.started_at else "")
        facts = ", ".join(f for f in (when, f"pid {self.pid} is gone" if self.pid else "") if f)
        return " ".join(w for w in ("killed", self.progress, f"({facts})" if facts else "") if w)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("state", "stage", "last_step", "total_steps", "last_alive_at",
                                               "started_at", "pid", "exit_code")}


# The budget clock's heartbeat (onegpu.budget) in a run dir: how long a killed run lived.
HEARTBEAT_FILE = "budget_clock.json"
HEARTBEAT_INTERVAL_S = 2.0  # a crash loses at most this much of the clock; one small JSON write each


def _utc(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


@dataclass
class RunDir:
    """A run directory as every stage writes it (``onegpu.tracking.Run``)."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)  # run.json
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json
    results: dict[str, Any] = field(default_factory=dict)  # results.json (eval stages)

    @classmethod
    def load(cls, path: str | Path) -> "RunDir":
        path = Path(path)
        return cls(path, read_json(path / "run.json"), read_json(path / "summary.json"),
                   read_json(path / "results.json"))

    @property
    def stage(self) -> str:
        return str(self.meta.get("stage") or self.results.get("stage") or "?")

    @property
    def config(self) -> dict[str, Any]:
        config = self.meta.get("config")
        return config if isinstance(config, dict) else {}

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / "metrics.jsonl")

    def status(self) -> RunStatus:
        """How the run ended, or that it still runs: from its exit code, else its process and heartbeat."""
        if not self.meta:
            return RunStatus("none", self.stage)
        rows = self.metrics()
        steps = [r["_step"] for r in rows if isinstance(r.get("_step"), int)]
        beats = read_json(self.path / HEARTBEAT_FILE).get("segments") or [{}]
        beat = beats[-1].get("beat_at")
        last_alive = beat or next((_utc(r["_time"]) for r in reversed(rows) if r.get("_time")), None)
        total = self.config.get("total_steps")
        common = dict(stage=self.stage, last_step=max(steps) if steps else None,
                      total_steps=total if isinstance(total, int) else None, last_alive_at=last_alive,
                      started_at=self.meta.get("started_at"))
        if "exit_code" in self.meta:
            code = self.meta["exit_code"]
            state = "finished" if code == 0 else "stopped" if code in (130, 143) else "failed"
            return RunStatus(state, exit_code=code, **common)
        process = self.meta.get("process") or {}
        alive = process_alive(process.get("pid"), process.get("started"), process.get("host")) if process else None
        if alive is None and beat is not None:  # another host, or no process record: the heartbeat's age
            age = time.time() - calendar.timegm(time.strptime(beat, "%Y-%m-%dT%H:%M:%SZ"))
            alive = age < 10 * HEARTBEAT_INTERVAL_S
        state = {True: "running", False: "crashed", None: "unknown"}[alive]
        return RunStatus(state, pid=process.get("pid"), **common)


SWEEP_STATE = "sweep_state.json"


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Expand run dirs, sweep dirs (their trials) and parents of runs into run dirs, once each."""
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"{path} is not a directory", fix="pass run dirs (with run.json), sweep dirs or eval dirs")
        state = read_json(path / SWEEP_STATE)
        if state.get("trials"):
            out += [Path(t["run_dir"]) for t in state["trials"]
                    if t.get("run_dir") and Path(t["run_dir"], "run.json").is_file()]
        elif (path / "run.json").is_file() or (path / "results.json").is_file():
            out.append(path)
        else:
            below = sorted(p.parent for p in path.glob("*/run.json"))
            if not below:
                raise UserError(f"{path} holds no run (no run.json, results.json or {SWEEP_STATE})",
                                fix="pass the --out dir of an onegpu verb or of `onegpu sweep`")
            out += below
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique
