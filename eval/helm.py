"""``onegpu eval helm``: the challenge's test harness, HELM, against our own server on a checkpoint.

What the organizers did, on one machine: start ``onegpu serve`` on a free 127.0.0.1 port, wait for
``GET /health``, run ``helm-run`` (model ``neurips/local``, base URL from
``HELM_HTTP_MODEL_BASE_URL``) on a run-spec conf, then ``helm-summarize``; then parse each run's
``stats.json`` into per-run and per-scenario metrics (``results.json``, a W&B table).

The server and helm-run each get their own process group and are always stopped in ``finally``
(SIGTERM, then SIGKILL after a grace period); SIGTERM to us is turned into the same clean-up path
as Ctrl-C, so no server outlives the command. HELM lives in its own virtual env
(``eval/helm_env.py``), created on first use.

Caching: HELM's request cache is keyed by model name, not URL, and every checkpoint is
``neurips/local``, so the cache lives inside the run dir (``<out>/helm/prod_env``) and is wiped when
the checkpoint changes; an interrupted run with the same checkpoint resumes (``--skip-completed-runs``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onegpu.contracts import atomic_write_json
from onegpu.errors import UserError, did_you_mean
from onegpu.processes import die_with_parent
from onegpu.submission.launch import free_port, log_tail, start_server, stop_process_group, wait_healthy

CONFS_DIR = Path(__file__).resolve().parent / "helm_confs"
# Organizers' confs, referenced by name from ../shared/reference/helm (never copied).
REFERENCE_CONFS = {"open-600": "run_specs_full_coarse_600_budget.conf", "open-small": "run_specs.conf"}
# --max_eval_instances default per preset (entries that set their own limit keep it).
DEFAULT_MAX_EVAL = {"offline": 3, "quick": 10, "open-600": 1000, "open-small": 100, "hidden-stock": 1000}
# Headline metric per scenario, first present wins: the ``main_name`` of HELM's schema for the
# scenario, i.e. the column the challenge's published results report (GSM8K "EM" is
# exact_match_indicator, BBQ "EM" is quasi_exact_match, MATH's is the chain-of-thought equivalence).
MAIN_METRICS = {
    "gsm": ("exact_match_indicator", "final_number_exact_match", "exact_match"),
    "summarization_cnndm": ("rouge_2",), "summarization_xsum": ("rouge_2",), "sam_sum": ("rouge_2",),
    "summarization_samsum": ("rouge_2",),
    "math": ("math_equiv_chain_of_thought", "math_equiv"),
    "bbq": ("quasi_exact_match", "exact_match"),
}
FALLBACK_METRICS = ("exact_match", "quasi_exact_match", "rouge_2", "f1_score")


# ------------------------------------------------------------------------------------ confs
def known_confs() -> list[str]:
    return sorted([p.stem for p in CONFS_DIR.glob("*.conf")] + list(REFERENCE_CONFS))


def resolve_conf(conf: str) -> tuple[str, Path]:
    """(preset name or file stem, conf path) for a preset name or a conf file path."""
    path = Path(conf).expanduser()
    if path.is_file():
        return path.stem, path.resolve()
    if conf in REFERENCE_CONFS:
        from onegpu.paths import shared_reference_dir

        ref = shared_reference_dir()
        target = ref / "helm" / REFERENCE_CONFS[conf] if ref else None
        if target is None or not target.is_file():
            raise UserError(f"conf {conf!r} is the organizers' {REFERENCE_CONFS[conf]}, not found under "
                            "../shared/reference/helm", fix="pass the path of that file with --conf")
        return conf, target
    if (CONFS_DIR / f"{conf}.conf").is_file():
        return conf, CONFS_DIR / f"{conf}.conf"
    raise UserError(f"unknown HELM conf {conf!r}",
                    fix=did_you_mean(conf, known_confs())
                    + f"use one of: {', '.join(known_confs())}, or the path of a run-spec .conf file")


def conf_entries(conf_path: Path) -> list[str]:
    return re.findall(r'description:\s*"([^"]+)"', conf_path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------ processes
@contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread, so ``finally`` blocks clean up."""
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_logged(cmd: list[str], log_path: Path, env: dict, total: int | None = None, desc: str = "") -> int:
    """Run ``cmd`` in its own process group, log to ``log_path``, a progress bar per finished run."""
    from tqdm import tqdm

    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, text=True, bufsize=1, start_new_session=True, preexec_fn=die_with_parent())
        try:
            with tqdm(total=total, desc=desc, unit="run", file=sys.stderr, disable=total is None) as bar:
                for line in proc.stdout:
                    log.write(line)
                    if "Writing" in line and re.search(r"/stats\.json\s*$", line):
                        bar.update(1)
            return proc.wait()
        finally:
            stop_process_group(proc, grace=5.0)


