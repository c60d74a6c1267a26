"""The test proxy: a small HELM-faithful suite scored on the live LoRA weights during fine-tuning.

Validation loss says whether the model fits its own data; it does not say whether the HELM score
moves, and a fine-tune that breaks the answer format loses its test score with a falling loss.
``--proxy_suite NAME --proxy_interval N`` scores, every N optimizer steps and at the end, a fixed,
seeded sample (``--proxy_items`` per task) of the suite's ``onegpu_helm_*`` tasks
(``eval/tasks/helm_mc.py``): HELM's prompt wrapped in the data's prompt style as ``onegpu serve``
wraps it, greedy generation of HELM's ``max_tokens`` cut at its stop sequences, HELM's metric (exact
match; MATH equivalence and ROUGE-2 for the hidden eval's generation tasks, ``--proxy_suite helm-hidden``).
It runs on the training model itself (LoRA unmerged, no checkpoint written), inside the budget
clock, so its time is charged like any other.

``--select best_proxy`` makes the best-scoring evaluation's LoRA weights the ones merged into
``final/`` (kept in ``OUT/proxy/best.pt``, so a resumed run still knows them); ``last`` keeps the
last step's. Ties go to the later step (more training at the same score).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from litgpt.generate.base import generate

from onegpu.contracts import atomic_path, atomic_write_json
from onegpu.errors import UserError
from onegpu.eval.tasks.helm_mc import is_helm_task
from onegpu.eval.tasks.items import HelmItem, helm_mc_items, score_items
from onegpu.eval.validate import known_suites, load_suite
from onegpu.finetune.checkpoint import torch_save, trainable_state_dict

PROXY_SEED = 1234  # fixed, not the training seed: every run is scored on the same items
SERVER_MAX_SEQ_LENGTH = 2048  # `onegpu serve`'s default context (HELM's neurips/local deployment)


def proxy_tasks(suite: str) -> list[str]:
    """The HELM-faithful (``onegpu_helm_*``) tasks of an eval suite (``eval/suites/NAME.yaml``)."""

    tasks = [t["task"] for t in load_suite(suite)["tasks"] if is_helm_task(t["task"])]
    if not tasks:
        usable = [s for s in known_suites() if any(is_helm_task(t["task"]) for t in load_suite(s)["tasks"])]
        raise UserError(f"suite {suite!r} has no HELM-faithful (onegpu_helm_*) task to use as a test proxy",
                        fix=f"use a suite that has some: {', '.join(usable)}")
    return tasks


def load_proxy_items(suite: str | None, per_task: int) -> tuple[HelmItem, ...]:
    """The proxy's fixed items (none without a suite); ``UserError`` for an unknown suite or task."""
    if not suite:
        return ()
    return tuple(helm_mc_items(proxy_tasks(suite), per_task=per_task, seed=PROXY_SEED))


