"""``onegpu finetune``: LoRA / QLoRA fine-tuning of a litgpt checkpoint on a data-stage mix.

The recipe, top to bottom (one readable file, like litgpt's ``finetune/lora.py``; explicit,
versioned state like torchtune's recipes):

* ``resolve`` (``finetune/config.py``): check every option and settle every default, load the data
  once; bad input fails here (``UserError``), before anything heavy;
* ``LoRATrainer.tracked()``: render rows with the data's prompt style, tokenize, and plan
  micro-batches (packed rows: several examples per row, block-diagonal causal attention, positions
  restarting per example; or padded rows; loss on responses only by default); open the tracked
  run (``with Run(...)``); build litgpt's LoRA GPT on Lightning Fabric, load the base weights, quantize the frozen
  base with bitsandbytes for QLoRA (CPU too), AdamW; the LR schedule anchored to the budget
  (``finetune/schedule.py``: warm-up, then cosine to the floor when the budget ends); restore a checkpoint's
  weights, optimizer and ``TrainState`` on ``--resume``;
* ``LoRATrainer.fit()``: the loop: ``train_step`` (gradient accumulation and clipping), honest
  telemetry (non-padding tokens/s, LoRA-correct MFU, memory, budget used / ETA) to W&B and CSV,
  ``maybe_validate``, ``proxy.maybe_evaluate`` (the HELM-faithful test proxy on the live weights,
  ``finetune/proxy.py``), ``maybe_save`` (atomic checkpoints; ``--resume auto`` continues exactly);
  stops on the budget clock with a reserve for the end;
* ``LoRATrainer.finalize()``: validation, the test proxy, a last checkpoint, ``--select``'s weights
  (last, or the best proxy step's) into ``out/final/`` = merged litgpt
  checkpoint + ``lit_model.pth.lora`` + ``hyperparameters.yaml`` + ``prompt_style.yaml`` +
  ``onegpu_model.json``; sample generations; a W&B ``model`` artifact with lineage to the
  dataset; the curves plot and the summary.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from litgpt.generate.base import generate
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.prompts import save_prompt_style
from litgpt.scripts.merge_lora import merge_lora
from litgpt.tokenizer import Tokenizer
from litgpt.utils import copy_config_files
from tqdm import tqdm

from onegpu.budget import HEARTBEAT_FILE, format_duration
from onegpu.contracts import artifact_name, checkpoint_digest, staged_dir
from onegpu.data.schema import get_prompt_style
from onegpu.errors import RunStopped, UserError
from onegpu.finetune import checkpoint as ckpt_io, disk, telemetry
from onegpu.finetune.checkpoint import TrainState, trainable_state_dict
from onegpu.finetune.config import FinetuneConfig, resolve
from onegpu.finetune.disk import human
from onegpu.finetune.options import FinetuneOptions, LoRAArgs
from onegpu.finetune.packing import MicroBatches, batch_to, forward_hidden, loss_sum, tokenize_rows, use_flex_attention
from onegpu.finetune.proxy import ProxyEval
from onegpu.finetune.quantize import quantize_frozen_linears
from onegpu.finetune.schedule import BudgetSchedule
from onegpu.inference import export_hf
from onegpu.threads import set_cpu_threads
from onegpu.tracking import Run, shut_down_wandb, wandb_online

# Fixed prompts for the sample-generation table: same prompts in every run, so runs compare.
SAMPLE_PROMPTS = (
    "Give three tips for staying healthy.",
    "What is the capital of France? Answer in one sentence.",
    "Explain what a neural network is to a ten-year-old.",
)


def train(options: FinetuneOptions) -> dict[str, Any]:
    """``onegpu finetune``: resolve the options, then set up, train and finalize; returns the run summary."""
    return LoRATrainer(resolve(options)).run()


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean loss per response token over the step's micro-batches
    grad_norm: float  # before clipping
    lr: float  # the learning rate the step used


class LoRATrainer:
    """One fine-tuning run of a resolved config: ``tracked()`` (set-up inside the tracked run) -> ``fit()``
    -> ``finalize()``.

    ``run()`` does all three. Plan mode (``finetune/planning/plan.py``) opens ``tracked()`` and calls
    ``train_step()`` on batches of its choosing. ``state`` (a ``TrainState``) is what a checkpoint
    restores; ``tracked()`` sets the rest, in this order: ``data`` (the micro-batches) and
    ``total_steps``, ``tracker``, ``fabric``, ``model`` / ``inner`` (the unwrapped GPT),
    ``optimizer``, ``meter`` (throughput). The LR schedule lives in ``state.schedule``.
    """

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.state = TrainState(clock=cfg.clock)
        self.tracker = None  # the tracked run (onegpu.tracking.Run), opened by tracked()
        self.disk_sizes = None  # what the run writes (finetune/disk.py), sized by check_disk()
        self.step_time_ema: float | None = None  # predicts the next step for the budget clock
        self.steps_this_segment = 0  # since this process started (the ETA's rate)
        self.last_save = time.monotonic()
        self.val_row_losses: list[float] | None = None  # the last validation's, row by row
        self.sigterm = SigtermFlag()  # replaced by a live one while run() trains

    def run(self) -> dict[str, Any]:
        """Set-up, fit and finalize inside the tracked run, which records the exit code however it ends.

        The budget clock's heartbeat runs from before the set-up to after the tracked run is closed
        (``charged``), so loading, validation and finalize are all charged. SIGTERM stops training at
        the next step boundary: a checkpoint is saved and ``RunStopped`` raised (the CLI exits 143 =
        128 + SIGTERM); the flag is raised over finalize too, so a merge under way is finished.
        """
        with self.charged() as outcome, stop_on_sigterm() as self.sigterm, self.tracked("finetune"):
            self.cfg.clock.size_reserve()  # from the load time just measured
            summary = self.finalize(self.fit())
            outcome["ended"] = summary["stopped_by"]
        return summary

    @contextlib.contextmanager
    def charged(self) -> Iterator[dict[str, str]]:
        """The budget clock's heartbeat around the whole run, W&B's shutdown included; the segment ends
        as the run did (its ``stopped_by``; ``failed`` on an error)."""

        clock, checkpoints = self.cfg.clock, self.cfg.checkpoints
        clock.start_heartbeat(checkpoints.out_dir / HEARTBEAT_FILE, continue_run=checkpoints.resume is not None)
        outcome = {"ended": "failed"}
        try:
            yield outcome
        except RunStopped as stop:
            outcome["ended"] = stop.summary["stopped_by"]
            raise
        finally:
            shut_down_wandb()
            clock.stop_heartbeat(ended=outcome["ended"])
            if self.tracker is not None:  # the clock up to the last heartbeat, W&B's shutdown included
                self.tracker.update_summary_file(**clock.summary())

    # ------------------------------------------------------------------------------------- setup
    @contextlib.contextmanager
    def tracked(self, stage: str = "finetune") -> Iterator[Any]:
        """The set-up, and the tracked run of ``stage`` (``onegpu.tracking.Run``) for the block.

        The data plan comes first (a bad input opens no run), then the run, Fabric, model, optimizer and
        the resumed state. The run records the block's exit code and ends its W&B run however it ends.
        """
        checkpoint = self.plan_inputs(stage)
        with self.open_run(stage, checkpoint) as self.tracker:
            self.build_and_resume(checkpoint)
            yield self.tracker

    def plan_inputs(self, stage: str) -> dict[str, Any] | None:
        """Threads, the checkpoint to resume from (loaded), the tokenizer and prompt style, the data plan and
        (for a fine-tune) the disk check. Returns the checkpoint (None: a fresh start)."""

        cfg = self.cfg
        if cfg.model.device == "cpu" or cfg.model.num_threads:
            print(f"[onegpu] {set_cpu_threads(cfg.model.num_threads)}", flush=True)
        self.resume_from = self.resume_path()
        checkpoint = ckpt_io.load(self.resume_from) if self.resume_from else None
        self.say_what_resume_found(self.resume_from)
        self.tokenizer = Tokenizer(cfg.model.checkpoint_dir)
        self.style = get_prompt_style(cfg.data.prompt_style)
        self.plan_data()
        if stage == "finetune":
            self.check_disk(steps_done=checkpoint["train_state"]["step"] if checkpoint else 0)
        return checkpoint

    def build_and_resume(self, checkpoint: dict[str, Any] | None) -> None:
        """In the tracked run: Fabric, model, optimizer, the test proxy; a checkpoint's state restored."""

        cfg = self.cfg
        if checkpoint is not None:
            self.state.load_state_dict(checkpoint["train_state"])  # counters; the clock's new segment starts now
            self.tracker.replay_history(through_step=self.state.step)
        self.build()
        self.proxy = ProxyEval(self, resumed=checkpoint is not None)
        if checkpoint is not None:
            self.inner.load_state_dict(checkpoint["model"], strict=False)
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            print(f"[onegpu] resumed from {self.resume_from} at step {self.state.step}/{self.total_steps} "
                  f"({format_duration(cfg.clock.elapsed_before_s)} of the budget already used)", file=sys.stderr)
        self.start_telemetry()
        if checkpoint is not None:  # last: building the model drew random numbers
            ckpt_io.set_rng_state(self.state.rng)

    def resume_path(self) -> Path | None:
        resume = self.cfg.checkpoints.resume
        if resume == "auto":
            return ckpt_io.latest(self.cfg.checkpoints.out_dir / "checkpoints")
        return Path(resume).expanduser() if resume else None

    def say_what_resume_found(self, resume_path: Path | None) -> None:
        """``--resume auto``: name the checkpoint it continues from, or say that it starts fresh."""

        cfg = self.cfg
        if cfg.checkpoints.resume != "auto":
            return
        if resume_path is not None:
            found = f"found {resume_path} (step {int(resume_path.name.split('-')[-1])})"
        else:
            found = f"no checkpoint in {cfg.checkpoints.out_dir / 'checkpoints'}, starting fresh"
        clock = cfg.clock
        charged = (f"; {clock.segments - 1} earlier segment(s) of this run charged: "
                   f"{format_duration(clock.elapsed_before_s)}" if clock.earlier else "")
        print(f"[onegpu] --resume auto: {found}{charged}", file=sys.stderr)

    def plan_data(self) -> None:
        """Tokenize the rows, skip examples that truncation left without a response token, plan micro-batches."""

        cfg = self.cfg
        msl = cfg.data.max_seq_length
        train = tokenize_rows(cfg.dataset.train_rows, self.style, self.tokenizer, msl, cfg.data.train_on_prompt)
        usable = [e for e in train if e.n_loss_tokens > 0]
        if not usable:
            raise UserError("no training example has a response token left after truncation",
                            fix=f"raise --max_seq_length (now {msl}) or shorten the prompts")
        self.n_truncated = sum(e.truncated for e in train)
        self.n_no_loss = len(train) - len(usable)
        if self.n_no_loss:
            print(f"[onegpu] {self.n_no_loss} training examples lost every response token to truncation at "
                  f"{msl} tokens; they are skipped (counted in summary.json as examples_no_loss_tokens)",
                  file=sys.stderr)
        val = tokenize_rows(cfg.dataset.val_rows[: cfg.eval.eval_max_examples], self.style, self.tokenizer, msl,
                            cfg.data.train_on_prompt)
        self.val_examples = [e for e in val if e.n_loss_tokens > 0]
        self.data = MicroBatches(usable, msl, cfg.train.micro_batch_size, cfg.data.packing, cfg.train.seed,
                                 pad_multiple=8 if cfg.model.device == "cuda" else 1)
        self.steps_per_epoch = max(1, self.data.per_epoch // cfg.train.accumulation)
        self.total_steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * self.steps_per_epoch))
        self.state.schedule = BudgetSchedule(cfg.train.warmup_steps, self.total_steps, cfg.train.min_lr_ratio)

    def check_disk(self, steps_done: int) -> None:
        """Refuse to start (exit 2, with the numbers) when the disk cannot hold what the run will write."""

        self.disk_sizes = disk.config_sizes(self.cfg)
        need = disk.run_need(self.cfg.checkpoints, self.disk_sizes, self.total_steps, steps_done)
        disk.check(need, "this fine-tune", fix="free that much space, or write less: a smaller --keep_last, "
                   "--export_hf false, --merge false (final/ keeps the LoRA adapter, to merge later), or "
                   "--out_dir (and WANDB_DATA_DIR for W&B's copy) on a larger disk")
        print(f"[onegpu] disk: this run writes up to {need.describe()}", file=sys.stderr)

    def open_run(self, stage: str, checkpoint: dict[str, Any] | None) -> Any:
        cfg = self.cfg
        config = {**cfg.flat(), "gradient_accumulation": cfg.train.accumulation, "total_steps": self.total_steps,
                  "budget_s": cfg.clock.budget_s, "budget_reserve_s": cfg.clock.reserve_s}
        # The chain follows the segments (the heartbeat file), not the checkpoint: a segment killed
        # before its first checkpoint is still the one the next segment continues.
        previous_id = cfg.clock.previous_segment().get("wandb_id") or (checkpoint or {}).get("wandb_id")
        if previous_id:
            config["resumed_from_wandb_id"] = previous_id
        # Online, a resumed segment continues the same W&B run. Offline, a SIGKILLed run's id can
        # still be held by its orphaned W&B service ("run ID is in use"), so a new offline run is
        # started and linked through `resumed_from_wandb_id`; metrics.jsonl stays one file.
        after = ("continuing it (--resume)" if cfg.checkpoints.resume else
                 "starting over; to continue from its last checkpoint instead, run the same command with "
                 "--resume auto")
        run = Run(stage, cfg.checkpoints.out_dir, config, project=cfg.logging.wandb_project,
                  name=cfg.logging.run_name, resume_id=previous_id if wandb_online() else None,
                  after_interrupt=after)
        run.use_input(cfg.dataset.name, "dataset", cfg.dataset.digest, cfg.dataset.path)
        cfg.clock.note(wandb_id=run.meta.get("wandb_id"), resumed_from_wandb_id=previous_id)
        cfg.clock.beat()  # the chain link is on disk before the model loads
        return run

    def build(self) -> None:
        """Fabric, the LoRA model (QLoRA-quantized if asked) and the optimizer."""

        cfg = self.cfg
        self.fabric = L.Fabric(accelerator=cfg.model.device, devices=1, precision=cfg.model.precision)
        self.fabric.seed_everything(cfg.train.seed, verbose=False)
        model = build_model(self.fabric, cfg.model.checkpoint_dir, cfg.lora, cfg.model.quantize,
                            cfg.data.max_seq_length, cfg.model.precision)
        self.trainable_params, self.total_params = telemetry.count_parameters(model)
        self.shapes = telemetry.linear_shapes(model)
        self.model = self.fabric.setup_module(model)
        self.inner = self.model.module if hasattr(self.model, "module") else self.model
        self.flex = cfg.data.packing and use_flex_attention(self.inner)
        self.params = [p for p in self.inner.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg.train.optimizer, self.params, cfg.train.learning_rate, cfg.train.weight_decay)
        self.optimizer = self.fabric.setup_optimizers(optimizer)

    def start_telemetry(self) -> None:
        self.peak_flops, self.peak_flops_source, peak_details = telemetry.device_peak_flops(
            self.fabric.device, self.cfg.model.precision, remeasure=self.cfg.logging.remeasure_peak)
        self.meter = telemetry.Throughput(self.shapes, self.peak_flops)
        self.tracker.summary(
            trainable_params=self.trainable_params, total_params=self.total_params, peak_flops=self.peak_flops,
            peak_flops_source=self.peak_flops_source, peak_flops_measurement=peak_details, train_examples=len(self.data.examples),
            train_tokens_per_epoch=sum(self.data.lengths), examples_truncated=self.n_truncated,
            examples_no_loss_tokens=self.n_no_loss, steps_per_epoch=self.steps_per_epoch,
            attention="flex" if self.flex else "sdpa", cpu_threads=torch.get_num_threads())
        print(f"[onegpu] {self.trainable_params:,} trainable / {self.total_params:,} parameters; "
              f"{len(self.data.examples)} examples, {self.data.per_epoch} micro-batches per epoch, {self.total_steps} "
              f"steps; MFU peak: {self.peak_flops / 1e12:.2f} TFLOP/s ({self.peak_flops_source})", file=sys.stderr)

    # --------------------------------------------------------------------------------------- fit
    def fit(self) -> str:
        """The training loop: optimizer steps until max_steps/epochs are done or the budget says stop.

        Returns why it stopped: ``max_steps``, ``epochs``, ``budget``, or a SIGTERM (``early_terminate``/``preempted``).
        """

        cfg, state = self.cfg, self.state
        stopped_by = "max_steps" if cfg.train.max_steps else "epochs"
        self.bar = tqdm(total=self.total_steps, initial=state.step, desc="finetune", disable=not cfg.logging.progress,
                        unit="step", dynamic_ncols=True, file=sys.stderr)
        self.last_save = time.monotonic()
        if cfg.eval.initial_validation and state.step == 0:
            self.validate()  # the base model's val loss: where the curve starts
        self.model.train()
        if state.step == 0:
            self.proxy.maybe_evaluate()  # the base model's score starts the proxy curve
        while state.step < self.total_steps:
            if self.sigterm.received:
                stopped_by = self.sigterm.stopped_by
                print(f"\n[onegpu] SIGTERM: saving a checkpoint at step {state.step} and stopping ({stopped_by})",
                      file=sys.stderr)
                break
            if cfg.clock.should_stop(next_step_s=self.step_time_ema or 0.0):
                stopped_by = "budget"
                print(f"\n[onegpu] {cfg.clock.stop_reason}", file=sys.stderr)
                break
            t0 = time.perf_counter()
            batches = [self.data[state.micro_index + j] for j in range(cfg.train.accumulation)]
            result = self.train_step(batches)
            self.record_step(batches, result, time.perf_counter() - t0)
            self.maybe_log(result)
            self.bar.update(1)
            self.maybe_validate()
            self.proxy.maybe_evaluate()
            self.maybe_save()
        self.bar.close()
        return stopped_by

    def train_step(self, batches: list[dict[str, Any]]) -> StepResult:
        """One optimizer step over collated micro-batches (gradient accumulation over the list).

        The loss is summed over response tokens and divided by the response tokens of the whole
        step, so packing, padding and accumulation all give the same loss.
        """

        cfg, fabric = self.cfg, self.fabric
        denom = max(1, sum(b["n_loss_tokens"] for b in batches))
        step_loss = 0.0
        for j, b in enumerate(batches):
            tb = batch_to(b, fabric.device)
            with fabric.no_backward_sync(self.model, enabled=j < len(batches) - 1), fabric.autocast():
                hidden = forward_hidden(self.inner, tb, flex=self.flex, neftune_alpha=cfg.train.neftune_alpha,
                                        activation_checkpointing=cfg.train.activation_checkpointing)
                loss, _ = loss_sum(self.inner, hidden, tb["labels"])
            fabric.backward(loss / denom)
            step_loss += loss.item()
            del hidden, loss  # the graph dies here, not during the next micro-batch's forward (int8 keeps inputs on it)
        if cfg.train.max_norm > 0:
            grad_norm = float(fabric.clip_gradients(self.model, self.optimizer, max_norm=cfg.train.max_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in self.params if p.grad is not None])))
        clock = cfg.clock
        lr = cfg.train.learning_rate * self.state.schedule.factor(self.state.step, clock.elapsed_s,
                                                                   clock.train_deadline_s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        return StepResult(step_loss / denom, grad_norm, lr)

    def record_step(self, batches: list[dict[str, Any]], result: StepResult, seconds: float) -> None:
        for b in batches:
            self.meter.add_micro_batch(b)
        self.meter.add_step_time(seconds)
        self.step_time_ema = seconds if self.step_time_ema is None else 0.8 * self.step_time_ema + 0.2 * seconds
        self.steps_this_segment += 1
        self.state.record_step(batches, result.loss)
        self.cfg.clock.note(step=self.state.step)

    def maybe_log(self, result: StepResult) -> None:
        """Telemetry every ``log_interval`` steps and at the last step."""

        st, clock = self.state, self.cfg.clock
        if st.step % self.cfg.logging.log_interval and st.step != self.total_steps:
            return
        rates = self.meter.rates()
        remaining_train_s = max(0.0, clock.train_deadline_s - clock.elapsed_s)
        schedule = st.schedule
        metrics = {
            "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "schedule/progress": schedule.progress, "schedule/bound_by_budget": float(schedule.bound == "budget"),
            "schedule/warmup_steps": (schedule.warmup_steps if schedule.warmup_end_step is None
                                      else schedule.warmup_end_step),
            "schedule/expected_steps": schedule.expected_steps(st.step, clock.elapsed_s, clock.train_deadline_s,
                                                               self.step_time_ema),
            "epoch": st.micro_index / self.data.per_epoch, **rates, "tokens_seen": st.tokens,
            "loss_tokens_seen": st.loss_tokens, "examples_seen": st.examples, "padding_slots_seen": st.slots - st.tokens,
            "wall_clock_s": clock.elapsed_s, "budget_used_pct": 100 * clock.used_fraction,
            "eta_s": clock.eta_s(self.steps_this_segment, self.total_steps - st.step),
            "projected_tokens_by_deadline": st.tokens + rates["tokens_per_s"] * remaining_train_s,
            **{f"mem/{k}": v for k, v in telemetry.memory_stats(self.fabric.device).items()},
        }
        self.tracker.log(metrics, step=st.step)
        self.bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{rates['tokens_per_s']:.0f}",
                             mfu=f"{rates['mfu']:.1%}", budget=f"{100 * clock.used_fraction:.1f}%")
        self.meter.reset_window()

    def maybe_validate(self) -> None:
        """Validation loss every ``eval_interval`` steps (the last step's comes from finalize)."""
        every, step = self.cfg.eval.eval_interval, self.state.step
        if every and step % every == 0 and step < self.total_steps:
            self.validate()

    def maybe_save(self) -> None:
        """A checkpoint every ``save_interval`` steps or ``save_interval_minutes`` (the last one: finalize)."""
        ckpt, step = self.cfg.checkpoints, self.state.step
        due_steps = ckpt.save_interval and step % ckpt.save_interval == 0
        due_time = ckpt.save_interval_minutes and time.monotonic() - self.last_save >= 60 * ckpt.save_interval_minutes
        if (due_steps or due_time) and step < self.total_steps:
            try:
                self.save_checkpoint()
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.say_disk_full(err)  # training goes on; the next interval tries again
            self.last_save = time.monotonic()

    def say_disk_full(self, err: OSError) -> None:
        root = self.cfg.checkpoints.out_dir / "checkpoints"
        kept = ckpt_io.latest(root)
        print(f"\n[onegpu] warning: the checkpoint of step {self.state.step} was not saved: {err.strerror} "
              f"({human(shutil.disk_usage(root).free)} free on {root}); the previous checkpoint "
              f"{kept or '(none yet)'} is kept whole. Training goes on and saves again at the next interval; "
              "free space on that disk.", file=sys.stderr)

    def save_checkpoint(self) -> Path:
        st, ckpt = self.state, self.cfg.checkpoints
        state = {"model": ckpt_io.trainable_state_dict(self.inner), "optimizer": self.optimizer.state_dict(),
                 "train_state": st.state_dict(),
                 "wandb_id": self.tracker.meta.get("wandb_id")}
        meta = {"step": st.step, "total_steps": self.total_steps, "micro_index": st.micro_index,
                "budget": self.cfg.clock.state_dict(), "train_state_version": st.VERSION,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return ckpt_io.save(ckpt.out_dir / "checkpoints", st.step, state, meta, ckpt.keep_last)

    def validate(self) -> float | None:
        """Mean validation loss per response token on the first ``eval_max_examples`` val rows (logged)."""

        if not self.val_examples:
            return None
        cfg, fabric, inner = self.cfg, self.fabric, self.inner
        batches = MicroBatches(self.val_examples, cfg.data.max_seq_length, cfg.train.micro_batch_size,
                               cfg.data.packing, seed=0)
        total, count, per_row = 0.0, 0, []
        inner.eval()
        with torch.no_grad(), fabric.autocast():
            for i in range(batches.per_epoch):
                b = batch_to(batches[i], fabric.device)
                hidden = forward_hidden(inner, b, flex=self.flex)
                for row in range(hidden.shape[0]):
                    s, n = loss_sum(inner, hidden[row:row + 1], b["labels"][row:row + 1])
                    total += s.item()
                    count += n
                    if n:
                        per_row.append(round(s.item() / n, 5))
        inner.train()
        val = total / max(1, count)
        # The same rows every time (seed 0), so two runs' lists pair up: the report's noise estimate.
        self.val_row_losses = per_row
        st = self.state
        st.best_val_loss = val if st.best_val_loss is None else min(st.best_val_loss, val)
        self.tracker.log({"val_loss": val, "val_ppl": math.exp(min(val, 50))}, step=st.step)
        return val

    # ---------------------------------------------------------------------------------- finalize
    def finalize(self, stopped_by: str) -> dict[str, Any]:
        """After the loop: validation, a last checkpoint, the merged ``final/``, samples, plot, summary."""

        cfg, st, clock = self.cfg, self.state, self.cfg.clock
        t_end = time.perf_counter()
        if stopped_by in SIGNAL_STOPS:
            self.stop_without_final(stopped_by)
        if stopped_by == "budget" and st.step == 0:
            self.fail_without_steps()
        val_loss = self.validate()
        if self.proxy.items:
            self.proxy.evaluate()
        if cfg.checkpoints.final_checkpoint:
            self.save_final_checkpoint()  # `--resume auto` after the end (or after a budget stop) starts from here
        self.check_disk_for_final()
        selected = self.proxy.select_final(cfg.checkpoints.select)  # may load the best proxy step's weights
        final_dir = self.write_final()
        samples = self.generate_samples() if cfg.eval.num_samples else []
        plot = telemetry.plot_training_curves(cfg.checkpoints.out_dir)
        if plot is not None:
            self.tracker.log_image("training_curves", plot)
        summary = {
            "steps": st.step, "total_steps": self.total_steps, "stopped_by": stopped_by,
            "final_loss": st.history[-1] if st.history else None,
            "first_loss": st.history[0] if st.history else None, "val_loss": val_loss,
            "tokens_seen": st.tokens, "loss_tokens_seen": st.loss_tokens, "examples_seen": st.examples,
            "packing_efficiency_overall": st.tokens / max(1, st.slots), "final_dir": str(final_dir),
            "finalize_s": round(time.perf_counter() - t_end, 3),
            "val_row_losses": self.val_row_losses,
            "peak_memory_gib": telemetry.peak_memory_gib(self.fabric.device), "n_samples": len(samples),
            **selected, **clock.summary(),
        }
        self.tracker.summary(**summary)
        kept = "merged checkpoint" if cfg.checkpoints.merge else "LoRA adapter"
        clock.note(finalize_s=summary["finalize_s"])
        print(f"[onegpu] done: {st.step} steps ({stopped_by}), loss {summary['first_loss']} -> "
              f"{summary['final_loss']}, val_loss {val_loss}; {kept}: {final_dir}", file=sys.stderr)
        if stopped_by == "budget":
            print(f"[onegpu] stopped by the budget clock after {st.step}/{self.total_steps} steps, "
                  f"{format_duration(max(0.0, clock.remaining_s))} of the budget left after the merge. "
                  f"Continue with --resume auto and a larger --budget.", file=sys.stderr)
        return summary

    def save_final_checkpoint(self) -> None:
        """The end-of-training checkpoint; a full disk here is an error naming the checkpoint that is kept."""

        try:
            self.save_checkpoint()
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = ckpt_io.latest(self.cfg.checkpoints.out_dir / "checkpoints")
            raise UserError(f"the disk is full ({err.strerror}): the checkpoint of the last step "
                            f"({self.state.step}) could not be saved and final/ was not written; the newest "
                            f"checkpoint on disk is {kept or '(none)'}, whole",
                            fix="free space on that disk, then run the same command with --resume auto: it "
                                "continues from that checkpoint") from err

    def check_disk_for_final(self) -> None:
        """Before the merge: room for final/ (and W&B's copy), else stop with the last step's checkpoint kept."""

        cfg = self.cfg
        need = disk.final_need(cfg.checkpoints, self.disk_sizes or disk.config_sizes(cfg))
        if not need.shortfalls():
            return
        kept = ckpt_io.latest(cfg.checkpoints.out_dir / "checkpoints")
        if kept is None or kept.name != f"step-{self.state.step:06d}":  # --final_checkpoint false: save it now
            self.save_final_checkpoint()
            kept = ckpt_io.latest(cfg.checkpoints.out_dir / "checkpoints")
        disk.check(need, "final/ (the merge)",
                   fix=f"nothing trained is lost: the LoRA weights and optimizer of step {self.state.step} are in "
                       f"{kept}. Free that much space, then run the same command with --resume auto: it merges "
                       "without training more. Or add --merge false to it: final/ then holds only the LoRA "
                       "adapter (small), which `litgpt merge_lora OUT/final` merges later")

    def stop_without_final(self, stopped_by: str) -> None:
        """SIGTERM: a checkpoint (no validation, no merge: a scheduler's grace period is short), the summary."""
        st = self.state
        checkpoint = self.save_checkpoint()
        summary = {"steps": st.step, "total_steps": self.total_steps, "stopped_by": stopped_by,
                   "checkpoint": str(checkpoint), "final_loss": st.history[-1] if st.history else None,
                   "tokens_seen": st.tokens, **self.cfg.clock.summary()}
        self.tracker.summary(**summary)
        raise RunStopped(f"stopped by SIGTERM ({stopped_by}) at step {st.step}/{self.total_steps}; checkpoint "
                         f"{checkpoint}; continue with --resume auto", summary)

    def fail_without_steps(self) -> None:
        """The budget ran out before the first step: no checkpoint, no final/, no model artifact; exit 2."""

        clock = self.cfg.clock
        load_s = clock.segment.get("load_s")
        self.tracker.summary(steps=0, total_steps=self.total_steps, stopped_by="budget", final_dir=None,
                             **clock.summary())
        raise UserError(
            f"the budget ran out before the first training step: {format_duration(clock.elapsed_s)} of "
            f"{format_duration(clock.budget_s)} used (loading took {format_duration(load_s or 0)}, the reserve for "
            f"validation + merge is {format_duration(clock.reserve_s)}); nothing was trained, so no final/ "
            f"and no model artifact were written",
            fix="give a larger --budget (at least a few times the loading time plus the reserve) or a smaller model")

    def write_final(self) -> Path:
        """out/final: LoRA weights + litgpt's hyperparameters/prompt style, merged by litgpt's merge_lora
        (unless ``merge`` is off: then the adapter alone, which ``litgpt merge_lora`` merges later)."""

        cfg = self.cfg
        base = cfg.model.checkpoint_dir
        final = cfg.checkpoints.out_dir / "final"
        lineage = self.lineage()
        with staged_dir(final) as staging:
            lora_sd = {k: v for k, v in trainable_state_dict(self.inner).items() if "lora_" in k}
            torch.save({"model": lora_sd}, staging / "lit_model.pth.lora")
            copy_config_files(base, staging)
            hparams = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.flat().items()}
            hparams.update(checkpoint_dir=str(base.resolve()),
                           # the merge rebuilds the model in this precision; merge in full precision on CPU
                           precision="32-true" if cfg.model.precision.startswith("32")
                           else cfg.model.precision.replace("-mixed", "-true"))
            (staging / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False), encoding="utf-8")
            save_prompt_style(self.style, staging)
            (staging / "onegpu_model.json").write_text(json.dumps(lineage, indent=2), encoding="utf-8")
            if cfg.checkpoints.merge:
                with contextlib.redirect_stdout(io.StringIO()):  # merge_lora pprints its locals
                    merge_lora(checkpoint_dir=staging, pretrained_checkpoint_dir=base)
            if cfg.checkpoints.export_hf:

                export_hf(staging, staging / "hf")
        self.tracker.log_artifact(final, name=lineage["model_artifact"], type="model", metadata=lineage,
                                  digest=checkpoint_digest(final))
        self.tracker.summary(model_artifact=lineage["model_artifact"], model_digest=checkpoint_digest(final))
        return final

    def lineage(self) -> dict[str, Any]:
        """``final/onegpu_model.json``: where the model comes from (base, data, run, method)."""
        cfg, base, data = self.cfg, self.cfg.model.checkpoint_dir, self.cfg.dataset
        meta = self.tracker.meta
        return {
            "base_checkpoint": str(base.resolve()),
            "base_model": json.loads((base / "onegpu_model.json").read_text())
            if (base / "onegpu_model.json").is_file() else None,
            "data_dir": str(data.path), "data_manifest_sha256": data.manifest_sha256,
            "data_recipe_hash": data.manifest.get("recipe_hash"), "dataset_artifact": data.name,
            "dataset_digest": data.digest,
            # the name this model is logged under; evals record it and write their scores back to run_dir
            "model_artifact": artifact_name("model", meta.get("wandb_id") or cfg.checkpoints.out_dir.name),
            "run_dir": str(cfg.checkpoints.out_dir.resolve()),
            "prompt_style": cfg.data.prompt_style, "wandb_run_id": meta.get("wandb_id"),
            "git_sha": meta.get("git_sha"), "method": "qlora" if cfg.model.quantize else "lora",
            "quantize": cfg.model.quantize, "lora_r": cfg.lora.lora_r, "lora_alpha": cfg.lora.lora_alpha,
        }

    def generate_samples(self) -> list[list[str]]:
        """Greedy generations for the fixed ``SAMPLE_PROMPTS`` (a W&B table), so runs compare."""

        inner, fabric, tokenizer = self.inner, self.fabric, self.tokenizer
        rows = []
        inner.eval()
        with torch.no_grad():
            for instruction in SAMPLE_PROMPTS[: self.cfg.eval.num_samples]:
                prompt = self.style.apply(instruction)
                ids = tokenizer.encode(prompt, device=fabric.device)
                max_ret = min(len(ids) + self.cfg.eval.sample_max_new_tokens, inner.max_seq_length)
                inner.set_kv_cache(batch_size=1, max_seq_length=max_ret, device=fabric.device)
                with fabric.autocast():
                    out = generate(inner, ids, max_ret, temperature=0.0, eos_id=tokenizer.eos_id, include_prompt=False)
                inner.clear_kv_cache()
                rows.append([instruction, tokenizer.decode(out).strip()])
        inner.train()
        self.tracker.log_table("samples", ["prompt", "generation"], rows)
        return rows


