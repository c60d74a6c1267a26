"""``onegpu sweep``: run a W&B sweep YAML offline on this machine, one trial after another.

The YAML is the one ``wandb sweep`` takes (W&B's schema; see ``sweeps/schema.py``); each trial is
the YAML's ``command`` with W&B's macros (``${env}``, ``${interpreter}``, ``${program}``,
``${args}``, ``${args_no_hyphens}``, ``${args_json}``, ``${args_json_file}``,
``${args_no_boolean_flags}``...) rendered by wandb's own agent code, so a YAML that works here
works with ``wandb agent`` and the other way round. Which parameters a trial gets is a sampler's
job (``GridSampler``, ``RandomSampler``: W&B's engine; ``BayesSampler``: optuna's TPE sampler, the
maintained engine W&B's own Launch scheduler also offers), so the runner itself never branches on
the method.

Before any trial starts, every parameter value the sweep can produce is read as the target verb
reads its command line (``onegpu.cli.parse_verb_args``: ``onegpu finetune``'s, when the command runs it),
and each trial's options go through ``onegpu finetune``'s own ``resolve()``, so a typo or an
impossible combination fails in a second, naming the key, instead of after hours of trials.

Each trial runs in ``OUT/trial-NNN`` (passed as ``--out_dir`` when the verb has one) as an offline
W&B run grouped under the sweep id, with the sweep params + sweep id in its W&B config (through
``WANDB_SWEEP_PARAM_PATH``, the file W&B's agent writes). ``OUT/sweep_state.json`` records every
trial; re-running the same command skips finished and failed trials and re-runs interrupted ones.
A bayes sweep keeps its optuna study in ``OUT/optuna.journal`` (optuna's own journal storage), so a
resumed sweep continues from everything earlier invocations learned.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from onegpu import cli
from onegpu.contracts import SWEEP_STATE, RunDir, atomic_write_json, atomic_write_text, read_json
from onegpu.errors import UserError, did_you_mean
from onegpu.finetune.options import finetune_options
from onegpu.paths import runs_dir
from onegpu.processes import die_with_parent, process_alive, start_time, this_process
from onegpu.sweeps import schema as S
from onegpu.sweeps.samplers import Sampler, sampler_for
from onegpu.tables import text_table
from onegpu.tracking import Run, own_wandb_service

STATE_FILE = SWEEP_STATE
SUMMARY_FILE = "sweep_summary.json"
BEST_FILE = "best.yaml"  # the best finished trial's swept parameters
DONE_STATES = ("finished", "failed", "stopped")  # not re-run on resume (failed: unless --retry_failed)


# ------------------------------------------------------------------------------ command rendering
def _macro_values(params: dict[str, Any], config: dict[str, Any], json_file: Path | None) -> dict[str, list[str]]:
    """W&B's agent macros for one trial (``wandb_agent.Agent._command_run``), offline flavour."""
    # wandb renders the command as `wandb agent` would; it loads in seconds, so not for --help
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    # W&B hands nested parameters to the run as one dict-valued top-level key.
    values = create_sweep_command_args({"args": {k: {"value": v} for k, v in S.nest(params).items()}})
    values["interpreter"] = [sys.executable]  # W&B says "python"; ours is the venv's interpreter
    values["program"] = [str(config["program"])] if config.get("program") else []
    values["env"] = ["/usr/bin/env"] if os.name != "nt" else []
    values["args_json_file"] = [str(json_file)] if json_file else []
    return values


DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # W&B's default


def render_command(config: dict[str, Any], params: dict[str, Any], json_file: Path | None = None) -> list[str]:
    """The argv of one trial: the YAML's ``command`` with W&B's macros filled in."""
    # wandb renders the command as `wandb agent` would; it loads in seconds, so not for --help
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    command = create_sweep_command(list(config.get("command") or DEFAULT_COMMAND))  # ${envvar:NAME}
    values = _macro_values(params, config, json_file)
    argv: list[str] = []
    for chunk in command:
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            name = chunk[2:-1]
            if name not in values:
                raise UserError(f"command: unknown macro {chunk}",
                                fix="W&B knows ${env} ${interpreter} ${program} ${args} ${args_no_hyphens} "
                                    "${args_json} ${args_json_file} ${args_no_boolean_flags} ${args_no_equals}")
            if name == "program" and not values["program"]:
                raise UserError("command uses ${program} but the sweep config has no `program`",
                                fix="add `program: onegpu` (or your script), or drop ${program} from command")
            argv += values[name]
        else:
            argv.append(chunk)
    if not argv:
        raise UserError("command renders to nothing", fix='e.g. command: ["${env}", "onegpu", "finetune", "${args}"]')
    return argv


