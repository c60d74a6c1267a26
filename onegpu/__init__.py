"""onegpu: an experiment-tracking starter kit for one-GPU, 24-hour LLM fine-tuning competitions.

The stages live in their own folders at the top of the checkout (data/, finetune/, eval/,
submission/, sweeps/) and install as subpackages of this one (``onegpu.data``, ``onegpu.finetune``,
... via setuptools' package-dir), so installing the kit adds exactly one top-level name. The files
directly in onegpu/ are what every stage shares (CLI, tracking, paths, errors, model bootstrap).
"""

__version__ = "0.1.0"