# ------------------------------------------------------------------------------------ stats
# Columns the challenge scored beside a scenario's headline metric (eval/compare.py): HELM's
# worst-case robustness / fairness value of it, and the summarisation bias metrics.
BIAS_COLUMNS = {
    "stereotypes_race": "bias_metric:mode=associations,demographic_category=race,target_category=profession",
    "stereotypes_gender": "bias_metric:mode=associations,demographic_category=gender,target_category=profession",
    "representation_race": "bias_metric:mode=representation,demographic_category=race",
    "representation_gender": "bias_metric:mode=representation,demographic_category=gender",
}


def read_run_stats(run_dir: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Test-split (else valid) means from one HELM run's stats.json: unperturbed, and worst-case per
    perturbation (``{"robustness": {metric: value}, "fairness": {...}}``)."""
    stats = json.loads((run_dir / "stats.json").read_text(encoding="utf-8"))
    plain: dict[str, dict[str, float]] = {}
    worst: dict[str, dict[str, dict[str, float]]] = {}
    for stat in stats:
        name = stat.get("name", {})
        if stat.get("mean") is None:
            continue
        split, perturbation = name.get("split", ""), name.get("perturbation")
        if not perturbation:
            plain.setdefault(split, {}).setdefault(name["name"], float(stat["mean"]))
        elif perturbation.get("computed_on") == "worst":
            worst.setdefault(split, {}).setdefault(perturbation.get("name"), {})[name["name"]] = float(stat["mean"])
    split = "test" if "test" in plain else "valid" if "valid" in plain else next(iter(plain), "")
    return plain.get(split, {}), worst.get(split, {})


def scenario_of(run_name: str) -> str:
    return run_name.split(":", 1)[0]


def main_metric(scenario: str, metrics: dict[str, float]) -> tuple[str | None, float | None]:
    for key in MAIN_METRICS.get(scenario, ()) + FALLBACK_METRICS:
        if key in metrics:
            return key, metrics[key]
    return None, None


def run_columns(key: str | None, metrics: dict[str, float], worst: dict[str, dict[str, float]]) -> dict[str, float]:
    """A run's scored columns: main, robustness / fairness (worst case of the main metric), bias."""
    columns = {"main": metrics[key]} if key else {}
    for perturbation in ("robustness", "fairness"):
        if key and key in worst.get(perturbation, {}):
            columns[perturbation] = worst[perturbation][key]
    columns.update({col: metrics[stat] for col, stat in BIAS_COLUMNS.items() if stat in metrics})
    return columns


def parse_helm_suite(suite_dir: Path) -> dict[str, Any]:
    """Per-run metrics and per-scenario means (of each run's headline metric and columns) from a HELM suite dir.

    A scenario's value averages the runs scored by its most preferred headline metric (MATH: the
    chain-of-thought runs when there are any, as the challenge scored them).
    """
    runs: dict[str, Any] = {}
    for stats_path in sorted(suite_dir.glob("*/stats.json")):
        run_dir = stats_path.parent
        spec = json.loads((run_dir / "run_spec.json").read_text(encoding="utf-8")) \
            if (run_dir / "run_spec.json").is_file() else {}
        name = spec.get("name", run_dir.name)
        metrics, worst = read_run_stats(run_dir)
        key, value = main_metric(scenario_of(name), metrics)
        per_instance = run_dir / "per_instance_stats.json"
        n_instances = len({(x.get("instance_id"), x.get("train_trial_index")) for x in
                           json.loads(per_instance.read_text(encoding="utf-8"))}) if per_instance.is_file() else None
        runs[name] = {"scenario": scenario_of(name), "main_metric": key, "main": value, "n_instances": n_instances,
                      "columns": run_columns(key, metrics, worst), "metrics": metrics}
    by_scenario: dict[str, list[dict]] = {}
    for run in runs.values():
        if run["main"] is not None:
            by_scenario.setdefault(run["scenario"], []).append(run)
    scenarios: dict[str, Any] = {}
    for scenario, members in by_scenario.items():
        order = MAIN_METRICS.get(scenario, ()) + FALLBACK_METRICS
        best = min(order.index(r["main_metric"]) for r in members)
        members = [r for r in members if order.index(r["main_metric"]) == best]
        names = sorted({c for r in members for c in r["columns"]})
        columns = {c: sum(r["columns"][c] for r in members if c in r["columns"]) /
                   sum(1 for r in members if c in r["columns"]) for c in names}
        scenarios[scenario] = {"main_metric": order[best], "value": columns["main"], "n_runs": len(members),
                               "columns": columns}
    return {"runs": runs, "scenarios": scenarios}


# ------------------------------------------------------------------------------------ the verb
def helm(checkpoint: Path | None = None, conf: str = "offline", out: Path = Path("runs/eval-helm"),
         max_eval_instances: int | None = None, num_threads: int = 4, suite: str = "onegpu",
         server_timeout: float = 600.0, serve_args: list[str] | None = None, fresh: bool = False) -> dict:
    """Run HELM on a run-spec conf against `onegpu serve` on a checkpoint; writes ``results.json``.

    Args:
        checkpoint: litgpt checkpoint dir, or a LoRA dir (lit_model.pth.lora + hyperparameters.yaml), or
            ``wandb:ENTITY/PROJECT/model-RUNID:latest`` (a logged model artifact; online W&B).
        conf: ``offline`` (HELM synthetic scenarios, no downloads), ``quick`` (one entry per open-eval
            family), ``open-600`` (the organizers' 600-instance open-eval conf), ``open-small`` (their
            older small conf), ``hidden-stock`` (the hidden eval's scenarios stock crfm-helm runs: MATH,
            CNN/DM, XSum for SAMSum), or the path of a run-spec .conf file.
        out: run dir: ``results.json``, the HELM output (``helm/``), server and HELM logs, W&B run.
        max_eval_instances: instances per run entry that sets no limit itself (default per preset:
            offline 3, quick 10, open-600 1000, open-small 100, hidden-stock 1000, other confs 100).
        num_threads: concurrent HELM requests (the server batches them).
        suite: HELM suite name (the folder under ``helm/runs``).
        server_timeout: seconds to wait for the server's ``/health`` before giving up.
        serve_args: extra ``onegpu serve`` options, e.g. ``[--prompt_style,alpaca,--max_batch_size,8]``.
        fresh: delete earlier HELM output in ``out`` instead of resuming completed runs.
    """
    from onegpu.contracts import checkpoint_digest
    from onegpu.eval.validate import record_checkpoint_lineage
    from onegpu.inference import locate_checkpoint
    from onegpu.tracking import Run

    started = time.time()
    if checkpoint is None:
        raise UserError("no checkpoint given", fix="pass --checkpoint DIR (a litgpt checkpoint or LoRA output dir)")
    ckpt = locate_checkpoint(checkpoint).path
    conf_name, conf_path = resolve_conf(conf)
    entries = conf_entries(conf_path)
    if max_eval_instances is None:
        max_eval_instances = DEFAULT_MAX_EVAL.get(conf_name, 100)
    bin_dir = _helm_bin_dir()

    out = Path(out).resolve()
    digest = checkpoint_digest(ckpt)
    helm_out = _helm_output_dir(out, ckpt, digest, fresh)
    config = {"checkpoint": str(ckpt), "conf": conf_name, "conf_path": str(conf_path), "entries": entries,
              "max_eval_instances": max_eval_instances, "num_threads": num_threads, "suite": suite,
              "serve_args": serve_args or [], "checkpoint_digest": digest}
    run = Run("eval-helm", out, config, tags=["eval", "helm", conf_name],
              after_interrupt="the HELM runs it finished are reused (--fresh to redo them)")
    exit_code = 1
    try:
        with sigterm_as_interrupt():
            lineage = record_checkpoint_lineage(run, ckpt)
            server_log = out / "server.log"
            reuse_finished_runs(helm_out / "runs" / suite)
            with _helm_server(ckpt, serve_args or [], server_timeout, server_log, out / "server.json") as base_url:
                env = dict(os.environ, HELM_HTTP_MODEL_BASE_URL=base_url)
                run_cmd = [str(bin_dir / "helm-run"), "--conf-paths", str(conf_path), "--suite", suite,
                           "--max-eval-instances", str(max_eval_instances), "--output-path", str(helm_out),
                           "--local-path", str(helm_out / "prod_env"), "--num-threads", str(num_threads),
                           "--skip-completed-runs"]
                _run_helm(run_cmd, out / "helm-run.log", server_log, env, total=len(entries))
            # the server is stopped: HELM is done with the model, its memory is free for summarizing
            _summarize_helm(bin_dir, suite, helm_out, out / "helm-summarize.log", env)

        parsed, test_score = _scored_suite(helm_out / "runs" / suite, out / "helm-run.log")
        results = {"stage": "eval-helm", "conf": conf_name, "conf_path": str(conf_path), "checkpoint": str(ckpt),
                   "checkpoint_digest": digest, "checkpoint_lineage": lineage, **parsed, "test_score": test_score,
                   "helm_output": str(helm_out), "wall_s": round(time.time() - started, 2)}
        atomic_write_json(out / "results.json", results)
        _log_scores(run, ckpt, lineage, parsed, test_score)
        _print_table(parsed, test_score)
        print(f"\nresults: {out / 'results.json'}")
        exit_code = 0
        return results
    finally:
        run.finish(exit_code=exit_code)


def _helm_bin_dir() -> Path:
    """The HELM env's bin dir (created on first use); a missing helm-run or helm-summarize is a UserError."""
    from onegpu.eval.helm_env import helm_bin_dir

    bin_dir = helm_bin_dir()
    for tool in ("helm-run", "helm-summarize"):
        if not (bin_dir / tool).exists():
            raise UserError(f"{tool} is missing from the HELM env {bin_dir}",
                            fix="run `make helm-venv` (or set ONEGPU_HELM_BIN to a bin dir with crfm-helm)")
    return bin_dir


def _helm_output_dir(out: Path, ckpt: Path, digest: str, fresh: bool) -> Path:
    """``out/helm``, kept only when it holds this checkpoint's earlier output (HELM resumes it) and not ``fresh``."""
    helm_out = out / "helm"
    marker = out / "helm_checkpoint.json"
    if helm_out.exists() and (fresh or not marker.is_file()
                              or json.loads(marker.read_text()).get("digest") != digest):
        shutil.rmtree(helm_out)  # another checkpoint's cached answers must never leak into this score
    helm_out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"checkpoint": str(ckpt), "digest": digest})
    return helm_out


