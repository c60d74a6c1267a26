"""Experiment tracking shared by every stage: W&B plus local JSONL/CSV copies.

W&B mode (``wandb_mode``): whatever the user or the agent chose wins: ``WANDB_MODE``, a run
started by ``wandb agent`` (``WANDB_SWEEP_ID``: the agent's own settings, online by default), or
``wandb offline`` / ``wandb disabled`` (W&B's settings files; ``wandb online`` only clears them).
Only when nothing says otherwise is it ``offline``, so no stage ever needs an account or a network by default.

Why both: W&B gives dashboards and artifact lineage; the local copies let ``onegpu report`` and
plain pandas work with no account and no network. Offline W&B runs land in ``<run dir>/wandb`` and
can be uploaded later with ``wandb sync <run dir>/wandb/offline-run-*``.

Lineage: offline W&B cannot ``use_artifact`` ("Cannot use artifact when in offline mode"), so each
input is also recorded in the run config under ``lineage`` (artifact name, type, content hash);
``use_artifact`` is called only when online.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping
from importlib import metadata
from pathlib import Path
from typing import Any

from onegpu.contracts import RunDir, RunStatus, atomic_path, atomic_write_json, atomic_write_text, read_json, read_jsonl
from onegpu.errors import RunStopped, UserError, exit_code_of
from onegpu.paths import REPO_ROOT, cache_dir
from onegpu.processes import this_process

# Offline unless the user asked for something else: never require an account or a network.
DEFAULT_WANDB_MODE = "offline"
WANDB_PREFIX = "wandb:"  # a model source that is a W&B model artifact: wandb:ENTITY/PROJECT/NAME:ALIAS


def _wandb():
    """The wandb module, imported when a run talks to W&B: it is an extra (the serving image has none) and
    costs about a second that `--help` and runs with W&B disabled never pay."""
    import wandb  # optional: the `wandb` extra

    return wandb


def own_wandb_service(env: MutableMapping[str, str] = os.environ) -> None:
    """Forget a W&B service inherited from a parent process (wandb puts its address in WANDB_SERVICE).
    A stage on a parent's service has its W&B stream kept by that parent: if the stage is killed, the stream
    stays open ("run ID is in use") and the crash can never be recorded in its W&B run. With its own
    service, a killed stage's run is closed by its service and later marked crashed by `onegpu report`."""
    env.pop("WANDB_SERVICE", None)


def wandb_mode() -> tuple[str, str]:
    """(the W&B mode this process uses, what decided it). Sets ``WANDB_MODE`` only for the default.

    The default is exported so that the stages this process launches agree with it.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED"
    if os.environ.get("WANDB_SWEEP_ID"):  # launched by `wandb agent`: the agent's W&B settings decide
        return _settings_file_mode() or "online", "wandb agent (WANDB_SWEEP_ID)"
    chosen = _settings_file_mode()
    if chosen:
        return chosen, "wandb settings file (`wandb offline` / `wandb disabled`)"
    os.environ["WANDB_MODE"] = DEFAULT_WANDB_MODE
    return DEFAULT_WANDB_MODE, "default (nothing set WANDB_MODE)"


def wandb_online() -> bool:
    """True when this process's W&B runs talk to a server (not offline, disabled or dryrun)."""
    return wandb_mode()[0] not in ("offline", "disabled", "dryrun")


def _settings_file_mode() -> str | None:
    """``mode`` from W&B's settings files (written by ``wandb offline``, cleared by ``wandb online``)."""
    try:
        return _wandb().Settings().read_system_settings().all().get("mode") or None
    except Exception:  # noqa: BLE001 - no wandb, or unreadable settings files: W&B's default, nothing chosen
        return None


