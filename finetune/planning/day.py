"""``onegpu day plan``: the 24 hours on the rented GPU, laid out and checked before the GPU is rented.

From a track, a base model (a litgpt config name) and, optionally, a data dir, it writes the day as
files to follow on the GPU box (``day_plan.md``, ``day.sh``, ``final.yaml``, ``sweep.yaml``,
``day_plan.json``), in order:

1. **set-up**: ``onegpu model prepare`` (and ``data build`` without ``--data``);
2. **memory check**: ``onegpu finetune plan --analytic false`` measures the final setup on the card;
3. **sweep**: short trials (learning rate x LoRA rank, each ``--trial_minutes`` long, together
   ``--sweep_share`` of the day), no merged model kept; the runner writes the winner's values to
   ``sweep/best.yaml``;
4. **final run**: the setup on ``final.yaml`` (a shipped preset for this track and model when there is
   one, else the planner's recommendation), with the winner's values, for what the day has left;
5. **reserve**: validation, HELM against the model served by the image's engine (vLLM by default),
   and the submission folder + image.

Every step that holds the model on the card is checked against the track before anything runs:
training by the analytic planner (``finetune/planning/analytic.py``), validation, HELM and the image by
the serving estimate ``onegpu submission pack`` uses (the serving batch is sized to fit). A step
that does not keep ``SAFE_HEADROOM`` of the card free, or steps that overrun the day, exit 2 naming
the fix. Commands are parsed by the verbs' own parsers as they are written, so ``day.sh`` runs as is.
"""

from __future__ import annotations

import difflib
import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from litgpt.config import Config, name_to_config

from onegpu import cli
from onegpu.budget import default_reserve, format_duration, parse_duration
from onegpu.contracts import TRACKS, atomic_write_json, atomic_write_text, read_json, read_yaml
from onegpu.errors import UserError, all_problems
from onegpu.finetune.options import finetune_options
from onegpu.finetune.planning.analytic import SAFE_HEADROOM, Evaluator, fit_on_track, planned_workload
from onegpu.paths import REPO_ROOT, stage_dir
from onegpu.submission.bundle import estimate_memory, estimate_vllm_memory
from onegpu.sweeps import runner, schema

GIB = 2**30
SWEEP_RANKS = (16, 64)  # the trials' LoRA ranks: the sweep's question is rank x learning rate
SWEEP_LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # around the setup's learning rate, as many as the share allows
SERVE_BATCH_SIZES = (16, 8, 4, 2, 1)  # the serving batch the image gets: the largest that fits
VLLM_SHARE = 0.9  # vLLM's gpu_memory_utilization: the card less the plan's safe headroom


@dataclass
class Step:
    """One block of the day: its time, what it holds on the card, the commands to run."""

    name: str
    seconds: float
    commands: list[str]
    peak_gib: float | None = None  # on the card (None: the step does not load the model there)
    note: str = ""
    start_s: float = 0.0

    def verdict(self, memory_gib: float) -> str:
        if self.peak_gib is None:
            return "-"
        return f"{self.peak_gib:.1f} ({memory_gib - self.peak_gib:+.1f})"


@dataclass
class DayPlan:
    track: str
    model: str
    hub_id: str
    memory_gib: float
    day_s: float
    out: Path
    setup: dict[str, Any]  # the final run's options that shape memory and speed, and where they came from
    steps: list[Step] = field(default_factory=list)
    problems: list[UserError] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def planned_s(self) -> float:
        return sum(s.seconds for s in self.steps)


def plan_day(track: str, model: str, data: str | None, out: Path, final_config: Path | None, lora_r: int,
             max_seq_length: int, sweep_share: float, trial_minutes: int, stage_times: dict[str, str],
             serve_engine: str, serve_quantize: str | None, mfu: float | None) -> dict:
    """``onegpu day plan`` (its options and their docs: ``finetune/verbs.py``): lay the day out, print it,
    write its files; exit 2 (UserError) after writing them when a step does not fit or the day overruns."""
    plan = lay_out(track, model, data, Path(out), final_config, lora_r, max_seq_length, sweep_share, trial_minutes,
                   stage_times, "onegpu" if serve_quantize else serve_engine, serve_quantize, mfu)
    text = render(plan)
    write_files(plan, text)
    print(text)
    if plan.problems:
        raise all_problems(plan.problems)
    return summary(plan)


