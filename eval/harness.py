"""The engine of ``onegpu eval val`` (``eval/validate.py``): an lm-eval-harness suite on a checkpoint,
in-process, tracked.

Each task is one ``lm_eval.simple_evaluate`` call on the same loaded model (``eval.lm.LitGPTLM``), and
its result is written to ``<out>/tasks/<task>.json`` as soon as it finishes: a re-run with the same
settings skips finished tasks (resume after an interrupt). ``results.json`` holds the per-task metrics,
each task's primary metric, and ``val_score`` (the mean of the primary metrics); W&B gets them via
lm-eval's ``WandbLogger`` (metrics, per-task sample tables) plus a summary table.

HELM-faithful tasks (``onegpu_helm_*``, ``eval/tasks/helm_mc.py``) generate the answer letter as
HELM does; their exact match and count of format failures (answers that are not one of the
question's letters) are reported beside the likelihood score of the task they mirror
(``helm_gen`` in ``results.json``, the ``helm EM`` and ``fmt fail`` columns of the table). The hidden
eval's generation tasks (``eval/tasks/helm_hidden.py``: MATH, summaries) report their own HELM metric and
format failures in their row.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import wandb
from lm_eval import simple_evaluate
from lm_eval.loggers import WandbLogger
from lm_eval.tasks import TaskManager
from onegpu.eval.lineage import record_checkpoint_lineage, write_scores_to_training_run
from onegpu.eval.lm import LitGPTLM
from onegpu.eval.tasks import offline_include_dir
from onegpu.eval.tasks.helm_mc import is_helm_task, likelihood_twins
from onegpu.eval.tasks.hub import hub_include_dir

from onegpu.checkpoints import CheckpointRef
from onegpu.contracts import atomic_write_json, atomic_write_text, checkpoint_digest
from onegpu.errors import UserError
from onegpu.inference import resolve_device
from onegpu.tables import text_table
from onegpu.threads import set_cpu_threads
from onegpu.tracking import Run

# The metric a task is ranked by, first one present wins (filter suffix included).
PRIMARY_METRICS = ("acc,none", "exact_match,flexible-extract", "exact_match,none", "math_equiv_chain_of_thought,none",
                   "rouge_2,none", "rouge2,none", "f1,none", "bleu,none", "word_perplexity,none")


# ------------------------------------------------------------------------------------ tasks
def task_manager(names: list[str] | None = None):
    """lm-eval's TaskManager with the offline ``onegpu_*`` tasks included when the datasets exist.

    lm-eval's own thousands of task YAMLs are indexed only when a requested name needs them
    (indexing them costs ~20 s on a slow CPU); ``names=None`` always includes them.
    """
    include = offline_include_dir()
    offline_only = include is not None and names is not None and all(n.startswith("onegpu_") for n in names)
    paths = [str(include)] if include else []
    local = {p.stem for p in include.glob("onegpu_*.yaml")} if include else set()
    missing = [n for n in names or [] if n not in local]
    if missing and not _hub_blocked():  # hidden-eval tasks without a local copy: the full files from the hub
        hub = hub_include_dir(missing)
        paths += [str(hub)] if hub else []
    return TaskManager(include_path=paths or None, include_defaults=not offline_only), include


def _hub_blocked() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def check_task_names(names: list[str], manager, include: Path | None) -> None:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    offline = sorted(n for n in known if n.startswith("onegpu_"))
    where = ("offline tasks: " + ", ".join(n for n in offline if not n.startswith(("onegpu_mmlu_", "onegpu_helm_mmlu_")))
             + ", onegpu_mmlu_<subject>, onegpu_helm_mmlu_<subject>") if offline else \
        "no offline tasks (../shared/datasets not found; set ONEGPU_DATA_DIR)"
    raise UserError(f"unknown lm-eval task(s): {'; '.join(hints)}",
                    fix=f"use lm-eval task names (`lm-eval ls tasks`) or {where}")


# ------------------------------------------------------------------------------------ results
def primary_metric(metrics: dict[str, Any]) -> tuple[str | None, float | None]:
    for key in PRIMARY_METRICS:
        if isinstance(metrics.get(key), (int, float)):
            return key, float(metrics[key])
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and "stderr" not in key and key != "alias":
            return key, float(value)
    return None, None


def _merge(into: dict | None, part: dict) -> dict:
    if into is None:
        return json.loads(json.dumps(part, default=str))
    for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "group_subtasks"):
        if isinstance(part.get(key), dict):
            into.setdefault(key, {}).update(json.loads(json.dumps(part[key], default=str)))
    return into


def task_summary(name: str, result: dict, wall_s: float) -> dict[str, Any]:
    """One task's entry in ``results.json``: its metrics, primary metric, size, shots (+ format failures)."""
    metrics = {k: v for k, v in result["results"].get(name, {}).items() if k != "alias"}
    key, value = primary_metric(metrics)
    n = result.get("n-samples", {}).get(name, {}).get("effective")
    summary = {"metrics": metrics, "primary_metric": key, "primary": value, "n": n,
               "num_fewshot": result.get("n-shot", {}).get(name), "wall_s": round(wall_s, 2)}
    if n is not None and isinstance(metrics.get("format_failure,none"), (int, float)):
        summary["format_failures"] = round(metrics["format_failure,none"] * n)  # a mean of 0/1 over n answers
    return summary


