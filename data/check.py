"""``onegpu data check``: every problem of a recipe in one pass, in seconds, without a build.

The verb's options; the checks themselves are ``data/inspection.py`` (``data build`` runs them too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def check(recipe: Path, data_dir: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """Every problem of a recipe in one run, in seconds, without a build.

    Per source: where it is read from, whether it is there, its rows and usable tokens; then every
    weight, count, token cap or budget the data cannot meet, each with its fix, and the planned tokens
    per eval family.

    Args:
        recipe: the recipe YAML.
        data_dir: the data dir for sources without a ``location:`` (default: $ONEGPU_DATA_DIR, else
            ../shared/datasets beside the checkout, else the hub).
        out: also write the report as JSON here.

    Returns:
        The report ({sources, problems, families, seconds}); exits 2 (UserError) when there are problems.
    """
    from onegpu.data.inspection import check_recipe  # the engine: litgpt and datasets load here, not for --help

    return check_recipe(recipe, data_dir, out)