# ------------------------------------------------------------------------------------ the layout
def lay_out(track: str, model: str, data: str | None, out: Path, config: Path | None, lora_r: int,
            max_seq_length: int, sweep_share: float, trial_minutes: int, durations: dict[str, str],
            engine: str, serve_quantize: str | None, mfu: float | None) -> DayPlan:
    """The steps in order, each checked; problems collected on the plan, not raised."""
    spec, hub_id = TRACKS[track], model_hub_id(model)
    seconds = {name: 0.0 if str(v).strip() in ("0", "0s", "0m", "0h") else parse_duration(v)  # 0: skip the step
               for name, v in durations.items()}
    final = final_options(track, model, hub_id, data, out, config, lora_r, max_seq_length)
    options = final["options"]
    plan = DayPlan(track, model, hub_id, spec.memory_gib, parse_duration(spec.budget), out,
                   setup={k: options[k] for k in ("precision", "quantize", "lora_r", "activation_checkpointing",
                                                  "micro_batch_size", "max_seq_length", "learning_rate")}
                   | {"from": final["source"]})
    data_dir = data or "runs/data"
    plan.steps.append(Step("set-up", seconds["set-up"], [
        f"onegpu model prepare {hub_id} --checkpoint_dir {options['checkpoint_dir']}",
        *([] if data else [f"onegpu data build data/recipes/competition.yaml --out {data_dir}"]),
        *(["make vllm-venv"] if engine == "vllm" else [])],
        note="a gated model needs HF_TOKEN"))
    final_fit = check_training(plan, options, "final run", mfu)
    plan.steps.append(Step("memory check", seconds["memory check"],
                           [f"onegpu finetune plan --config {out / 'final.yaml'} --analytic false --out_dir {out / 'plan'}"],
                           peak_gib=final_fit.configured_peak_gib, note="measured on the card under its track's cap"))
    trials = sweep_trials(options, sweep_share, trial_minutes, plan.day_s)
    if trials:
        plan.steps.append(sweep_step(plan, trials, trial_minutes, mfu))
    reserve = sum(seconds[k] for k in ("validation", "HELM", "pack + image"))
    plan.steps.append(final_step(plan, options, final_fit, plan.day_s - plan.planned_s - reserve, data, bool(trials)))
    plan.steps += evaluation_steps(plan, options, seconds, engine, serve_quantize)
    start = 0.0
    for step in plan.steps:
        step.start_s, start = start, start + step.seconds
    if plan.planned_s > plan.day_s + 1:
        plan.problems.append(UserError(f"the steps take {format_duration(plan.planned_s)}, more than the "
                                       f"{format_duration(plan.day_s)} day", fix="shorten the sweep or the reserve"))
    write_run_files(out, {**options, "data": data_dir}, trials, trial_minutes)
    return plan


def sweep_step(plan: DayPlan, trials: list[dict[str, Any]], minutes: int, mfu: float | None) -> Step:
    peaks = [check_training(plan, t, f"sweep trial r={t['lora_r']}", mfu).configured_peak_gib for t in trials]
    out = plan.out
    return Step(f"sweep: {len(trials)} x {minutes}m", len(trials) * 60 * minutes,
                [f"onegpu sweep {out / 'sweep.yaml'} --out {out / 'sweep'}",
                 f"onegpu report {out / 'sweep'} --out {out / 'report'}"],
                peak_gib=max(peaks), note="learning rate x LoRA rank; the winner goes to sweep/best.yaml")


