"""``onegpu dashboard``: the standard W&B workspace (or report) for a onegpu project, made by code.

Built with W&B's ``wandb-workspaces`` package, so the panels live in version control instead of
being clicked together by hand: loss / validation curves, tokens/s, MFU, peak memory, budget used,
validation and HELM scores, a parallel-coordinates panel over rank / alpha / precision /
quantization / learning rate, a scatter of score vs throughput, and the run table with the sweep
columns pinned. Creating it needs the W&B server: offline it stops with a UserError that says so.
The metric names are the ones the stages log (``finetune/lora.py``, ``eval/``); the eval scores
(``val/score``, ``test/score``) are the ones the evals write back to the fine-tune run they scored,
so every panel has one bar per trial (tests/test_lineage.py checks every key against a real run).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from onegpu.errors import UserError

# (section, [(panel kind, title, metrics)]) -- kinds: line (history over steps), bar (run summary)
SECTIONS: list[tuple[str, list[tuple[str, str, list[str]]]]] = [
    ("Loss and validation", [
        ("line", "training loss", ["loss"]),
        ("line", "validation loss", ["val_loss"]),
        ("line", "learning rate", ["lr"]),
        ("line", "gradient norm", ["grad_norm"]),
    ]),
    ("Throughput and memory", [
        ("line", "tokens/s (non-padding)", ["tokens_per_s"]),
        ("line", "MFU", ["mfu"]),
        ("line", "peak memory (GiB)", ["mem/cuda_peak_allocated_gib", "mem/cuda_peak_reserved_gib", "mem/peak_rss_gib"]),
        ("line", "packing efficiency", ["packing_efficiency"]),
    ]),
    ("Budget", [
        ("line", "budget used (%)", ["budget_used_pct"]),
        ("line", "tokens projected by the deadline", ["projected_tokens_by_deadline"]),
        ("bar", "budget used at the end (%)", ["budget_used_pct"]),
    ]),
    ("Scores", [
        ("bar", "final validation loss", ["val_loss"]),
        # written back to the fine-tune run by `onegpu eval val` / `onegpu eval helm` (tracking.write_back_summary)
        ("bar", "validation suite score (onegpu eval val)", ["val/score"]),
        ("bar", "HELM test score (onegpu eval helm)", ["test/score"]),
    ]),
]
# Sweep axes for the parallel-coordinates panel and the pinned run-table columns.
SWEEP_CONFIG = ["lora_r", "lora_alpha", "precision", "quantize", "learning_rate"]
SWEEP_SUMMARY = ["tokens_per_s", "peak_memory_gib", "val_loss", "val/score", "test/score"]


def plotted_keys() -> tuple[set[str], set[str]]:
    """(metric keys the panels read from runs' history or summary, config keys they read)."""
    metrics = {m for _, specs in SECTIONS for _, _, keys in specs for m in keys} | set(SWEEP_SUMMARY)
    return metrics, set(SWEEP_CONFIG)


def workspaces_api() -> tuple[Any, Any]:
    """wandb-workspaces' reports and workspaces modules: an optional extra ([sweeps]), loaded only to build panels."""
    import wandb_workspaces.reports.v2 as wr  # optional extra
    import wandb_workspaces.workspaces as ws  # optional extra

    return wr, ws


def build_panels() -> list[tuple[str, list[Any]]]:
    """The panels of every section as wandb-workspaces objects (no network needed)."""
    wr, _ws = workspaces_api()
    sections = []
    for name, specs in SECTIONS:
        panels = []
        for kind, title, metrics in specs:
            if kind == "line":
                panels.append(wr.LinePlot(title=title, x="Step", y=list(metrics)))
            else:
                panels.append(wr.BarPlot(title=title, metrics=list(metrics), orientation="h"))
        sections.append((name, panels))
    sweep_panels = [
        wr.ParallelCoordinatesPlot(
            title="rank x alpha x precision x quantization -> validation loss",
            columns=[wr.ParallelCoordinatesPlotColumn(metric=wr.Config(key)) for key in SWEEP_CONFIG]
                    + [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(key)) for key in SWEEP_SUMMARY]),
        wr.ScatterPlot(title="validation loss vs tokens/s (Pareto)", x=wr.SummaryMetric("tokens_per_s"),
                       y=wr.SummaryMetric("val_loss")),
        wr.ScatterPlot(title="validation loss vs peak memory (Pareto)", x=wr.SummaryMetric("peak_memory_gib"),
                       y=wr.SummaryMetric("val_loss")),
        wr.ScatterPlot(title="validation score vs LoRA rank", x=wr.Config("lora_r"), y=wr.SummaryMetric("val/score")),
        wr.ParameterImportancePlot(with_respect_to="val_loss"),
        wr.RunComparer(diff_only="split"),
    ]
    sections.insert(0, ("Sweeps: rank x precision x quantization", sweep_panels))
    return sections