def helm_gen_report(per_task: dict[str, dict]) -> dict[str, Any]:
    """``helm_gen``: per HELM-faithful task, its exact match and format failures beside the likelihood
    score of the task it mirrors (when that ran too); ``helm_gen_score``: mean exact match."""
    report = {}
    for name, task in per_task.items():
        if not is_helm_task(name) or task["primary_metric"] != "exact_match,none":
            continue  # HELM-faithful generation tasks (MATH, summaries) report their own metric
        twin = next((t for t in likelihood_twins(name) if t in per_task), None)
        report[name] = {"likelihood_task": twin, "likelihood": per_task[twin]["primary"] if twin else None,
                        "exact_match": task["primary"],
                        "quasi_exact_match": task["metrics"].get("quasi_exact_match,none"),
                        "format_failures": task.get("format_failures"), "n": task["n"]}
    ems = [r["exact_match"] for r in report.values() if r["exact_match"] is not None]
    return {"helm_gen": report, "helm_gen_score": sum(ems) / len(ems) if ems else None,
            "format_failures": sum(r["format_failures"] or 0 for r in report.values()) if report else None}


TABLE_HEADER = ["task", "metric", "value", "helm EM", "fmt fail", "n", "shots"]


def table_rows(per_task: dict[str, dict], helm_gen: dict[str, dict]) -> list[list[Any]]:
    """One row per task; a HELM-faithful task shares the row of the likelihood task it mirrors."""
    by_twin = {g["likelihood_task"]: g for g in helm_gen.values() if g["likelihood_task"]}
    rows = []
    for name, t in per_task.items():
        if name in helm_gen and helm_gen[name]["likelihood_task"]:
            continue  # shown on its twin's row
        gen = helm_gen.get(name) or by_twin.get(name)
        value = None if name in helm_gen else _round(t["primary"])
        failures = gen or (t if t.get("format_failures") is not None else None)
        rows.append([name, t["primary_metric"], value, _round(gen["exact_match"]) if gen else None,
                     f"{failures['format_failures']}/{failures['n']}" if failures else None, t["n"], t["num_fewshot"]])
    return rows


def summary_keys(per_task: dict[str, dict], val_score: float | None, helm_gen: dict[str, Any]) -> dict[str, Any]:
    """W&B summary: val_score, val/<task> (primary), val/<task>/format_failures, helm_gen_score, format_failures."""
    keys: dict[str, Any] = {"val_score": val_score, **{f"val/{n}": t["primary"] for n, t in per_task.items()}}
    for name, t in per_task.items():
        if t.get("format_failures") is not None:
            keys[f"val/{name}/format_failures"] = t["format_failures"]
    if helm_gen["helm_gen"]:
        keys.update(helm_gen_score=helm_gen["helm_gen_score"], format_failures=helm_gen["format_failures"])
    return keys


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def summary_table(rows: list[list[Any]]) -> str:
    return text_table(TABLE_HEADER, rows, cell=lambda v: "-" if v is None else str(v))