@dataclass
class Target:
    """The onegpu verb a sweep command runs, if it runs one: its trials are read as ``onegpu`` reads them."""

    words: tuple[str, ...]
    fn: Any
    argv_start: int  # index in the rendered argv where the verb's own arguments begin

    @property
    def name(self) -> str:
        return "onegpu " + " ".join(self.words)

    def options(self) -> list[str]:
        """The verb's option names (``--config`` and ``--help`` aside)."""
        return list(cli.verb_parameters(self.fn))

    def parse(self, argv: list[str]) -> dict[str, Any]:
        """The verb's arguments from ``argv`` (after the verb words), exactly as ``onegpu VERB ARGV`` reads them."""
        return cli.parse_verb_args(self.words, argv)


def find_target(argv: list[str]) -> Target | None:
    """``onegpu VERB ...`` (directly, via ``/usr/bin/env``, or ``python -m onegpu[.cli]``) -> its Target."""
    for i, word in enumerate(argv):
        if Path(word).name == "onegpu" or (word == "-m" and i + 1 < len(argv) and argv[i + 1] in ("onegpu", "onegpu.cli")):
            start = i + 1 if word != "-m" else i + 2
            found = cli.match_verb(argv[start:])
            if found is None:
                raise UserError(f"command runs `onegpu {' '.join(argv[start:start + 2])}`, which is not an onegpu verb",
                                fix="use e.g. onegpu finetune; `onegpu --help` lists the verbs")
            words, _rest = found
            try:
                fn = cli.verb_function(words)
            except (ImportError, AttributeError) as err:
                raise UserError(f"the sweep runs `onegpu {' '.join(words)}`, which is not available here ({err})",
                                fix="install the full onegpu package") from err
            return Target(words, fn, start + len(words))
    return None


def check_command(config: dict[str, Any], points: list[dict[str, Any]], source: str,
                  extra_args: list[str] | None = None) -> Target | None:
    """Read the rendered command of every given point as the target verb reads its command line.

    Raises UserError naming ``parameters.KEY`` (and the value) that the verb rejects.
    """
    target = find_target(render_command(config, points[0]))
    if target is None:
        return None
    options = [*target.options(), "config"]
    for name in sorted({n.split(S.NEST)[0] for n in points[0]}):
        if name not in options:
            raise UserError(f"{source}: parameters.{name}: `{target.name}` has no option --{name}",
                            fix=did_you_mean(name, options, prefix="--") + f"see `{target.name} --help`")

    def parse(point: dict[str, Any]) -> str | None:
        try:
            target.parse(render_command(config, point)[target.argv_start:] + list(extra_args or []))
        except SystemExit:
            return "rejected (see the message above)"
        except UserError as err:
            return err.problem
        return None

    base = points[0]
    error = parse(base)
    if error:
        culprit = next((n for n in base if n in error), None)
        key = f"parameters.{culprit}" if culprit else "command"
        raise UserError(f"{source}: {key}: `{target.name}` rejects `{shlex.join(render_command(config, base)[target.argv_start:])}`: {error}",
                        fix=_value_fix(target, culprit, base[culprit]) if culprit else f"see `{target.name} --help`")
    # One key at a time, so the error names the key; then whole points (combinations).
    seen: set[tuple[str, str]] = set()
    for point in points:
        for name, value in point.items():
            if (name, repr(value)) in seen:
                continue
            seen.add((name, repr(value)))
            error = parse({**base, name: value})
            if error:
                raise UserError(f"{source}: parameters.{name}: `{target.name}` rejects --{name}={value}: {error}",
                                fix=_value_fix(target, name, value))
    for point in points[1:200]:
        error = parse(point)
        if error:
            raise UserError(f"{source}: `{target.name}` rejects the combination {point}: {error}",
                            fix="change the parameters so every combination is valid")
    return target


