"""``onegpu data build``: recipe YAML -> an auditable training mix (train/val/rejects JSONL, manifest, plot,
a tracked run logging the dir as a ``dataset`` artifact).

The verb's options; the build itself is ``data/mix.py`` (its pipeline: load, filter, sample, write).
Same recipe + seed + inputs -> byte-identical train/val/rejects/manifest.
"""

from __future__ import annotations

from pathlib import Path


def build(recipe: Path, out: Path | None = None, data_dir: Path | None = None, seed: int | None = None,
          parallel: bool = True) -> Path:
    """Build a training mix from a recipe YAML into OUT (train/val/rejects JSONL, manifest, plot).

    Args:
        recipe: the recipe YAML (see data/recipes/quickstart.yaml for an annotated example).
        out: output directory; existing outputs in it are replaced. Default: runs/data-<recipe name>
            ($ONEGPU_RUNS overrides runs/).
        data_dir: folder with local copies of the datasets (layout of ../shared/datasets). Default:
            $ONEGPU_DATA_DIR, else ../shared/datasets beside the checkout, else the Hugging Face hub.
            A source's ``location:`` in the recipe overrides it for that source.
        seed: overrides the recipe's seed.
        parallel: tokenize on tokenizers' thread pool, overlapped with near-dedup. false: one thread,
            one stage after the other (the same outputs, byte for byte; slower when a core is free).

    Returns:
        The output directory.
    """
    from onegpu.data.mix import build_mix  # the engine: litgpt, datasets and matplotlib load here, not for --help

    return build_mix(recipe, out, data_dir, seed, parallel)
