"""The engine of ``onegpu eval helm`` (``eval/helm.py``): HELM against our own server, tracked.

On one machine, as the organizers did: ``onegpu serve`` on a free 127.0.0.1 port, wait for ``GET /health``,
``helm-run`` (model ``neurips/local``, base URL from ``HELM_HTTP_MODEL_BASE_URL``) on the conf, then
``helm-summarize``; each run's ``stats.json`` parsed into ``results.json`` and W&B tables.

The server and helm-run each get their own process group and are always stopped on the way out
(SIGTERM, then SIGKILL after a grace period), on Ctrl-C and on SIGTERM to us (the tracked run raises
``RunStopped`` on it) alike, so no server outlives the command.

Caching: HELM's request cache is keyed by model name, not URL, and every checkpoint is
``neurips/local``, so the cache lives inside the run dir (``<out>/helm/prod_env``) and is wiped when
the checkpoint changes; an interrupted run with the same checkpoint resumes (``--skip-completed-runs``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from onegpu.contracts import atomic_write_json, checkpoint_digest
from onegpu.errors import UserError
from onegpu.eval.helm import parse_helm_suite
from onegpu.eval.lineage import record_checkpoint_lineage, write_scores_to_training_run
from onegpu.processes import die_with_parent
from onegpu.submission.launch import free_port, log_tail, start_server, stop_process_group, wait_healthy
from onegpu.tables import text_table
from onegpu.tracking import Run


# ------------------------------------------------------------------------------------ the run
def run_helm(ckpt: Path, conf_name: str, conf_path: Path, entries: list[str], out: Path, bin_dir: Path,
             started: float, *, max_eval_instances: int, num_threads: int, suite: str, server_timeout: float,
             serve_args: list[str], fresh: bool) -> dict:
    """``onegpu eval helm`` (its options and input checks: ``eval/helm.py``): HELM on the conf against
    ``onegpu serve`` on ``ckpt``, tracked in ``out``; returns what ``results.json`` holds."""
    digest = checkpoint_digest(ckpt)
    helm_out = _helm_output_dir(out, ckpt, digest, fresh)
    config = {"checkpoint": str(ckpt), "conf": conf_name, "conf_path": str(conf_path), "entries": entries,
              "max_eval_instances": max_eval_instances, "num_threads": num_threads, "suite": suite,
              "serve_args": serve_args, "checkpoint_digest": digest}
    # SIGTERM raises RunStopped (Run), so the server and helm-run are stopped on the way out, as on Ctrl-C
    with Run("eval-helm", out, config, tags=["eval", "helm", conf_name],
             after_interrupt="the HELM runs it finished are reused (--fresh to redo them)") as run:
        lineage = record_checkpoint_lineage(run, ckpt)
        server_log = out / "server.log"
        reuse_finished_runs(helm_out / "runs" / suite)
        with _helm_server(ckpt, serve_args, server_timeout, server_log, out / "server.json") as base_url:
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
        return results


def run_logged(cmd: list[str], log_path: Path, env: dict, total: int | None = None, desc: str = "") -> int:
    """Run ``cmd`` in its own process group, log to ``log_path``, a progress bar per finished run."""
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
    print(text_table(("scenario", "metric", "value", "runs"), rows, cell=str))