def git_sha() -> str | None:
    """The commit of the onegpu checkout (with ``-dirty`` if it has uncommitted changes)."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def download_wandb_artifact(name: str) -> Path:
    """Download a W&B ``model`` artifact (``entity/project/name:alias``) into the cache; online only."""
    if not wandb_online():
        raise UserError(f"model source {WANDB_PREFIX}{name} is a W&B artifact, but W&B is offline here",
                        fix="`wandb login` and set WANDB_MODE=online, or pass the local checkpoint dir")
    target = cache_dir() / "artifacts" / name.replace("/", "--").replace(":", "-")
    try:
        return Path(_wandb().Api().artifact(name, type="model").download(root=str(target)))
    except Exception as err:  # wandb raises CommError/ValueError variants
        raise UserError(f"could not download W&B artifact {name!r}: {err}",
                        fix="check the name (entity/project/name:alias as on its W&B page), `wandb login`, "
                            "network") from err


# Names of secrets, as variables, options or config keys: HF_TOKEN, WANDB_API_KEY, --token, api_key.
SECRET_NAME = re.compile(r"(?:^|[_-])(?:token|api_?key|secret|password|passwd)$", re.IGNORECASE)
REDACTED = "***"


def secret_values() -> list[str]:
    """Values of this process's secret-looking environment variables (HF_TOKEN, WANDB_API_KEY, ...)."""
    return sorted({v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}, key=len, reverse=True)


def _mask(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact_argv(argv: list[str]) -> list[str]:
    """``argv`` with the values of secret-named options (``--token X``, ``--api_key=X``) and of secret
    variables masked."""
    secrets, out, hide_next = secret_values(), [], False
    for arg in argv:
        name, eq, _value = arg.partition("=")
        if hide_next:
            out.append(REDACTED)
        elif arg.startswith("--") and SECRET_NAME.search(name[2:]):
            out.append(f"{name}={REDACTED}" if eq else arg)
        else:
            out.append(_mask(arg, secrets))
        hide_next = arg.startswith("--") and not eq and SECRET_NAME.search(arg[2:]) is not None
    return out


def redact(value: Any) -> Any:
    """A config (dicts, lists, strings) without secrets: values of keys named like one (``api_key: X``),
    of secret-named options in lists of arguments, and of secret variables anywhere."""
    secrets = secret_values()

    def scrub(item: Any, key: str = "") -> Any:
        if isinstance(item, dict):
            return {k: scrub(v, str(k)) for k, v in item.items()}
        if isinstance(item, list):
            items = redact_argv(item) if all(isinstance(v, str) for v in item) else item
            return [scrub(v, key) for v in items]
        if isinstance(item, str) and item and SECRET_NAME.search(key):
            return REDACTED
        return _mask(item, secrets) if isinstance(item, str) else item

    return scrub(value)


@contextlib.contextmanager
def argv_without_secrets() -> Iterator[None]:
    """``sys.argv`` redacted for the block: W&B records the command line in its run files at ``init``."""
    saved = sys.argv
    sys.argv = [saved[0], *redact_argv(saved[1:])] if saved else saved
    try:
        yield
    finally:
        sys.argv = saved


def exact_command() -> str:
    """The command line that re-runs this process as written, shell-quoted.

    ``python -m onegpu VERB ...`` (how the quickstart and sweeps launch verbs) has ``sys.argv[0] ==
    .../onegpu/__main__.py``, which cannot be run; it is recorded as ``onegpu VERB ...``, as is the
    console script. Any other script is recorded as ``python SCRIPT ...``.
    """
    main_module = getattr(sys.modules.get("__main__"), "__spec__", None)
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    if (main_module is not None and main_module.name.split(".")[0] == "onegpu") or Path(argv0).name == "onegpu":
        prog = ["onegpu"]
    elif main_module is not None:  # python -m OTHER
        prog = ["python", "-m", main_module.name.removesuffix(".__main__")]
    elif argv0.endswith(".py") or argv0 == "-c":
        prog = ["python", argv0]
    else:
        prog = [argv0]
    return shlex.join([*prog, *redact_argv(sys.argv[1:])])


def package_versions(names: tuple[str, ...] = (
    "torch", "litgpt", "lightning", "bitsandbytes", "wandb", "lm_eval", "datasets", "transformers",
    "datasketch", "tokenizers",
)) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)


