"""The one ``onegpu`` command: a verb per stage, each a plain function parsed by jsonargparse.

Each verb's options come from its function's signature and docstring (litgpt style), so
``onegpu VERB --help`` explains every option, ``--config FILE.yaml`` loads options from YAML and
later flags override it. Stage modules are imported only when their verb runs, so ``onegpu
--help`` and ``onegpu data ...`` never pay for importing torch-heavy stages they do not use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from onegpu.errors import UserError

# verb words -> (module, function, one-line description). Order is the order of --help.
VERBS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("quickstart",): ("onegpu.quickstart", "quickstart", "run the whole pipeline on the bundled model (offline, CPU)"),
    ("model", "prepare"): ("onegpu.model", "prepare", "make a litgpt checkpoint: bundled SmolLM2, a hub id or a local HF dir"),
    ("model", "push"): ("onegpu.publish", "push", "publish a fine-tuned checkpoint to the Hugging Face Hub with a lineage card"),
    ("data", "build"): ("onegpu.data.build", "build", "build a training mix from a recipe YAML -> train/val/rejects JSONL + manifest"),
    ("data", "sources"): ("onegpu.data.sources", "list_sources", "list the registered datasets with licence and provenance"),
    ("finetune",): ("onegpu.finetune.lora", "finetune", "LoRA/QLoRA fine-tuning with packing, telemetry and a budget clock"),
    ("finetune", "plan"): ("onegpu.finetune.plan", "plan", "measure memory and speed of a config before spending the budget"),
    ("eval", "val"): ("onegpu.eval.validate", "validate", "lm-eval-harness validation suite on a checkpoint"),
    ("eval", "helm"): ("onegpu.eval.helm", "helm", "HELM test run against `onegpu serve` on a checkpoint"),
    ("eval", "compare"): ("onegpu.eval.compare", "compare", "challenge score across runs; validation vs test plot"),
    ("serve",): ("onegpu.submission.server", "serve", "serve a checkpoint over the challenge's HTTP API"),
    ("submission", "pack"): ("onegpu.submission.pack", "pack", "write a self-contained submission folder for a track"),
    ("submission", "fetch"): ("onegpu.submission.weights", "fetch", "inside docker build: put a W&B model artifact into the image"),
    ("sweep",): ("onegpu.sweeps.runner", "sweep", "run a W&B sweep YAML offline on this machine"),
    ("report",): ("onegpu.sweeps.report", "report", "offline HTML report comparing runs"),
    ("dashboard",): ("onegpu.sweeps.dashboard", "dashboard", "create the W&B workspace for a project (online)"),
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _usage() -> str:
    lines = ["usage: onegpu VERB [options]   (onegpu VERB --help for every option)", "", "verbs:"]
    for words, (module, _fn, doc) in VERBS.items():
        if _available(module):
            lines.append(f"  {' '.join(words):<20} {doc}")
    lines += ["", "W&B runs are offline unless WANDB_MODE is set; see README.md."]
    return "\n".join(lines)


def _match(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    # Longest match wins: `finetune plan` before `finetune`.
    for n in (2, 1):
        words = tuple(argv[:n])
        if len(words) == n and words in VERBS:
            return words, argv[n:]
    return None


def _gather_list_positionals(fn, rest: list[str]) -> list[str]:
    """``onegpu report A B C --out X``: several bare values for a list-typed first parameter.

    jsonargparse reads a list positional as one JSON/YAML token (``'[A, B, C]'``); shells and users
    expect space-separated paths, so consecutive bare tokens at the front become that one token.
    """
    import inspect
    import json

    params = [p for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty]
    if not params or "list" not in str(params[0].annotation).lower():
        return rest
    bare = 0
    while bare < len(rest) and not rest[bare].startswith("-"):
        bare += 1
    if bare <= 1 or (len(params) > 1 and bare <= len(params)):
        return rest
    return [json.dumps(rest[:bare]), *rest[bare:]]


def _gather_list_options(fn, rest: list[str]) -> list[str]:
    """``--results A B``: the bare values after a list-typed option become its one JSON list token.

    (A value already written as a list, ``'[A, B]'``, or ``null`` is passed as is.)
    """
    import inspect
    import json

    lists = {p.name for p in inspect.signature(fn).parameters.values()
             if p.default is not inspect.Parameter.empty and "list" in str(p.annotation).lower()}
    out, i = [], 0
    while i < len(rest):
        token = rest[i]
        out.append(token)
        i += 1
        if token.startswith("--") and token[2:] in lists:
            end = i
            while end < len(rest) and not rest[end].startswith("-"):
                end += 1
            values = rest[i:end]
            if values and not (len(values) == 1 and (values[0].lstrip().startswith("[") or values[0] == "null")):
                out.append(json.dumps(values))
                i = end
    return out


def _optional_first_positional(fn, rest: list[str]) -> list[str]:
    """``onegpu model prepare ORG/NAME``: one bare value first = the first parameter, even with a default.

    jsonargparse makes only parameters without defaults positional. A verb whose first parameter
    has a default also takes it as a bare first argument; ``--NAME VALUE`` keeps working.
    """
    import inspect

    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].default is inspect.Parameter.empty or params[0].kind not in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
        return rest
    if not rest or rest[0].startswith("-") or (len(rest) > 1 and not rest[1].startswith("-")):
        return rest  # no bare first value, or several: leave them to jsonargparse's own error
    return [f"--{params[0].name}", rest[0], *rest[1:]]


def _bare_bool_flags(fn, rest: list[str]) -> list[str]:
    """``--analytic`` alone means ``--analytic true`` (jsonargparse wants a value for every boolean)."""
    import inspect
    import typing

    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: leave the arguments as they are
        hints = {}
    flags = {f"--{p.name}" for p in inspect.signature(fn).parameters.values()
             if p.annotation in (bool, bool | None) or hints.get(p.name) in (bool, bool | None)}
    out = []
    for i, token in enumerate(rest):
        out.append(token)
        if token in flags and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
            out.append("true")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from onegpu import __version__

        print(__version__)
        return 0
    found = _match(argv)
    if found is None:
        print(f"onegpu: unknown verb {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    words, rest = found
    module_name, fn_name, _doc = VERBS[words]
    if not _available(module_name):
        print(f"onegpu: '{' '.join(words)}' is not available in this install (module {module_name} missing)",
              file=sys.stderr)
        return 2
    from jsonargparse import CLI

    fn = getattr(importlib.import_module(module_name), fn_name)
    rest = _bare_bool_flags(fn, _optional_first_positional(
        fn, _gather_list_options(fn, _gather_list_positionals(fn, rest))))
    try:
        result = CLI(fn, args=rest, prog=f"onegpu {' '.join(words)}", as_positional=True)
    except UserError as err:
        print(f"onegpu {' '.join(words)}: error: {err.problem}", file=sys.stderr)
        if err.fix:
            print(f"  fix: {err.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nonegpu: interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0


def entrypoint() -> None:  # console_scripts target
    # Tokenizers' thread pool and a forked DataLoader/server worker don't mix; we rarely need it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