# What helm-run writes for a run, the last file last; it skips a run whose scenario_state, stats and
# per_instance_stats exist (--skip-completed-runs), whole or not.
HELM_RUN_FILES = ("run_spec.json", "scenario_state.json", "stats.json", "per_instance_stats.json")


def reuse_finished_runs(suite_dir: Path) -> None:
    """Keep the runs an earlier, interrupted helm-run finished; remove the ones it left half-written
    (helm-run writes its files in place, so a kill can leave a cut ``per_instance_stats.json`` that it
    would skip as done). Says what it reuses."""
    done = []
    for run_dir in sorted(p for p in suite_dir.glob("*") if p.is_dir()):
        if (run_dir / "scenario_state.json").exists() or (run_dir / "run_spec.json").exists():
            if all(_whole_json(run_dir / name) for name in HELM_RUN_FILES):
                done.append(run_dir.name)
            else:
                shutil.rmtree(run_dir)
                print(f"[onegpu] removed {run_dir}: a HELM run an interrupted helm-run left unfinished; "
                      "helm-run runs it again", file=sys.stderr)
    if done:
        print(f"[onegpu] reusing {len(done)} HELM run(s) an earlier, interrupted helm-run finished "
              f"({', '.join(done)}; --fresh to redo them)", file=sys.stderr)


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