def final_step(plan: DayPlan, options: dict[str, Any], fit: Any, final_s: float, data: str | None,
               after_sweep: bool) -> Step:
    """The final run gets what the day leaves; its budget goes into final.yaml, its forecast into the note."""
    if final_s < plan.day_s / 4:
        plan.problems.append(UserError(f"the final run gets {format_duration(max(0.0, final_s))} of the "
                                       f"{format_duration(plan.day_s)} day", fix="a smaller --sweep_share or shorter "
                                       "--trial_minutes, --helm or --validation"))
    options["budget"] = budget_spec(final_s)
    tokens = (fit.tokens_per_s or 0) * max(0.0, final_s - default_reserve(final_s))  # as the planner counts
    plan.data = epochs_of(data, tokens)
    out = plan.out
    command = " ".join([f"onegpu finetune --config {out / 'final.yaml'}",
                        *([f"--config {out / 'sweep' / 'best.yaml'}"] if after_sweep else []), "--resume auto"])
    note = f"~{fit.tokens_per_s or 0:,.0f} tok/s -> ~{tokens / 1e6:,.0f} M tokens" + (
        f" = {plan.data['epochs']:.2f} epochs of {data}" if plan.data.get("epochs") else "")
    return Step("final run", max(0.0, final_s), [command], peak_gib=fit.configured_peak_gib, note=note)


def evaluation_steps(plan: DayPlan, options: dict[str, Any], seconds: dict[str, float], engine: str,
                     serve_quantize: str | None) -> list[Step]:
    """Validation (bf16, skipped at 0m), HELM against the model served as the image serves it, the
    submission folder + image."""
    out, final_dir, seq = plan.out, Path(options["out_dir"]) / "final", options["max_seq_length"]
    serve = (vllm_fit(plan, seq) if engine == "vllm"
             else serving_fit(plan, plan.model, seq, serve_quantize, "serving (HELM and the image)"))
    serving = [*(["--engine", "vllm"] if engine == "vllm" else []),
               *(["--quantize", serve_quantize] if serve_quantize else []), "--max_batch_size", str(serve["batch"])]
    steps = []
    if seconds["validation"]:
        val = serving_fit(plan, plan.model, seq, None, "eval val (bf16 weights)", batches=(8, 4, 2, 1))
        steps.append(Step("validation", seconds["validation"],
                          [f"onegpu eval val {final_dir} --suite {suite} --out {out / ('eval-val-' + suite.split('-')[-1])} "
                           f"--batch_size {val['batch']}" for suite in ("helm-open", "helm-hidden")],
                          peak_gib=val["peak_gib"], note="the open eval's families and the hidden eval's (2/3 of the score)"))
    serve_args = shlex.quote(json.dumps(serving))  # strings, as `onegpu serve` reads them
    return steps + [
        Step("HELM", seconds["HELM"], [f"onegpu eval helm {final_dir} --conf quick --out {out / 'eval-helm'} "
                                       f"--serve_args {serve_args}"],
             peak_gib=serve["peak_gib"], note=f"HELM against the {engine} engine the image serves with "
                                              "(--conf open-600: the whole open eval)"),
        Step("pack + image", seconds["pack + image"],
             [" ".join([f"onegpu submission pack {final_dir} --track {plan.track}", *serving,
                        f"--out {out / 'submission'}"]),
              f"docker build -t onegpu-submission {out / 'submission'}"],
             peak_gib=serve["peak_gib"], note="then the organizers' probe against the running image"),
    ]


def vllm_fit(plan: DayPlan, max_seq_length: int) -> dict[str, Any]:
    """vLLM takes ``VLLM_SHARE`` of the card (the plan's headroom) and pages its KV cache into what the
    weights leave (``submission pack``'s plan in vLLM's terms); a problem when one sequence does not fit."""
    capacity = TRACKS[plan.track].memory_mib << 20
    estimate = estimate_vllm_memory(Config.from_name(plan.model), "auto", 16, max_seq_length, VLLM_SHARE, capacity)
    if estimate["kv_sequences"] < 1:
        plan.problems.append(UserError(
            f"serving (HELM and the image) with vLLM: {plan.model}'s bf16 weights ({estimate['weights_bytes'] / GIB:.1f} GiB) "
            f"leave no room for one {max_seq_length}-token sequence in {VLLM_SHARE:.0%} of {plan.memory_gib:.1f} GiB",
            fix="--serve_quantize bnb.nf4 (the onegpu engine with 4-bit weights), a smaller model, or the a100-40gb track"))
    return {"batch": max(1, min(16, estimate["kv_sequences"])), "peak_gib": estimate["share_bytes"] / GIB}


