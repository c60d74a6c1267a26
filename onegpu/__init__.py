"""onegpu: an experiment-tracking starter kit for one-GPU, 24-hour LLM fine-tuning competitions.

This package holds only what every stage shares (CLI, tracking, paths, errors, model bootstrap);
each stage lives in its own top-level package: data/, finetune/, eval/, submission/, sweeps/.
"""

__version__ = "0.1.0"