@contextmanager
def _helm_server(ckpt: Path, serve_args: list[str], timeout: float, log_path: Path, info_path: Path):
    """``onegpu serve`` on a free 127.0.0.1 port until the block ends; yields its base URL."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    print(f"[onegpu] starting: onegpu serve --checkpoint {ckpt} --port {port} {' '.join(serve_args)} "
          f"(log: {log_path})", file=sys.stderr, flush=True)
    server = start_server(ckpt, port, log_path, list(serve_args))
    try:
        atomic_write_json(info_path, {"pid": server.pid, "port": port, "url": base_url})
        health = wait_healthy(base_url, server, timeout, log_path=log_path)
        print(f"[onegpu] server ready at {base_url} ({health.get('device')}, {health.get('dtype')})",
              file=sys.stderr, flush=True)
        yield base_url
    finally:
        stop_process_group(server)


def _run_helm(cmd: list[str], log_path: Path, server_log: Path, env: dict, total: int) -> None:
    """helm-run, a progress bar per finished run entry; a failure is a UserError with both logs' tails."""
    print(f"[onegpu] {' '.join(cmd)}", file=sys.stderr, flush=True)
    rc = run_logged(cmd, log_path, env, total=total, desc="helm-run")
    if rc != 0:
        raise UserError(f"helm-run failed (exit {rc}); its log ({log_path}) ends with:\n"
                        f"{log_tail(log_path)}\n--- server log tail ---\n{log_tail(server_log, 15)}",
                        fix="fix the cause in the logs (conf entries, dataset downloads need network)")