def model_hub_id(model: str) -> str:
    """litgpt's hub id of a config name; unknown names fail with the closest ones."""
    if model not in name_to_config:
        close = difflib.get_close_matches(model, list(name_to_config), n=3, cutoff=0.5)
        raise UserError(f"{model!r} is not a litgpt config name",
                        fix=f"use one of {', '.join(close)}" if close else "see `litgpt download list`")
    hf = Config.from_name(model).hf_config
    return f"{hf['org']}/{hf['name']}"


def final_options(track: str, model: str, hub_id: str, data: str | None, out: Path, config: Path | None,
                  lora_r: int, max_seq_length: int) -> dict[str, Any]:
    """The final run's flat finetune options and where they came from (a config, a shipped preset, or
    the planner's recommendation on this card)."""

    checkpoint = Path(f"~/.cache/onegpu/checkpoints/{hub_id}")
    source = config or shipped_preset(track, model)
    if source is not None:
        options = finetune_flat(["--config", str(source)])
        origin = shown(Path(source))
    else:
        options = finetune_options(lora_r=lora_r, max_seq_length=max_seq_length, precision="bf16-true",
                                   lora_alpha=16, lora_key=True, lora_projection=True, lora_mlp=True,
                                   global_batch_size=32, learning_rate=1e-4, warmup_steps=100, epochs=3,
                                   neftune_alpha=5.0, track=track, save_interval=200, eval_interval=200).flat()
        options.update(recommended_setup(options, model))
        origin = f"the planner's recommendation for {model} on {track} at r={lora_r}"
    options.update(track=track, checkpoint_dir=checkpoint, out_dir=out / "final-run", data=data)
    return {"options": options, "source": origin}


def shown(path: Path) -> str:
    """A path as a user of the checkout types it: relative to the checkout when inside it."""

    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def shipped_preset(track: str, model: str) -> Path | None:
    """The shipped config for this track whose base is ``model``, if there is one (bf16 LoRA first)."""

    for path in sorted(stage_dir("finetune").joinpath("configs").glob("*.yaml"), key=lambda p: "qlora" in p.name):
        doc = read_yaml(path, "finetune config")
        if doc.get("track") == track and Path(str(doc.get("checkpoint_dir", ""))).name == model:
            return path
    return None


def recommended_setup(options: dict[str, Any], model: str) -> dict[str, Any]:
    """The planner's fastest fitting setup at this rank (quantization, checkpointing, micro-batch)."""
    _config, _source, w = planned_workload({**options, "checkpoint_dir": None}, model, [])
    spec = TRACKS[options["track"]]
    evaluator = Evaluator(Config.from_name(model), options["track"], spec.memory_gib * (1 - SAFE_HEADROOM),
                          parse_duration(spec.budget), options["global_batch_size"], None)
    best = next((c for c in evaluator.recommend(w) if c["lora_r"] == options["lora_r"]), None)
    if best is None:
        raise UserError(f"nothing fits {options['track']} for {model} at r={options['lora_r']} and "
                        f"max_seq_length {options['max_seq_length']}", fix="a smaller --max_seq_length, or the a100-40gb track")
    return {k: best[k] for k in ("quantize", "activation_checkpointing", "precision", "micro_batch_size")} | (
        {"optimizer": "paged_adamw"} if best["quantize"] else {})


def finetune_flat(argv: list[str]) -> dict[str, Any]:
    """``onegpu finetune ARGV`` read as the command line reads it: every option, flat."""

    return cli.parse_verb_args(("finetune",), argv)