# ------------------------------------------------------------------------------------------ stops
SIGNAL_STOPS = ("early_terminate", "preempted")


class SigtermFlag:
    """Set by SIGTERM; the loop checks it between steps. Under ``wandb agent`` SIGTERM is hyperband's
    early termination, otherwise a scheduler's preemption."""

    received = False

    @property
    def stopped_by(self) -> str:
        return "early_terminate" if os.environ.get("WANDB_SWEEP_ID") else "preempted"


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[SigtermFlag]:
    """Turn SIGTERM into a flag while training (the main thread only: Python delivers signals there)."""
    flag = SigtermFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        flag.received = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------ model
def build_model(fabric: Any, checkpoint_dir: Path, lora: LoRAArgs, quantize: str | None,
                max_seq_length: int, precision: str) -> Any:
    """litgpt LoRA GPT with the base weights loaded, LoRA-only trainable, QLoRA-quantized if asked."""

    config = Config.from_file(checkpoint_dir / "model_config.yaml", **asdict(lora))
    dtype = getattr(torch, PRECISION_DTYPES[precision])
    if quantize:
        # Build and load on CPU; quantizing moves each base linear to the device as it goes, so the
        # full-precision base never has to fit in GPU memory.
        with torch.device("cpu"), _default_dtype(dtype if fabric.device.type == "cuda" else torch.float32):
            model = GPT(config)
    else:
        with fabric.init_module(empty_init=False):
            model = GPT(config)
    state = torch.load(checkpoint_dir / "lit_model.pth", map_location="cpu", mmap=True, weights_only=True)
    model.load_state_dict(state.get("model", state), strict=False)
    del state
    mark_only_lora_as_trainable(model)
    model.max_seq_length = max_seq_length
    if quantize:
        quantize_frozen_linears(model, quantize, compute_dtype=dtype, device=fabric.device)
    return model


PRECISION_DTYPES = {"32-true": "float32", "bf16-true": "bfloat16", "bf16-mixed": "float32",
                    "16-true": "float16", "16-mixed": "float32"}


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> Any:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    # bitsandbytes probes its kernels and warns as it loads: only QLoRA and the 8-bit/paged optimizers load it
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW if name == "paged_adamw" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