# ------------------------------------------------------------------------------------ the run
def run_suite(ref: CheckpointRef, spec: dict[str, Any], entries: list[dict[str, Any]], out: Path, started: float, *,
              batch_size: int, prompt_style: str, device: str | None, dtype: str | None, seed: int,
              log_samples: bool, fresh: bool, num_threads: int | None) -> dict:
    """``onegpu eval val`` (its options and input checks: ``eval/validate.py``): the suite's ``entries`` on the
    checkpoint, tracked in ``out``; returns what ``results.json`` holds."""
    ckpt, base = ref.path, ref.base
    manager, include = task_manager([e["task"] for e in entries])
    check_task_names([e["task"] for e in entries], manager, include)
    if resolve_device(device).type == "cpu":
        print(f"[onegpu] {set_cpu_threads(num_threads)}", flush=True)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    digest = checkpoint_digest(ckpt)
    config = {"checkpoint": str(ckpt), "base_checkpoint": str(base) if base else None, "suite": spec["name"],
              "suite_path": spec["path"], "tasks": entries, "batch_size": batch_size, "prompt_style": prompt_style,
              "device": device, "dtype": dtype, "seed": seed, "checkpoint_digest": digest}
    with Run("eval-val", out, config, tags=["eval", "lm-eval", spec["name"]],
             after_interrupt=f"the tasks it finished are reused ({out / 'tasks'}; --fresh to redo them)") as run:
        lineage = record_checkpoint_lineage(run, ckpt)
        load_model = functools.partial(LitGPTLM, ckpt, batch_size=batch_size, device=device, dtype=dtype,
                                       prompt_style=prompt_style)
        per_task, merged, samples = _evaluate_tasks(
            entries, load_model, manager, run, out, {"checkpoint_digest": digest, "prompt_style": prompt_style},
            seed=seed, log_samples=log_samples, fresh=fresh)

        val_score = _mean_primary(per_task)
        helm_gen = helm_gen_report(per_task)
        results = {"stage": "eval-val", "suite": spec["name"], "checkpoint": str(ckpt),
                   "checkpoint_digest": digest, "checkpoint_lineage": lineage, "prompt_style": prompt_style,
                   "tasks": per_task, "val_score": val_score, **helm_gen, "wall_s": round(time.time() - started, 2),
                   "lm_eval_version": _version("lm_eval")}
        atomic_write_json(out / "results.json", results)
        atomic_write_json(out / "lm_eval_results.json", merged, indent=1)
        _log_scores(run, ckpt, lineage, per_task, val_score, helm_gen)
        _wandb_lm_eval(merged, samples)
        _print_summary(per_task, val_score, helm_gen)
        print(f"\nresults: {out / 'results.json'}")
        return results


def _evaluate_tasks(entries: list[dict], load_model, manager, run, out: Path, run_settings: dict[str, Any],
                    seed: int, log_samples: bool, fresh: bool) -> tuple[dict[str, dict], dict | None, dict]:
    """(per-task summaries, lm-eval's merged results, samples), task by task in order. A task an earlier run
    saved in ``out/tasks`` with the same settings is reused; any other is evaluated and saved as it finishes."""
    lm = None  # loaded on the first task that is not already done (a resumed run may need none)
    merged: dict | None = None
    per_task: dict[str, dict] = {}
    samples: dict[str, list] = {}
    for i, entry in enumerate(entries):
        name = entry["task"]
        settings = {**run_settings, **entry}
        saved = out / "tasks" / f"{name}.json"
        done = None if fresh else _earlier_result(saved, settings)
        if done is not None:
            print(f"[onegpu] [{i + 1}/{len(entries)}] {name}: done in an earlier run, reusing "
                  f"{saved} (--fresh to redo)", file=sys.stderr)
        else:
            print(f"[onegpu] [{i + 1}/{len(entries)}] {name} (limit={entry.get('limit')}, "
                  f"num_fewshot={entry.get('num_fewshot', 'task default')})", file=sys.stderr, flush=True)
            t0 = time.time()
            if lm is None:
                lm = load_model()
            result, task_samples = _run_lm_eval(lm, entry, manager, seed, log_samples)
            done = {"settings": settings, "summary": task_summary(name, result, wall_s=time.time() - t0),
                    "lm_eval": result}
            if log_samples:
                _write_samples(out / "samples" / f"{name}.jsonl", task_samples.get(name, []))
                samples.update(task_samples)
            atomic_write_json(saved, done, indent=1)  # the file that marks the task done: whole or absent
            metrics = done["summary"]["metrics"]
            run.log({f"val/{name}/{m}": v for m, v in metrics.items() if isinstance(v, (int, float))}, step=i)
        merged = _merge(merged, done["lm_eval"])
        per_task[name] = done["summary"]
    return per_task, merged, samples