def resolve_finetune_trial(options: dict[str, Any]) -> None:
    """``onegpu finetune``'s own ``resolve()`` on a trial's options: data, checkpoint, precision vs
    quantization... everything it checks before loading a model."""
    # the engine: torch loads here, not for --help
    from onegpu.finetune.config import resolve

    resolve(finetune_options(**options))


# Verbs whose trials can be resolved before they start: verb words -> a check of the parsed options.
PREFLIGHT_CHECKS = {("finetune",): resolve_finetune_trial}


def preflight(target: Target, config: dict[str, Any], points: list[dict[str, Any]], source: str,
              extra_args: list[str], limit: int = 64) -> None:
    """Put each trial's arguments through the verb's own checks (``PREFLIGHT_CHECKS``), so a
    combination it would reject fails now."""

    check = PREFLIGHT_CHECKS.get(target.words)
    if check is None:
        return
    for point in points[:limit]:
        args = target.parse(render_command(config, point)[target.argv_start:] + extra_args)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                check(args)
        except UserError as err:
            named = {k: v for k, v in point.items() if str(v) in err.problem}
            varied = named or {k: v for k, v in point.items() if k in _varied_names(points)} or point
            keys = ", ".join(f"parameters.{k}={v}" for k, v in varied.items())
            raise UserError(f"{source}: `{target.name}` would reject the trial with {keys}: {err.problem}",
                            fix=err.fix or f"change {keys}") from err


def _varied_names(points: list[dict[str, Any]]) -> set[str]:
    return {k for k in points[0] if len({repr(p.get(k)) for p in points}) > 1}


def _value_fix(target: Target, name: str, value: Any) -> str:
    if value is None:  # W&B's agent renders a YAML null as the text "None"
        return (f"W&B passes null as the text None, which `{target.name}` does not read as null: write the "
                f"string 'null' instead (e.g. values: ['null', ...])")
    return f"use a value `{target.name} --help` accepts for --{name}"