class ProxyEval:
    """Scores the items on a trainer's live model, logs the curve, keeps the best LoRA weights."""

    def __init__(self, trainer: Any, resumed: bool):
        self.trainer = trainer
        self.items = trainer.cfg.proxy
        self.dir = trainer.cfg.checkpoints.out_dir / "proxy"
        self.best: dict[str, Any] | None = None  # {"step", "exact_match"}
        self.seconds = 0.0
        self.evaluations = 0
        best_json = self.dir / "best.json"
        if resumed and best_json.is_file():
            best = json.loads(best_json.read_text(encoding="utf-8"))
            # a best from after the resumed checkpoint belongs to a trajectory that was lost
            self.best = best if best["step"] <= trainer.state.step else None
        elif best_json.is_file():
            best_json.unlink()  # a fresh run in an old dir: the old best is not a candidate

    def maybe_evaluate(self) -> None:
        """Every ``proxy_interval`` steps (the last step's evaluation comes from ``finalize``)."""
        every, step = self.trainer.cfg.eval.proxy_interval, self.trainer.state.step
        if self.items and every and step % every == 0 and step < self.trainer.total_steps:
            self.evaluate()

    def evaluate(self) -> dict[str, Any]:
        """Generate and score every item on the live weights; log ``proxy/*``; remember the best."""

        t0 = time.perf_counter()
        scores = score_items(self.items, self.complete_all())
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.evaluations += 1
        step = self.trainer.state.step
        # a task's HELM metric under its own name (exact_match; MATH equivalence, ROUGE-2 for the hidden eval's)
        metrics = {f"proxy/{task}/{t['metric']}": t["exact_match"] for task, t in scores["tasks"].items()}
        metrics.update({f"proxy/{task}/format_failures": t["format_failures"] for task, t in scores["tasks"].items()})
        metrics.update({"proxy/exact_match": scores["exact_match"], "proxy/format_failures": scores["format_failures"],
                        "proxy/seconds": seconds})
        self.trainer.tracker.log(metrics, step=step)
        if self.best is None or scores["exact_match"] >= self.best["exact_match"]:
            lora = {k: v for k, v in trainable_state_dict(self.trainer.inner).items() if "lora_" in k}
            with atomic_path(self.dir / "best.pt") as tmp:
                torch_save(lora, tmp)
            self.best = {"step": step, "exact_match": scores["exact_match"]}
            atomic_write_json(self.dir / "best.json", self.best)
        print(f"\n[onegpu] proxy at step {step}: exact match {scores['exact_match']:.3f}, "
              f"{scores['format_failures']} format failures, {seconds:.1f}s", file=sys.stderr)
        return scores

    def complete_all(self) -> list[str]:
        """Greedy completions of every item, as ``onegpu serve`` would return them."""

        inner, trainer = self.trainer.inner, self.trainer
        train_length = inner.max_seq_length
        inner.max_seq_length = min(SERVER_MAX_SEQ_LENGTH, inner.config.block_size)
        inner.eval()
        try:
            with torch.no_grad():
                return [complete(inner, trainer.tokenizer, trainer.style, item, trainer.fabric) for item in self.items]
        finally:
            inner.clear_kv_cache()
            inner.max_seq_length = train_length
            inner.train()

    def select_final(self, select: str) -> dict[str, Any]:
        """Load the best evaluation's LoRA weights into the model for ``--select best_proxy``; the summary keys."""

        keys = {"select": select, "proxy_evaluations": self.evaluations, "proxy_s": round(self.seconds, 3),
                "proxy_best_step": self.best and self.best["step"],
                "proxy_best_exact_match": self.best and self.best["exact_match"],
                "final_step": self.trainer.state.step}
        if select == "best_proxy" and self.best is not None and self.best["step"] != self.trainer.state.step:
            lora = torch.load(self.dir / "best.pt", map_location=self.trainer.fabric.device, weights_only=True)
            self.trainer.inner.load_state_dict(lora, strict=False)
            keys["final_step"] = self.best["step"]
            print(f"[onegpu] final/ gets the step-{self.best['step']} weights (best proxy exact match "
                  f"{self.best['exact_match']:.3f}); the last checkpoint keeps step {self.trainer.state.step}",
                  file=sys.stderr)
        return keys


def complete(model: Any, tokenizer: Any, style: Any, item: HelmItem, fabric: Any) -> str:
    """One greedy completion: the prompt in the training prompt style, ``max_tokens`` at most, cut at
    the first stop sequence, EOS ends it (the server's rules). Prompts longer than the context keep
    their end (the question), as much of the in-context examples as fit."""

    ids = tokenizer.encode(style.apply(item.prompt), device=fabric.device)
    ids = ids[-(model.max_seq_length - item.max_tokens):]
    max_returned = len(ids) + item.max_tokens
    model.set_kv_cache(batch_size=1, max_seq_length=max_returned, device=fabric.device)
    with fabric.autocast():
        out = generate(model, ids, max_returned, temperature=0.0, eos_id=tokenizer.eos_id, include_prompt=False)
    model.clear_kv_cache()
    out = out[out != tokenizer.eos_id] if tokenizer.eos_id is not None else out
    text = tokenizer.decode(out)
    cuts = [text.find(s) for s in item.stop if s in text]
    return text[: min(cuts)] if cuts else text


def describe_items(items: tuple[HelmItem, ...]) -> str:
    """One line naming what an evaluation scores (plan mode adds its measured cost)."""
    tasks = sorted({i.task for i in items})
    return f"{len(items)} items ({len(items) // max(1, len(tasks))} per task) of {', '.join(tasks)}"