def _earlier_result(saved: Path, settings: dict[str, Any]) -> dict | None:
    """A task's saved ``{settings, summary, lm_eval}`` when it was made with exactly these settings."""
    if not saved.is_file():
        return None
    previous = json.loads(saved.read_text(encoding="utf-8"))
    return previous if previous.get("settings") == settings else None


def _run_lm_eval(lm, entry: dict[str, Any], manager, seed: int, log_samples: bool) -> tuple[dict, dict]:
    """One ``lm_eval.simple_evaluate`` call on one suite entry: (its result, its samples taken out of it)."""
    name = entry["task"]
    try:
        result = simple_evaluate(
            model=lm, tasks=[name], num_fewshot=entry.get("num_fewshot"), limit=entry.get("limit"),
            gen_kwargs=entry.get("gen_kwargs"), task_manager=manager, log_samples=log_samples,
            bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (ConnectionError, OSError) as err:
        raise UserError(f"task {name} could not load its dataset: {err}",
                        fix="hub tasks need network access (unset HF_DATASETS_OFFLINE); offline, use "
                            "--suite offline or onegpu_* tasks") from err
    task_samples = (result or {}).pop("samples", {}) or {}
    return result, task_samples


def _write_samples(path: Path, samples: list) -> None:
    atomic_write_text(path, "".join(json.dumps(s, default=str) + "\n" for s in samples))


def _mean_primary(per_task: dict[str, dict]) -> float | None:
    """``val_score``: the mean of the tasks' primary metrics."""
    primaries = [t["primary"] for t in per_task.values() if t["primary"] is not None]
    return sum(primaries) / len(primaries) if primaries else None


def _log_scores(run, ckpt: Path, lineage: dict, per_task: dict[str, dict], val_score: float | None,
                helm_gen: dict[str, Any]) -> None:
    """The W&B summary table and keys; the scores copied to the fine-tune run too."""
    run.log_table("val_summary", TABLE_HEADER, table_rows(per_task, helm_gen["helm_gen"]))
    keys = summary_keys(per_task, val_score, helm_gen)
    run.summary(**keys)
    write_scores_to_training_run(ckpt, lineage, {"val/score": val_score,
                                                 **{k: v for k, v in keys.items() if k.startswith("val/")}})


def _print_summary(per_task: dict[str, dict], val_score: float | None, helm_gen: dict[str, Any]) -> None:
    """The per-task table, with the mean scores below it."""
    score_row = ["val_score (mean)", "", _round(val_score), "", "", "", ""]
    gen_row = ["helm_gen_score (mean)", "", "", _round(helm_gen["helm_gen_score"]),
               helm_gen["format_failures"], "", ""]
    rows = table_rows(per_task, helm_gen["helm_gen"]) + [score_row] + ([gen_row] if helm_gen["helm_gen"] else [])
    print("\n" + summary_table(rows))


def _wandb_lm_eval(merged: dict | None, samples: dict) -> None:
    """lm-eval's own W&B logger on our (already started) run: metric tables and sample tables."""
    try:
        if wandb.run is None or merged is None:
            return
        logger = WandbLogger()
        logger.post_init(merged)
        logger.log_eval_result()
        if samples:
            logger.log_eval_samples(samples)
    except Exception as err:  # W&B extras must never fail an evaluation
        print(f"[onegpu] note: lm-eval WandbLogger failed ({err}); results.json is complete", file=sys.stderr)


def _version(module: str) -> str | None:
    try:
        return metadata.version(module.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None