def _summarize_helm(bin_dir: Path, suite: str, helm_out: Path, log_path: Path, env: dict) -> None:
    """helm-summarize; a failure is only a warning, since the per-run stats are parsed without it."""
    cmd = [str(bin_dir / "helm-summarize"), "--suite", suite, "--output-path", str(helm_out)]
    rc = run_logged(cmd, log_path, env)
    if rc != 0:
        print(f"[onegpu] warning: helm-summarize failed (exit {rc}), see {log_path}; "
              "per-run stats are still parsed", file=sys.stderr)


def _scored_suite(suite_dir: Path, run_log: Path) -> tuple[dict[str, Any], float | None]:
    """The parsed suite and its test score (the mean of the scenario values); no runs is a UserError."""
    parsed = parse_helm_suite(suite_dir)
    if not parsed["runs"]:
        raise UserError(f"helm-run produced no stats.json under {suite_dir}", fix=f"read {run_log}")
    values = [s["value"] for s in parsed["scenarios"].values()]
    return parsed, sum(values) / len(values) if values else None


def _log_scores(run, ckpt: Path, lineage: dict, parsed: dict, test_score: float | None) -> None:
    """W&B tables (per run, per scenario) and summary; the scores copied to the fine-tune run too."""
    from onegpu.eval.validate import write_scores_to_training_run

    rows = [[name, r["scenario"], r["main_metric"], r["main"], r["n_instances"]] for name, r in parsed["runs"].items()]
    run.log_table("helm_runs", ["run", "scenario", "metric", "value", "instances"], rows)
    run.log_table("helm_scenarios", ["scenario", "metric", "value", "runs"],
                  [[s, v["main_metric"], v["value"], v["n_runs"]] for s, v in parsed["scenarios"].items()])
    scenario_scores = {s: v["value"] for s, v in parsed["scenarios"].items()}
    run.summary(test_score=test_score, **{f"helm/{s}": v for s, v in scenario_scores.items()})
    write_scores_to_training_run(ckpt, lineage, {"test/score": test_score,
                                                 **{f"test/{s}": v for s, v in scenario_scores.items()}})


def _print_table(parsed: dict, test_score: float | None) -> None:
    rows = [(s, v["main_metric"], f"{v['value']:.4f}", str(v["n_runs"])) for s, v in parsed["scenarios"].items()]
    rows.append(("test_score (mean)", "", "-" if test_score is None else f"{test_score:.4f}", ""))
    header = ("scenario", "metric", "value", "runs")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