def check_training(plan: DayPlan, options: dict[str, Any], what: str, mfu: float | None) -> Any:
    """The analytic fit of one training step on the track; a problem when it keeps less than the safe headroom."""
    _config, _w, fit = fit_on_track({**options, "checkpoint_dir": None, "budget": None}, plan.model, mfu)
    if not fit.fits or fit.headroom_gib < SAFE_HEADROOM * plan.memory_gib:
        plan.problems.append(UserError(
            f"{what}: {fit.configured_peak_gib:.1f} GiB at micro-batch {options['micro_batch_size']} leaves "
            f"{fit.headroom_gib:+.1f} of {plan.memory_gib:.1f} GiB (the plan keeps {SAFE_HEADROOM:.0%} free)",
            fix=f"`onegpu finetune plan --config {plan.out / 'final.yaml'} --analytic` ranks the setups that fit; "
                "pass one with --final_config"))
    return fit


def sweep_trials(final: dict[str, Any], share: float, minutes: int, day_s: float) -> list[dict[str, Any]]:
    """Learning rate x rank around the final setup, as many trials as ``share`` of the day holds."""
    count = int(share * day_s // (60 * minutes))
    per_rank = min(len(SWEEP_LR_FACTORS), count // len(SWEEP_RANKS))
    if per_rank < 1:
        return []
    middle = SWEEP_LR_FACTORS.index(1.0)
    start = max(0, min(middle - (per_rank - 1) // 2, len(SWEEP_LR_FACTORS) - per_rank))
    factors = SWEEP_LR_FACTORS[start:start + per_rank]
    return [{**final, "lora_r": r, "learning_rate": final["learning_rate"] * f} for r in SWEEP_RANKS for f in factors]


def serving_fit(plan: DayPlan, model: str, max_seq_length: int, quantize: str | None, what: str,
                batches: tuple[int, ...] = SERVE_BATCH_SIZES) -> dict[str, Any]:
    """The largest batch whose serving memory (the estimate `submission pack` checks) keeps the safe
    headroom free; a problem when not even batch 1 does."""
    config = Config.from_name(model)
    usable = plan.memory_gib * (1 - SAFE_HEADROOM) * GIB

    def total(batch: int) -> float:
        return estimate_memory(config, "auto", quantize, batch, max_seq_length, 1024)["total_bytes"]

    batch = next((b for b in batches if total(b) <= usable), 0)
    if not batch:
        fix = ("--validation 0m (HELM still scores the served model), or the a100-40gb track" if what.startswith("eval")
               else "--serve_quantize bnb.nf4 (4-bit weights in HELM and the image), a smaller model, or the a100-40gb track")
        plan.problems.append(UserError(f"{what}: {model} needs {total(1) / GIB:.1f} GiB at batch 1 of "
                                       f"{plan.memory_gib:.1f} (the plan keeps {SAFE_HEADROOM:.0%} free)", fix=fix))
    return {"batch": batch or 1, "peak_gib": total(batch or 1) / GIB}


def budget_spec(seconds: float) -> str:
    """A ``--budget`` value, whole minutes: ``17h20m``."""
    minutes = max(0, int(seconds // 60))
    return f"{minutes // 60}h{minutes % 60:02d}m"


def epochs_of(data: str | None, tokens: float) -> dict[str, Any]:
    if not data or not (Path(data) / "manifest.json").is_file():
        return {}
    manifest = read_json(Path(data) / "manifest.json")
    per_epoch = int(((manifest.get("tokens") or {}).get("train") or {}).get("total") or 0)
    return {"dir": data, "tokens_per_epoch": per_epoch, "tokens": tokens,
            "epochs": tokens / per_epoch if per_epoch else None}


# -------------------------------------------------------------------------------------- the files
def write_run_files(out: Path, final: dict[str, Any], trials: list[dict[str, Any]], minutes: int) -> None:
    """final.yaml (the final run's options) and sweep.yaml (its trials), both parsed back to check them."""
    keep = {k: (str(v) if isinstance(v, Path) else v) for k, v in final.items() if v is not None}
    atomic_write_text(out / "final.yaml", "# the final run of the GPU day (onegpu day plan)\n"
                      + yaml.safe_dump(keep, sort_keys=False))
    finetune_flat(["--config", str(out / "final.yaml")])  # as the day will parse it
    if not trials:
        return
    ranks = sorted({t["lora_r"] for t in trials})
    rates = sorted({t["learning_rate"] for t in trials})
    sweep = {"name": "day-sweep", "program": "onegpu", "method": "grid",
             "metric": {"name": "val_loss", "goal": "minimize"},
             "parameters": {"config": {"value": str(out / "final.yaml")}, "lora_r": {"values": ranks},
                            "learning_rate": {"values": rates}, "budget": {"value": f"{minutes}m"},
                            "merge": {"value": False}, "final_checkpoint": {"value": False},
                            "save_interval": {"value": 0}, "save_interval_minutes": {"value": 0},
                            "eval_interval": {"value": 50}},
             "command": ["${env}", "onegpu", "finetune", "${args}"]}
    atomic_write_text(out / "sweep.yaml", f"# the GPU day's sweep: {len(trials)} trials x {minutes} min "
                      f"(onegpu day plan)\n" + yaml.safe_dump(sweep, sort_keys=False))

    cfg = schema.load_sweep_config(out / "sweep.yaml")
    runner.check_command(cfg, runner.validation_points(cfg), str(out / "sweep.yaml"))


def render(plan: DayPlan) -> str:
    s = plan.setup
    method = f"QLoRA {s['quantize']}" if s["quantize"] else "bf16 LoRA"
    lines = [f"GPU day: {plan.model} ({plan.hub_id}) on {plan.track}, {plan.memory_gib:.1f} GiB, "
             f"{format_duration(plan.day_s)}; files in {plan.out}",
             f"  setup: {method} r={s['lora_r']}, checkpointing {'on' if s['activation_checkpointing'] else 'off'}, "
             f"micro-batch {s['micro_batch_size']} x {s['max_seq_length']} tokens, peak LR {s['learning_rate']:.1e} "
             f"(from {s['from']})",
             "",
             f"  {'start':>6} {'length':>7}  {'step':<16} {'card GiB (free)':<16} command"]
    for step in plan.steps:
        first, *rest = step.commands
        lines.append(f"  {clock(step.start_s):>6} {clock(step.seconds):>7}  {step.name:<16} "
                     f"{step.verdict(plan.memory_gib):<16} {first}")
        lines += [f"  {'':>6} {'':>7}  {'':<16} {'':<16} {c}" for c in rest]
        if step.note:
            lines.append(f"  {'':>6} {'':>7}  {'':<16} {'':<16} # {step.note}")
    lines.append(f"  {clock(plan.planned_s):>6}          end")
    if plan.problems:
        lines.append("  verdict: the day does NOT work as planned:")
        lines += [f"    - {p.problem} (fix: {p.fix})" for p in plan.problems]
    else:
        lines.append(f"  verdict: every step fits {plan.track} with at least 10% of the card free; "
                     f"{format_duration(plan.planned_s)} of {format_duration(plan.day_s)}")
    lines.append("  files: day_plan.md (this), day.sh (the commands in order), final.yaml, sweep.yaml, day_plan.json")
    return "\n".join(lines)


def clock(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}:{minutes % 60:02d}"


def write_files(plan: DayPlan, text: str) -> None:
    out = plan.out
    atomic_write_text(out / "day_plan.md", f"# The GPU day\n\n```\n{text}\n```\n")
    script = ["#!/usr/bin/env bash", "# The GPU day, step by step (onegpu day plan). Re-running continues where it",
              "# stopped: the sweep skips finished trials, the final run resumes from its last checkpoint.",
              "set -euo pipefail"]
    for step in plan.steps:
        script += ["", f"# {clock(step.start_s)} {step.name} ({format_duration(step.seconds)})", *step.commands]
    atomic_write_text(out / "day.sh", "\n".join(script) + "\n")
    (out / "day.sh").chmod(0o755)
    atomic_write_json(out / "day_plan.json", summary(plan))


def summary(plan: DayPlan) -> dict[str, Any]:
    return {**asdict(plan), "out": str(plan.out), "planned_s": plan.planned_s,
            "problems": [f"{p.problem} (fix: {p.fix})" for p in plan.problems]}