def build_workspace(entity: str, project: str, name: str):
    """A ``wandb_workspaces.workspaces.Workspace`` with the standard sections (not saved)."""
    _wr, ws = workspaces_api()
    sections = [ws.Section(name=title, panels=panels, is_open=True) for title, panels in build_panels()]
    return ws.Workspace(
        entity=entity, project=project, name=name, sections=sections,
        settings=ws.WorkspaceSettings(x_axis="Step", smoothing_type="none"),
        runset_settings=ws.RunsetSettings(
            pinned_columns=[f"config:{k}" for k in SWEEP_CONFIG] + [f"summary:{k}" for k in SWEEP_SUMMARY]),
    )


def build_report(entity: str, project: str, name: str):
    """The same panels as a W&B Report (a shareable page) over the project's runs (not saved)."""
    wr, _ws = workspaces_api()
    blocks: list[Any] = [wr.P(text="Made by `onegpu dashboard --kind report`: the onegpu standard panels.")]
    for title, panels in build_panels():
        blocks += [wr.H2(text=title), wr.PanelGrid(runsets=[wr.Runset(entity=entity, project=project)], panels=panels)]
    return wr.Report(entity=entity, project=project, title=name, blocks=blocks, width="fluid")


def online_wandb() -> Any:
    """wandb, logged in; a UserError when W&B is offline or has no API key."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        raise UserError(f"W&B is in {mode or 'disabled'} mode: a dashboard lives on the W&B server and cannot be "
                        "created offline",
                        fix="run `wandb login`, then `WANDB_MODE=online onegpu dashboard --project P`; offline, "
                            "compare runs with `onegpu report RUN_DIRS --out DIR` instead")
    # the engine: wandb loads here, not for --help
    import wandb

    if not wandb.login(prompt=False, verify=False):
        raise UserError("no W&B API key: the dashboard is created on the W&B server",
                        fix="run `wandb login` (or set WANDB_API_KEY); offline, use `onegpu report RUN_DIRS --out DIR`")
    return wandb


def dashboard(
    project: str | None = None,
    entity: str | None = None,
    name: str = "onegpu: sweeps, throughput and budget",
    kind: Literal["workspace", "report"] = "workspace",
) -> str:
    """Create the standard W&B workspace (or report) for a project; prints its URL. Needs W&B online.

    Args:
        project: the W&B project your runs go to. Default: ``$WANDB_PROJECT``, else ``onegpu``
            (where onegpu's runs go by default).
        entity: W&B user or team. Default: your default entity.
        name: name of the saved workspace view / report title.
        kind: ``workspace`` (a saved view of the project's workspace) or ``report`` (a W&B Report).
    """
    wandb = online_wandb()
    project = project or os.environ.get("WANDB_PROJECT", "onegpu")
    try:
        entity = entity or wandb.Api().default_entity
        target = (build_workspace if kind == "workspace" else build_report)(entity, project, name)
        target.save()
    except UserError:
        raise
    except Exception as err:  # network, permissions, unknown project
        raise UserError(f"could not create the W&B {kind} for {entity}/{project}: {err}",
                        fix="check `wandb login`, the entity/project names and your network") from err
    url = target.url
    print(f"dashboard ({kind}): {url}")
    return url