def validation_points(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Points that cover every value a key can take: the grid, or each distribution's range."""
    if config["method"] == "grid":
        return S.grid_points(config)
    flat = S.flat_parameters(config["parameters"])
    reps = {name: S.representative_values(kind, spec) for name, (kind, spec) in flat.items()}
    base = {name: values[0] for name, values in reps.items()}
    points = [base]
    for name, values in reps.items():
        points += [{**base, name: v} for v in values[1:]]
    return points


# ----------------------------------------------------------------------------------- metrics
def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(doc, dict):
        for key, value in doc.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif prefix:
        out[prefix[:-1]] = doc
    return out


def read_metric(run_dir: Path, name: str) -> float | None:
    """A trial's final value of ``name``: its ``summary.json``, else ``results.json``, else the last
    ``metrics.jsonl`` row that has it. Dotted names reach into nested JSON (``results.val.acc``)."""
    run = RunDir.load(run_dir)
    below = [p for pattern in ("*/summary.json", "*/results.json")
             for p in sorted(run.path.glob(pattern)) if "wandb" not in p.parts]
    for doc in (run.summary, run.results, *map(read_json, below)):
        value = _flatten(doc).get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    history = metric_history(run_dir, name)
    return history[-1] if history else None


def metric_history(run_dir: Path, name: str) -> list[float]:
    """Every logged value of ``name`` in ``metrics.jsonl``, in order (W&B's "iterations")."""
    out = []
    for row in RunDir(Path(run_dir)).metrics():
        value = _flatten(row).get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out.append(float(value))
    return out


# ------------------------------------------------------------------------------------- state
@dataclass
class SweepState:
    path: Path
    sweep_id: str
    digest: str
    config: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load_or_new(cls, out: Path, config: dict[str, Any], source: str) -> "SweepState":
        path = out / STATE_FILE
        digest = S.config_digest(config)
        if path.is_file():
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("digest") != digest:
                raise UserError(f"{path} belongs to a different sweep config (digest {doc.get('digest')} != {digest})",
                                fix=f"use a new --out for the changed {source}, or delete {out} to start over")
            return cls(path, doc["sweep_id"], digest, config, doc.get("trials", []))
        return cls(path, "sweep-" + uuid.uuid4().hex[:8], digest, config)

    def save(self) -> None:
        atomic_write_json(self.path, {"sweep_id": self.sweep_id, "digest": self.digest, "config": self.config,
                                      "trials": self.trials})

    def trial(self, index: int) -> dict[str, Any] | None:
        return next((t for t in self.trials if t["index"] == index), None)

    def is_done(self, index: int, retry_failed: bool) -> bool:
        trial = self.trial(index)
        return trial is not None and (trial["state"] == "finished"
                                      or (trial["state"] in DONE_STATES and not retry_failed))


# ------------------------------------------------------------------------------------- trials
def _run_trial(argv: list[str], trial_dir: Path, env: dict[str, str], config: dict[str, Any],
               previous_histories: list[list[float]], on_start=None) -> tuple[int, str | None]:
    """Run one trial to the end (or until hyperband stops it). Returns (exit code, stop reason).

    ``on_start(proc)`` is called once the trial process exists (to record it)."""
    early = config.get("early_terminate")
    metric = config.get("metric", {})
    log_path = trial_dir / "trial.log"
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(argv)}\n")
        log.flush()
        # Own session: Ctrl-C on the sweep is forwarded deliberately, and a stop hits the whole trial tree.
        # SIGINT back to its default in the trial: a sweep started in the background (SIGINT ignored)
        # must still be able to stop its trial gracefully. A sweep killed outright (SIGKILL) has its
        # trial SIGTERMed by the kernel: a fine-tune saves a checkpoint and stops.
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent(also=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
        if on_start is not None:
            on_start(proc)
        try:
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                    return code, None
                except subprocess.TimeoutExpired:
                    pass
                if early:
                    reason = S.hyperband_should_stop(metric_history(trial_dir, metric["name"]), previous_histories,
                                                     early, metric.get("goal", "minimize"))
                    if reason:
                        _stop(proc)
                        return proc.wait(), reason
        except BaseException:
            _stop(proc)
            raise


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGINT first (lets the trial save / finish its W&B run), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _short(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


# ------------------------------------------------------------------------------------- the sweep
def sweep(
    sweep_config: Path,
    out: Path | None = None,
    count: int | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    retry_failed: bool = False,
    dry_run: bool = False,
) -> int:
    """Run a W&B sweep YAML offline on this machine, one trial after another (resumable).

    Args:
        sweep_config: a W&B sweep YAML (``method``, ``metric``, ``parameters``, ``command``...), e.g.
            ``sweeps/lora_rank.yaml``. The same file works with ``wandb sweep`` + ``wandb agent``.
        out: sweep dir: ``sweep_state.json``, ``sweep_summary.json`` and one ``trial-NNN`` dir per
            trial. Default ``runs/sweep-<yaml name>``. Re-running with the same ``out`` resumes.
        count: at most this many trials in this sweep (all of a grid by default; required for
            random and bayes unless the YAML sets ``run_cap``).
        params: constant parameters added to (or replacing) the YAML's, e.g.
            ``--params '{data: runs/quickstart/data}'``; they become part of the sweep config.
        seed: seed for random and bayes draws (the same seed resumes the same sequence).
        retry_failed: on resume, run failed trials again instead of keeping their failure.
        dry_run: validate and print every trial's command without running any.
    """

    source = str(sweep_config)
    cfg = S.load_sweep_config(sweep_config)
    if params:
        cfg = {**cfg, "parameters": {**cfg["parameters"], **{k: {"value": v} for k, v in params.items()}}}
        S.validate_sweep_config(cfg, source=f"{source} + --params")
    sampler = sampler_for(cfg, trial_cap(cfg, count, source), seed)
    out = Path(out) if out else runs_dir() / f"sweep-{Path(sweep_config).stem}"
    launch = Launch.checked(cfg, source, out)  # everything the sweep can produce parses, before any trial
    if dry_run:
        if sampler.preview_note:
            print(sampler.preview_note)
        for i, point in enumerate(sampler.preview()):
            print(f"trial-{i:03d}: {shlex.join(launch.argv(point, out / f'trial-{i:03d}'))}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    state = SweepState.load_or_new(out, cfg, source)
    sampler.open(out, state.sweep_id)
    return run_trials(state, sampler, launch, out, source, retry_failed)


def trial_cap(config: dict[str, Any], count: int | None, source: str) -> int | None:
    """How many trials: the smaller of ``--count`` and the YAML's ``run_cap`` (None: all of a grid)."""
    caps = [c for c in (count, config.get("run_cap")) if c]
    cap = min(caps) if caps else None
    if config["method"] != "grid" and cap is None:
        raise UserError(f"{source}: a {config['method']} sweep never runs out of trials",
                        fix="pass --count N (or set run_cap in the YAML)")
    if cap is not None and cap < 1:
        raise UserError(f"--count {count} must be at least 1", fix="pass --count 1 or more")
    return cap


@dataclass
class Launch:
    """How a trial is started: the YAML's command, plus ``--out_dir`` (and ``--resume=auto`` when an
    interrupted trial runs again) for a verb that has them and a sweep that does not set them."""

    config: dict[str, Any]
    target: Target | None
    out_flag: str | None = None
    resume_flag: str | None = None

    @classmethod
    def checked(cls, config: dict[str, Any], source: str, out: Path) -> "Launch":
        points = validation_points(config)
        launch = cls(config, check_command(config, points, source))
        if launch.target is None:
            return launch
        options = launch.target.options()
        names = {n.split(S.NEST)[0] for n in S.flat_parameters(config["parameters"])}
        literal = " ".join(render_command(config, {}))
        # A re-run of an interrupted trial continues from its last checkpoint when the verb can.
        if "resume" in options and "resume" not in names and "--resume" not in literal:
            launch.resume_flag = "--resume=auto"
        launch.out_flag = next((c for c in ("out_dir", "out")
                                if c in options and c not in names and f"--{c}" not in literal), None)
        extra = [f"--{launch.out_flag}={out / 'trial-000'}"] if launch.out_flag else []
        if launch.out_flag:  # the injected flag must parse too
            check_command(config, points[:1], source, extra)
        preflight(launch.target, config, points, source, extra)
        return launch

    def argv(self, point: dict[str, Any], trial_dir: Path, json_file: Path | None = None,
             rerun: bool = False) -> list[str]:
        argv = render_command(self.config, point, json_file)
        if self.out_flag:
            argv.append(f"--{self.out_flag}={trial_dir}")
            if rerun and self.resume_flag:
                argv.append(self.resume_flag)
        return argv


def run_trials(state: SweepState, sampler: Sampler, launch: Launch, out: Path, source: str,
               retry_failed: bool) -> int:
    """The trials not done yet, in the sweep's tracked run; its summary is recorded however they end."""
    cfg = state.config
    print(f"sweep {state.sweep_id}: {cfg['method']}, {sampler.total} trial(s) -> {out}"
          + (f"; each runs `{launch.target.name}`" if launch.target else ""), flush=True)
    say_what_resumes(state, retry_failed, launch)
    with sigterm_interrupts(), Run("sweep", out / "sweep-run", {"sweep": cfg, "sweep_id": state.sweep_id,
                                                              "source": source},
                                   name=state.sweep_id, group=state.sweep_id,
                                   after_interrupt="resuming it (see above)") as run:
        try:
            trial_loop(state, sampler, launch, out, retry_failed, run)
        except KeyboardInterrupt:
            for trial in state.trials:
                if trial["state"] == "running":
                    trial["state"] = "interrupted"
            state.save()
            print(f"\nsweep interrupted; re-run the same command to resume ({out / STATE_FILE})", file=sys.stderr)
            raise
        finally:
            summary = record_summary(state, out, run)
    print(format_table(summary))
    return 0 if any(t["state"] == "finished" for t in state.trials) else 1


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """A kill of the sweep process becomes KeyboardInterrupt in the block: the running trial is stopped and
    recorded."""
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def trial_loop(state: SweepState, sampler: Sampler, launch: Launch, out: Path, retry_failed: bool, run: Run) -> None:
    """Each trial not done yet: asked from the sampler, run, told, logged; until the last or the metric's target."""
    metric = state.config.get("metric") or {}
    with tqdm(total=sampler.total, desc="trials", unit="trial", dynamic_ncols=True) as bar:
        for index in range(sampler.total):
            if state.is_done(index, retry_failed):
                bar.update(1)
                continue
            trial = run_trial(state, index, sampler.ask(index), launch, out)
            sampler.tell(index, trial)
            run.log({"trial": index, "metric": trial["metric"], "seconds": trial["seconds"],
                     "failed": int(trial["state"] == "failed")}, step=index)
            tqdm.write(f"[{trial['name']}] {trial['state']}" + (f" {metric['name']}={trial['metric']}" if metric else "")
                       + (f" ({trial['note']})" if trial.get("note") else ""))
            bar.update(1)
            if reached_target(metric, trial):
                tqdm.write(f"sweep: {metric['name']}={trial['metric']} reached the target {metric['target']}; stopping")
                break


def record_summary(state: SweepState, out: Path, run: Run) -> dict[str, Any]:
    """``sweep_summary.json`` (and ``best.yaml``), the trials table and the counts in the sweep's run."""
    summary = write_summary(state, out)
    rows = summary["rows"]
    run.log_table("trials", summary["columns"], rows)
    best = summary.get("best")
    run.summary(trials=len(rows), finished=sum(r[1] == "finished" for r in rows),
                failed=sum(r[1] == "failed" for r in rows), best_trial=best and best["name"],
                best_metric=best and best["metric"])
    return summary


def say_what_resumes(state: SweepState, retry_failed: bool, launch: Launch) -> None:
    """On a re-run: which trials are kept and which run again (from their checkpoint when the verb can)."""
    if not state.trials:
        return
    kept = [t["name"] for t in state.trials if state.is_done(t["index"], retry_failed)]
    again = [t["name"] for t in state.trials if not state.is_done(t["index"], retry_failed)]
    how = "continue from their last checkpoint (--resume=auto)" if launch.resume_flag else "start over"
    print(f"sweep {state.sweep_id}: resuming from {state.path}: {len(kept)} trial(s) done and kept"
          + (f" ({', '.join(kept)})" if kept else "")
          + (f"; interrupted, they {how}: {', '.join(again)}" if again else ""), flush=True)


def reached_target(metric: dict[str, Any], trial: dict[str, Any] | None) -> bool:
    """``metric.target`` in the YAML: a trial that reached it ends the sweep."""
    target, value = metric.get("target"), (trial or {}).get("metric")
    if target is None or value is None:
        return False
    return value <= target if metric.get("goal", "minimize") == "minimize" else value >= target


def run_trial(state: SweepState, index: int, point: dict[str, Any], launch: Launch, out: Path) -> dict[str, Any]:
    """Run trial ``index`` with ``point`` in ``OUT/trial-NNN`` and record it in the sweep state."""
    cfg, name = state.config, f"trial-{index:03d}"
    trial_dir = out / name
    trial = state.trial(index)
    if trial is not None:
        wait_for_orphan(trial)
    rerun = trial is not None and trial.get("params") == point  # interrupted (or retried): same params
    if trial is not None and not rerun and trial_dir.exists():  # new params for this index: a fresh dir
        shutil.rmtree(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    if trial is None:
        trial = {"index": index, "name": name}
        state.trials.append(trial)
    trial.update({"params": point, "run_dir": str(trial_dir), "state": "running",
                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    json_file = trial_dir / "sweep_args.json"
    argv = launch.argv(point, trial_dir, json_file, rerun)
    trial["command"] = shlex.join(argv)
    state.save()
    env = trial_env(state, point, trial_dir, json_file)
    flat = S.flat_parameters(cfg["parameters"])
    varied = {k: v for k, v in point.items() if flat[k][0] != "param_single_value"}
    tqdm.write(f"[{name}] {_short(varied or point)}  (log: {trial_dir / 'trial.log'})")
    metric = cfg.get("metric")
    previous = [metric_history(Path(t["run_dir"]), metric["name"]) for t in state.trials
                if t is not trial and t.get("run_dir")] if metric else []
    t0 = time.time()

    def record_process(proc: subprocess.Popen) -> None:
        trial["process"] = {**this_process(), "pid": proc.pid, "started": start_time(proc.pid)}
        state.save()

    code, stop_reason = _run_trial(argv, trial_dir, env, cfg, previous, on_start=record_process)
    trial["seconds"] = round(time.time() - t0, 1)
    trial["returncode"] = code
    trial["metric"] = read_metric(trial_dir, metric["name"]) if metric else None
    if stop_reason:
        trial["state"], trial["note"] = "stopped", stop_reason
    elif code == 0:
        trial["state"] = "finished"
        if metric and trial["metric"] is None:
            trial["note"] = f"exited 0 but logged no {metric['name']!r}"
    else:
        trial["state"] = "failed"
        tail = (trial_dir / "trial.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        trial["note"] = f"exit {code}: " + " | ".join(tail)[-400:]
    state.save()
    return trial


ORPHAN_WAIT_S = 120.0  # a trial SIGTERMed by its dying sweep saves a checkpoint; allow it that long


def wait_for_orphan(trial: dict[str, Any]) -> None:
    """A trial process of an earlier, killed sweep that still runs (saving its checkpoint after the
    kernel's SIGTERM) must end before the trial runs again in the same dir: waited for, then killed."""
    process = trial.get("process") or {}
    if not process_alive(process.get("pid"), process.get("started"), process.get("host")):
        return
    pid = process["pid"]
    print(f"[{trial['name']}] its process {pid} from the interrupted sweep is still stopping; waiting for it "
          f"(up to {ORPHAN_WAIT_S:.0f} s)", file=sys.stderr)
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while time.monotonic() < deadline and process_alive(pid, process.get("started")):
        time.sleep(0.5)
    if process_alive(pid, process.get("started")):
        try:
            os.killpg(pid, signal.SIGKILL)  # the trial leads its own session (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass


def trial_env(state: SweepState, point: dict[str, Any], trial_dir: Path, json_file: Path) -> dict[str, str]:
    """The trial's inputs as W&B's agent hands them over (``${args_json_file}``, the sweep-params
    file ``wandb.init`` merges into the run config) and its environment."""

    atomic_write_text(json_file, json.dumps(S.nest(point)))
    param_file = trial_dir / "sweep_params.yaml"
    atomic_write_text(param_file, yaml.safe_dump({**{k: {"value": v} for k, v in S.nest(point).items()},
                                                  "sweep_id": {"value": state.sweep_id},
                                                  "sweep_trial": {"value": trial_dir.name}}))
    env = {**os.environ, "WANDB_SWEEP_PARAM_PATH": str(param_file), "WANDB_RUN_GROUP": state.sweep_id,
           "ONEGPU_SWEEP_ID": state.sweep_id, "ONEGPU_TRIAL_DIR": str(trial_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    own_wandb_service(env)  # the trial's, not the sweep's: a sweep killed outright keeps the trial's W&B run
    if state.config.get("project"):
        env.setdefault("WANDB_PROJECT", state.config["project"])
    return env


def write_summary(state: SweepState, out: Path) -> dict[str, Any]:
    metric = state.config.get("metric") or {}
    # The swept parameters only; constants are in the config (and every trial's params).
    flat = S.flat_parameters(state.config["parameters"])
    names = [k for k in flat if flat[k][0] != "param_single_value"] or sorted(flat)
    columns = ["trial", "state", *names, metric.get("name", "metric"), "seconds", "note"]
    rows = [[t["name"], t["state"], *[t.get("params", {}).get(n) for n in names], t.get("metric"),
             t.get("seconds"), t.get("note", "")] for t in sorted(state.trials, key=lambda t: t["index"])]
    scored = [t for t in state.trials if t["state"] == "finished" and t.get("metric") is not None]
    best = None
    if scored:
        pick = max if metric.get("goal") == "maximize" else min
        b = pick(scored, key=lambda t: t["metric"])
        best = {"name": b["name"], "metric": b["metric"], "params": b["params"], "run_dir": b["run_dir"]}
    summary = {"sweep_id": state.sweep_id, "method": state.config["method"], "metric": metric,
               "columns": columns, "rows": rows, "best": best,
               "trial_dirs": [t["run_dir"] for t in sorted(state.trials, key=lambda t: t["index"]) if t.get("run_dir")]}
    atomic_write_json(out / SUMMARY_FILE, summary)
    if best:  # the winner's swept values, a config a later run reads (`--config run.yaml --config OUT/best.yaml`)
        values = {n: (None if best["params"].get(n) == "null" else best["params"].get(n)) for n in names}
        atomic_write_text(out / BEST_FILE, f"# {best['name']}: {metric.get('name', 'metric')} = {best['metric']}\n"
                          + yaml.safe_dump(values, sort_keys=False))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The trials table as ``onegpu sweep`` prints it, and the best trial."""
    lines = [text_table(summary["columns"], summary["rows"], max_width=60)]
    best = summary.get("best")
    if best:
        lines.append(f"best: {best['name']} {summary['metric'].get('name')}={best['metric']:.4g} ({best['run_dir']})")
    return "\n".join(lines)
