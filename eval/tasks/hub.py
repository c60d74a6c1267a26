"""The hidden eval's HELM-faithful tasks built from the hub: the full files the challenge's HELM fork scored
(ETHICS, Corr2Cause, SAMSum), MATH and DialogSum from their hub copies, downloaded once and cached.

Separate from the offline tasks (``eval/tasks/__init__.py``) because it downloads through ``datasets``.
"""

from __future__ import annotations

from pathlib import Path

from onegpu.data import hidden
from onegpu.data.loading import download, hub_dialogsum, hub_math
from onegpu.eval.tasks import helm_hidden, rendered_dir, task_writer


class HubFiles:
    """The same families from the hub: the files the challenge's HELM fork downloaded, and MATH."""

    def ethics(self, subset: str) -> list[dict]:
        return hidden.read_ethics_csv(download(hidden.HELM_FORK_FILES[subset]), subset)

    def corr2cause(self) -> list[dict]:
        return hidden.read_corr2cause_csv(download(hidden.HELM_FORK_FILES["corr2cause"]))

    def math(self, split: str, subject: str) -> list[dict]:
        return list(hub_math(split, (subject,)))

    def dialogsum(self) -> list[dict]:
        return hub_dialogsum("test")

    def samsum(self) -> list[dict]:
        return hidden.read_dialogues(download(hidden.HELM_FORK_FILES["samsum"]))


def hub_include_dir(names: list[str]) -> Path | None:
    """The hidden-eval tasks among ``names`` built from the hub (the files the challenge's HELM fork scored,
    MATH from the hub): downloads once, then cached. None when none of ``names`` is such a task."""
    wanted = sorted(n for n in names if helm_hidden.is_hidden_task(n))
    if not wanted:
        return None

    def build(staged: Path, prepared: Path, final: Path) -> None:
        (staged / "helm_hidden_hooks.py").write_text(helm_hidden.HOOKS_MODULE, encoding="utf-8")
        helm_hidden.build(HubFiles(), task_writer(staged, prepared, final), wanted=wanted.__contains__)
    return rendered_dir("hub:" + ",".join(wanted), build)
