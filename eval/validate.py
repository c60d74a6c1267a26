"""``onegpu eval val``: an lm-eval-harness suite on a checkpoint, in-process, tracked.

The model is ``eval.lm.LitGPTLM`` (lm-eval model name ``onegpu``): the litgpt checkpoint runs as
is, no HF conversion. A suite is a YAML list of lm-eval tasks with per-task ``limit``,
``num_fewshot`` and ``gen_kwargs`` (``eval/suites/``); offline tasks (``onegpu_*``) read the local
dataset copies, hub tasks download as usual.

This module is the verb's options and its input checks (checkpoint, suite); the run itself, resumable
task by task, is ``eval/harness.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from onegpu.contracts import read_yaml
from onegpu.errors import UserError, did_you_mean
from onegpu.eval.tasks.helm_mc import is_helm_task
from onegpu.checkpoints import locate_checkpoint

SUITES_DIR = Path(__file__).resolve().parent / "suites"


# ------------------------------------------------------------------------------------ suites
def known_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(suite: str) -> dict[str, Any]:
    """A suite by name (``eval/suites/NAME.yaml``) or path -> {name, description, tasks: [...]}."""
    path = Path(suite).expanduser()
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = SUITES_DIR / f"{suite}.yaml"
    if not path.is_file():
        raise UserError(f"unknown suite {suite!r}",
                        fix=did_you_mean(suite, known_suites())
                        + f"use one of: {', '.join(known_suites())}, or the path of a suite YAML")
    spec = read_yaml(path, "suite")
    defaults = spec.get("defaults") or {}
    tasks = []
    for entry in spec.get("tasks") or []:
        entry = {"task": entry} if isinstance(entry, str) else dict(entry)
        if "task" not in entry:
            raise UserError(f"suite {path} has a task entry without `task:`: {entry}",
                            fix="write each entry as {task: NAME, limit: N, num_fewshot: K}")
        tasks.append({**defaults, **entry})
    if not tasks:
        raise UserError(f"suite {path} lists no tasks", fix="add a `tasks:` list")
    return {"name": path.stem, "path": str(path), "description": spec.get("description", ""), "tasks": tasks}


# ------------------------------------------------------------------------------------ the verb
def validate(checkpoint: Path | None = None, suite: str = "offline", out: Path = Path("runs/eval-val"),
             tasks: list[str] | None = None, limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 8, prompt_style: str = "auto", device: str | None = None,
             dtype: str | None = None, seed: int = 1234, log_samples: bool = True, fresh: bool = False,
             num_threads: int | None = None) -> dict:
    """Run an lm-eval suite on a litgpt checkpoint; writes ``results.json`` and a W&B run in ``out``.

    Args:
        checkpoint: litgpt checkpoint dir (merged), or a LoRA dir with ``lit_model.pth.lora`` +
            ``hyperparameters.yaml`` (merged in memory with the base it names), or
            ``wandb:ENTITY/PROJECT/model-RUNID:latest`` (a logged model artifact; online W&B).
        suite: suite name (offline, quick, helm-open, helm-hidden, helm-hidden-proxy...) or a suite YAML path.
        out: run dir for ``results.json``, per-task results, samples and the W&B run.
        tasks: run these lm-eval tasks instead of the suite's (e.g. ``[onegpu_gsm8k,mmlu_anatomy]``).
        limit: instances per task, overriding the suite (None = the suite's own limits).
        num_fewshot: few-shot examples per task, overriding the suite and the task defaults.
        batch_size: requests per forward pass (loglikelihood) or per decode batch (generation).
        prompt_style: ``auto`` (the checkpoint's prompt_style.yaml, else raw), ``raw``, or a litgpt
            prompt style name. Applied to generation contexts only; loglikelihood (multiple choice)
            requests are always scored raw, as lm-eval does for every model.
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: cuda when available).
        dtype: ``float32``, ``bfloat16``, ``float16`` (default: bf16 on GPUs that support it, fp16 on older
            GPUs, fp32 on CPU; the server's rule, onegpu.inference.default_dtype).
        seed: lm-eval's random/numpy/torch/few-shot seeds.
        log_samples: keep per-instance samples (``samples/<task>.jsonl`` and W&B sample tables).
        fresh: ignore per-task results from an earlier, interrupted run in ``out``.
        num_threads: CPU threads for torch (default: ``OMP_NUM_THREADS`` if set, else the cores free at
            start; ignored on GPUs).
    """
    started = time.time()
    if checkpoint is None:
        raise UserError("no checkpoint given", fix="pass --checkpoint DIR (a litgpt checkpoint or LoRA output dir)")
    ref = locate_checkpoint(checkpoint)  # validate before anything heavy
    spec = load_suite(suite)
    entries = _suite_entries(spec, tasks, limit, num_fewshot)
    from onegpu.eval.harness import run_suite  # the engine: torch, lm_eval and wandb load here, not for --help

    return run_suite(ref, spec, entries, Path(out), started, batch_size=batch_size, prompt_style=prompt_style,
                     device=device, dtype=dtype, seed=seed, log_samples=log_samples, fresh=fresh,
                     num_threads=num_threads)


def _suite_entries(spec: dict[str, Any], tasks: list[str] | None, limit: int | None,
                   num_fewshot: int | None) -> list[dict[str, Any]]:
    """The entries to run: ``tasks`` instead of the suite's when given, with ``limit`` and ``num_fewshot`` set."""
    entries = [{"task": t} for t in tasks] if tasks else spec["tasks"]
    for entry in entries:
        if limit is not None:
            entry["limit"] = limit
        if num_fewshot is not None and not is_helm_task(entry["task"]):  # HELM's shots are in its prompt
            entry["num_fewshot"] = num_fewshot
    return entries