class Run:
    """One tracked run of one stage.

    Writes ``run.json`` (config, git SHA, command, versions, lineage), ``metrics.jsonl`` (every
    ``log`` call, appended and flushed so a killed run keeps its history) and, on ``finish``,
    ``metrics.csv`` and ``summary.json``. Mirrors everything to W&B unless ``WANDB_MODE=disabled``.
    """

    def __init__(
        self,
        stage: str,
        out_dir: str | Path,
        config: dict[str, Any],
        *,
        project: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        resume_id: str | None = None,
        after_interrupt: str = "starting over",
    ):
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.mode, mode_source = wandb_mode()
        self.lineage: list[dict[str, Any]] = []
        self.meta = {
            "stage": stage,
            "git_sha": git_sha(),
            "command": exact_command(),
            "cwd": os.getcwd(),  # relative paths in the command are relative to it
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "process": this_process(),  # tells "still running" from "killed" (RunDir.status)
            "versions": package_versions(),
            "wandb_mode": self.mode,
            "wandb_mode_source": mode_source,
        }
        previous = RunDir.load(self.out_dir).status()
        if previous.state == "crashed":
            self.meta["previous_attempt"] = previous.as_dict()
            print(f"[onegpu] an earlier {previous.stage} run in {self.out_dir} did not finish: {previous.text}; "
                  f"{after_interrupt}", file=sys.stderr)
        elif previous.state == "running" and previous.pid != os.getpid():
            print(f"[onegpu] warning: a {previous.stage} run (pid {previous.pid}) is still writing to {self.out_dir}; "
                  "two runs in one dir overwrite each other's files: stop one, or use another dir", file=sys.stderr)
        self.config = redact(_jsonable(config))
        self._metrics_path = self.out_dir / "metrics.jsonl"
        self._summary: dict[str, Any] = {}
        self._wandb_run = None
        if self.mode != "disabled":
            wandb = _wandb()
            with argv_without_secrets():
                self._wandb_run = wandb.init(
                    project=project or os.environ.get("WANDB_PROJECT", "onegpu"),
                    name=name,
                    group=group,
                    job_type=stage,
                    tags=tags,
                    dir=str(self.out_dir),
                    config={**self.config, "_onegpu": self.meta},
                    id=resume_id,
                    resume="allow" if resume_id else None,
                    settings=wandb.Settings(silent=True, console="off"),
                )
            self.meta["wandb_id"] = self._wandb_run.id
            self.meta["wandb_project"] = self._wandb_run.project
            if self.online:  # where write_back_summary finds the run on the server
                self.meta["wandb_path"] = "/".join(self._wandb_run.path) if isinstance(self._wandb_run.path, list) \
                    else str(self._wandb_run.path)
            self.meta["wandb_dir"] = str(Path(self._wandb_run.dir).parent)
        self._write_run_json()

    # ----------------------------------------------------------------------------------- lineage
    @property
    def online(self) -> bool:
        return self.mode not in ("offline", "disabled", "dryrun")

    def use_input(self, name: str, type: str, digest: str, path: str | Path | None = None) -> None:
        """Record an input (e.g. the ``dataset`` artifact a fine-tune reads) for lineage.

        Always written to the run config; also ``use_artifact`` on W&B when online.
        """
        entry = {"artifact": name, "type": type, "digest": digest, "path": str(path) if path else None}
        self.lineage.append(entry)
        if self._wandb_run is not None:
            self._wandb_run.config.update({"lineage": self.lineage}, allow_val_change=True)
            if self.online:
                try:
                    self._wandb_run.use_artifact(f"{name}:latest", type=type)
                except Exception as err:  # artifact logged by an offline run and never synced
                    print(f"[onegpu] note: could not use_artifact({name}): {err}", file=sys.stderr)
        self._write_run_json()

    def log_artifact(self, path: str | Path, name: str, type: str, metadata: dict[str, Any] | None = None,
                     include: list[str] | None = None, digest: str | None = None) -> str:
        """Log a directory or file as a W&B artifact; returns ``name`` (recorded in run.json too).

        ``name`` comes from ``contracts.artifact_name`` and ``digest`` from ``contracts.dataset_digest`` /
        ``checkpoint_digest``: a consuming stage records the same pair (``use_input``), so lineage
        links by name and digest even offline. ``include``: glob patterns relative to a directory
        ``path``; only matching files go in (so a stage dir's own ``wandb/`` and ``run.json`` stay out).
        """
        path = Path(path)
        self.meta.setdefault("artifacts", []).append({"name": name, "type": type, "digest": digest, "path": str(path)})
        if self._wandb_run is not None:
            art = _wandb().Artifact(name, type=type, metadata=_jsonable({**(metadata or {}), "digest": digest}))
            if path.is_dir() and include:
                for pattern in include:
                    for file in sorted(path.glob(pattern)):
                        if file.is_file():
                            art.add_file(str(file), name=str(file.relative_to(path)))
            elif path.is_dir():
                art.add_dir(str(path))
            else:
                art.add_file(str(path))
            self._wandb_run.log_artifact(art)
        self._write_run_json()
        return name

    # ----------------------------------------------------------------------------------- metrics
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {"_step": step, "_time": round(time.time(), 3), **_jsonable(metrics)}
        with open(self._metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(_jsonable(metrics), step=step)

    def replay_history(self, through_step: int) -> int:
        """Re-log to W&B the rows of ``metrics.jsonl`` up to ``through_step`` that this W&B run lacks.

        For a resumed segment: W&B's service writes an offline run's file in 32 KiB blocks and holds
        the newest history row open, so a SIGKILLed segment's W&B run misses its last rows, while
        ``metrics.jsonl`` (flushed per line) has them. An online resumed run continues at
        ``run.step`` and gets the rows from there; a new offline run gets the whole history, so the
        newest segment's W&B run always has every step the checkpoint has. Returns the rows replayed.
        """
        if self._wandb_run is None:
            return 0
        start = self._wandb_run.step
        by_step: dict[int, list[dict[str, Any]]] = {}
        previous = None
        for row in read_metrics(self._metrics_path):
            step = row.get("_step")
            if not isinstance(step, int) or not start <= step <= through_step:
                continue
            if step != previous and step in by_step:  # logged again by a later segment: its rows win
                by_step[step] = []
            by_step.setdefault(step, []).append({k: v for k, v in row.items() if not k.startswith("_")})
            previous = step
        for step in sorted(by_step):
            for metrics in by_step[step]:
                self._wandb_run.log(metrics, step=step)
        return sum(len(rows) for rows in by_step.values())

    def summary(self, **values: Any) -> None:
        self._summary.update(_jsonable(values))
        if self._wandb_run is not None:
            for key, value in values.items():
                self._wandb_run.summary[key] = _jsonable(value)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A W&B table, mirrored to ``<key>.table.json`` in the run dir."""
        atomic_write_text(self.out_dir / f"{key}.table.json",
                          json.dumps({"columns": columns, "data": _jsonable(rows)}, indent=1))
        if self._wandb_run is not None:
            self._wandb_run.log({key: _wandb().Table(columns=columns, data=_jsonable(rows))})

    def log_image(self, key: str, path: str | Path) -> None:
        if self._wandb_run is not None:
            self._wandb_run.log({key: _wandb().Image(str(path))})

    def finish(self, exit_code: int = 0) -> None:
        """summary.json, metrics.csv, the W&B run's end, then run.json with the exit code: last, so a
        run.json that has one means everything before it was written (``RunDir.status``)."""
        atomic_write_json(self.out_dir / "summary.json", self._summary)
        write_metrics_csv(self._metrics_path, self.out_dir / "metrics.csv")
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None
        self.meta["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.meta["exit_code"] = exit_code
        self._write_run_json()

    def update_summary_file(self, **values: Any) -> None:
        """Change keys of ``summary.json`` after ``finish`` (numbers that are only final then, like the clock)."""
        self._summary.update(_jsonable(values))
        atomic_write_json(self.out_dir / "summary.json", self._summary)

    def __enter__(self) -> "Run":
        """``with Run(...) as run:`` is how a stage runs tracked: its exit code and the W&B run's end are
        recorded however the block ends, a SIGTERM included (it is raised as ``RunStopped``, exit 143)."""
        self._previous_sigterm = _raise_on_sigterm(self.stage)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.finish(exit_code=exit_code_of(exc))
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)

    def _write_run_json(self) -> None:
        atomic_write_json(self.out_dir / "run.json", {**self.meta, "config": self.config, "lineage": self.lineage})


def _raise_on_sigterm(stage: str) -> Any:
    """In the main thread, with SIGTERM at its default: raise ``RunStopped`` on it from now on (the previous
    handler, to restore). A handler someone installed (the trainer's graceful stop) is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def stop(signum: int, frame: Any) -> None:
        raise RunStopped(f"{stage}: stopped by SIGTERM", summary={"stopped_by": "sigterm"})

    return signal.signal(signal.SIGTERM, stop)


def training_run_dir(checkpoint: str | Path, lineage: dict[str, Any]) -> Path | None:
    """The fine-tune run dir that wrote ``checkpoint`` (its ``final/``), from the model's lineage.

    Looks beside the checkpoint, then at the run dir the lineage records; a candidate counts only
    if it is a fine-tune run and, when both record one, its W&B id is the model's.
    """
    candidates = [Path(checkpoint).resolve().parent]
    if lineage.get("run_dir"):
        candidates.append(Path(lineage["run_dir"]))
    for run_dir in candidates:
        meta = read_json(run_dir / "run.json")
        same_run = not (lineage.get("wandb_run_id") and meta.get("wandb_id")) or meta["wandb_id"] == lineage["wandb_run_id"]
        if meta.get("stage") == "finetune" and same_run:
            return run_dir
    return None


def write_back_summary(run_dir: str | Path, values: dict[str, Any], exit_code: int = 0) -> None:
    """Add ``values`` (an eval's ``val/...`` or ``test/...`` scores) to a finished run's summary.

    Always to its ``summary.json`` (what the sweep table and ``onegpu report`` read). On W&B: online,
    the server's run is updated through the API; offline, a short segment with the run's own id is
    written beside its files, so ``wandb sync <run dir>/wandb/offline-run-*`` merges the scores into
    that run (the dashboard's score panels then show them per trial); it ends with ``exit_code``.
    """
    run_dir = Path(run_dir)
    values = _jsonable(values)
    summary = read_json(run_dir / "summary.json")
    atomic_write_json(run_dir / "summary.json", {**summary, **values})
    meta = read_json(run_dir / "run.json")
    mode = wandb_mode()[0]
    if not meta.get("wandb_id") or mode == "disabled":
        return
    wandb = _wandb()
    try:
        if mode == "online" and meta.get("wandb_path"):
            api_run = wandb.Api().run(meta["wandb_path"])
            api_run.summary.update(values)
            api_run.update()
            return
        with argv_without_secrets():
            run = wandb.init(project=meta.get("wandb_project") or os.environ.get("WANDB_PROJECT", "onegpu"),
                             id=meta["wandb_id"], resume="allow", dir=str(run_dir), job_type=meta.get("stage"),
                             reinit="create_new",  # beside the eval's own run, which stays open
                             settings=wandb.Settings(silent=True, console="off"))
        for key, value in values.items():
            run.summary[key] = value
        run.finish(exit_code=exit_code)
    except Exception as err:  # the local summary.json has the scores either way
        print(f"[onegpu] note: could not write the scores to W&B run {meta['wandb_id']}: {err}", file=sys.stderr)


def record_crash(run_dir: str | Path) -> RunStatus | None:
    """A run that ended with no exit recorded (SIGKILL, OOM killer, power loss): say so in its
    ``summary.json`` and W&B run, once, so neither shows it "running" forever.

    The summary gets ``state: crashed``, how far it got (``last_step``, ``total_steps``) and its last
    sign of life. On W&B: online, the server already marks a run whose heartbeats stopped "crashed"
    and these keys are added to its summary; offline, a closing segment with the run's id carries
    them and ends with exit code 1, so after ``wandb sync`` the run is failed, not running. Returns
    the status when it recorded a crash now (None: not crashed, or recorded before).
    """
    run = RunDir.load(run_dir)
    status = run.status()
    if status.state != "crashed":
        return None
    crash = {"state": "crashed", "last_step": status.last_step, "total_steps": status.total_steps,
             "last_alive_at": status.last_alive_at, "stopped_by": "crash"}
    if all(run.summary.get(k) == v for k, v in crash.items()):
        return None  # recorded by an earlier call
    write_back_summary(run.path, crash, exit_code=1)
    return status


def shut_down_wandb() -> None:
    """Wait for W&B's service to finish (e.g. staging a model artifact) now instead of at interpreter exit.

    The budget clock's last heartbeat comes after this, so that time is charged.
    """
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


read_metrics = read_jsonl  # metrics.jsonl rows (a line cut by a kill mid-write is skipped)


def write_metrics_csv(jsonl_path: str | Path, csv_path: str | Path) -> None:
    """Flatten metrics.jsonl into a CSV whose columns are the union of all logged keys."""
    rows = read_metrics(jsonl_path)
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()})
