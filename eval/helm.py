"""``onegpu eval helm``: the challenge's test harness, HELM, against our own server on a checkpoint.

What the organizers did, on one machine: start ``onegpu serve`` on a free 127.0.0.1 port, wait for
``GET /health``, run ``helm-run`` (model ``neurips/local``, base URL from
``HELM_HTTP_MODEL_BASE_URL``) on a run-spec conf, then ``helm-summarize``; then parse each run's
``stats.json`` into per-run and per-scenario metrics (``results.json``, a W&B table).

This module is the verb's options and input checks (checkpoint, conf, the HELM env) and reads HELM's
output (``parse_helm_suite``); the run itself (server, helm-run, the tracked run) is ``eval/helm_run.py``.
HELM lives in its own virtual env (``eval/helm_env.py``), created on first use.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from onegpu.errors import UserError, did_you_mean
from onegpu.eval.helm_env import helm_bin_dir
from onegpu.checkpoints import locate_checkpoint
from onegpu.paths import shared_reference_dir

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
    started = time.time()
    if checkpoint is None:
        raise UserError("no checkpoint given", fix="pass --checkpoint DIR (a litgpt checkpoint or LoRA output dir)")
    ckpt = locate_checkpoint(checkpoint).path
    conf_name, conf_path = resolve_conf(conf)
    entries = conf_entries(conf_path)
    if max_eval_instances is None:
        max_eval_instances = DEFAULT_MAX_EVAL.get(conf_name, 100)
    bin_dir = _helm_bin_dir()
    from onegpu.eval.helm_run import run_helm  # the engine: W&B (the tracked run) loads here, not for --help

    return run_helm(ckpt, conf_name, conf_path, entries, Path(out).resolve(), bin_dir, started,
                    max_eval_instances=max_eval_instances, num_threads=num_threads, suite=suite,
                    server_timeout=server_timeout, serve_args=serve_args or [], fresh=fresh)


def _helm_bin_dir() -> Path:
    """The HELM env's bin dir (created on first use); a missing helm-run or helm-summarize is a UserError."""
    bin_dir = helm_bin_dir()
    for tool in ("helm-run", "helm-summarize"):
        if not (bin_dir / tool).exists():
            raise UserError(f"{tool} is missing from the HELM env {bin_dir}",
                            fix="run `make helm-venv` (or set ONEGPU_HELM_BIN to a bin dir with crfm-helm)")
    return bin_dir
