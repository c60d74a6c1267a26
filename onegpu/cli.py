"""The one ``onegpu`` command: a verb per stage, each a plain function parsed by jsonargparse.

Each verb's options come from its function's signature and docstring (litgpt style), so
``onegpu VERB --help`` explains every option, ``--config FILE.yaml`` loads options from YAML and
flags override it wherever they stand (:func:`config_files_first`). Stage modules are imported
only when their verb runs, so ``onegpu --help`` and ``onegpu data ...`` never pay for importing
torch-heavy stages they do not use.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping

import docstring_parser

from onegpu.errors import RunStopped, UserError, did_you_mean, exit_code_of

# verb words -> (module, function, one-line description). Order is the order of --help.
VERBS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("quickstart",): ("onegpu.sweeps.quickstart", "quickstart", "run the whole pipeline on the bundled model (offline, CPU)"),
    ("model", "prepare"): ("onegpu.model", "prepare", "make a litgpt checkpoint: bundled SmolLM2, a hub id or a local HF dir"),
    ("model", "push"): ("onegpu.submission.publish", "push", "publish a fine-tuned checkpoint to the Hugging Face Hub with a lineage card"),
    ("data", "build"): ("onegpu.data.build", "build", "build a training mix from a recipe YAML -> train/val/rejects JSONL + manifest"),
    ("data", "check"): ("onegpu.data.check", "check", "every problem of a recipe in seconds: sources, rows, tokens, weights, families"),
    ("data", "reweight"): ("onegpu.data.reweight", "reweight", "the next recipe from eval val results: weights toward weak tasks (bounded, floored)"),
    ("data", "sources"): ("onegpu.data.sources", "list_sources", "list the registered datasets with licence and provenance"),
    ("finetune",): ("onegpu.finetune.verbs", "finetune", "LoRA/QLoRA fine-tuning with packing, telemetry and a budget clock"),
    ("finetune", "plan"): ("onegpu.finetune.verbs", "plan", "measure memory and speed of a config before spending the budget"),
    ("day", "plan"): ("onegpu.finetune.planning.day", "day_plan", "lay out the 24 h on the rented GPU, every step checked against the track"),
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
    lines += ["", "W&B runs are offline unless WANDB_MODE, `wandb agent` or `wandb offline` say otherwise; see README.md."]
    return "\n".join(lines)


def match_verb(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """(verb words, the rest of argv) for ``argv`` after ``onegpu``, or None if it names no verb.

    Longest match wins: ``finetune plan`` before ``finetune``. The sweep runner uses it too.
    """
    for n in (2, 1):
        words = tuple(argv[:n])
        if len(words) == n and words in VERBS:
            return words, argv[n:]
    return None


def verb_function(words: tuple[str, ...]):
    """The function behind a verb (its signature and docstring are the verb's options)."""
    module_name, fn_name, _doc = VERBS[words]
    return getattr(importlib.import_module(module_name), fn_name)


# ---------------------------------------------------------------------- options from dataclasses
# A verb with many options declares them once, as dataclass fields, each documented by the string
# under it (an attribute docstring, as litgpt's TrainArgs): `takes_options` turns the fields into the
# verb's flat signature and --help text, and the flat values back into the dataclasses.
def option_parameters(cls: type) -> list[inspect.Parameter]:
    """The options of dataclass ``cls``, flat: one per field, typed and defaulted as the field; a field
    whose type is a dataclass (a group of options) stands for that group's fields, in order."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            params += option_parameters(hints[f.name])
        else:
            default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
            params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                            annotation=hints[f.name]))
    return params


def option_docs(cls: type) -> dict[str, str]:
    """{flat option name: the docstring under its field}, groups included (docstring_parser reads them)."""
    hints = typing.get_type_hints(cls)
    docs = {p.arg_name: inspect.cleandoc(p.description or "")
            for p in docstring_parser.parse_from_object(cls).params if p.args[0] == "attribute"}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            docs.pop(f.name, None)
            docs.update(option_docs(hints[f.name]))
    return docs


def options_from(cls: type, values: Mapping[str, typing.Any]) -> typing.Any:
    """``cls`` built from flat option values (every name of :func:`option_parameters`, groups by their fields)."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: options_from(hints[f.name], values) if dataclasses.is_dataclass(hints[f.name])
                  else values[f.name] for f in dataclasses.fields(cls)})


def takes_options(*classes: type) -> Callable[[Callable], Callable]:
    """A function of option dataclasses, ``fn(a: A, b: B)``, as one of flat options: ``fn(x=1, y=2)``.

    The decorated function's signature is the fields of ``classes``, flat and in order (what
    jsonargparse parses, so the flat names are the CLI's and the ``--config`` YAML's), and its
    docstring gains an ``Args:`` section with every field's doc (what ``--help`` shows). A call
    binds the flat values (positional ones too), fills in the defaults and builds the dataclasses;
    an unknown name is a TypeError, as for any function.
    """
    params = [p for cls in classes for p in option_parameters(cls)]
    signature = inspect.Signature(params)
    docs = {name: doc for cls in classes for name, doc in option_docs(cls).items()}
    undocumented = [p.name for p in params if not docs.get(p.name)]
    if undocumented:  # --help must explain every option
        raise TypeError(f"options without a docstring under their field: {undocumented}")
    args = "\n".join(f"    {p.name}: " + docs[p.name].replace("\n", "\n        ") for p in params)

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def verb(*positional: typing.Any, **named: typing.Any) -> typing.Any:
            bound = signature.bind(*positional, **named)
            bound.apply_defaults()
            return fn(*(options_from(cls, bound.arguments) for cls in classes))

        verb.__signature__ = signature
        verb.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n{args}\n"
        return verb

    return decorate


def gather_list_positionals(fn, rest: list[str]) -> list[str]:
    """``onegpu report A B C --out X``: several bare values for a list-typed first parameter.

    jsonargparse reads a list positional as one JSON/YAML token (``'[A, B, C]'``); shells and users
    expect space-separated paths, so consecutive bare tokens at the front become that one token.
    """
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
    hints = _type_hints(fn)
    flags = {f"--{name}" for name, hint in hints.items() if hint in (bool, bool | None)}
    out = []
    for i, token in enumerate(rest):
        out.append(token)
        if token in flags and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
            out.append("true")
    return out


# ------------------------------------------------------------------------------------ parsing
def verb_parameters(fn) -> dict[str, typing.Any]:
    """A verb's options as its parser has them: name -> parameter (``.annotation`` evaluated, ``.default``).

    Most verbs are plain functions. ``onegpu finetune`` and ``finetune plan`` take ``**options`` and
    hand them to ``finetune_options``, which jsonargparse follows for the parser; asking jsonargparse's
    own parameter resolver (internal, hence the pinned version) keeps the error messages, --help and
    bare boolean flags below in step with every option the parser accepts.
    """
    from jsonargparse._parameter_resolvers import get_signature_parameters

    return {p.name: p for p in get_signature_parameters(fn, logger=False)}


def _type_hints(fn) -> dict[str, typing.Any]:
    """Option name -> its evaluated annotation (stage modules use postponed annotations)."""
    try:
        params = verb_parameters(fn)
    except (NameError, TypeError):
        return {}
    return {name: p.annotation for name, p in params.items() if p.annotation is not inspect.Parameter.empty}


def literal_values(hint: typing.Any) -> list[typing.Any]:
    """The values a ``Literal[...]`` (possibly inside ``X | None`` or ``Union``) allows; [] if none."""
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    return [v for arg in typing.get_args(hint) for v in literal_values(arg)]


def _type_text(hint: typing.Any) -> str:
    values = literal_values(hint)
    if values:
        text = "{" + ", ".join(map(str, values)) + "}"
        return text + " or null" if type(None) in typing.get_args(hint) else text
    if hint is bool:
        return "true or false"
    return re.sub(r"\b(typing|pathlib|builtins)\.", "", getattr(hint, "__name__", None) or str(hint))


def verb_parser(fn, prog: str):
    """The jsonargparse parser of one verb (``fn``'s signature and docstring, plus ``--config``).

    It raises ``jsonargparse.ArgumentError`` instead of printing a usage block and exiting, so
    :func:`explain_parse_error` can say what was wrong and how to fix it.
    """
    from jsonargparse import auto_parser
    from jsonargparse import DefaultHelpFormatter

    hints = _type_hints(fn)

    class HelpFormatter(DefaultHelpFormatter):
        # jsonargparse's type text strips everything up to a dot, so Literal['bnb.nf4'] read as 'nf4'.
        def _get_type_str(self, action):
            hint = hints.get(action.dest)
            return _type_text(hint) if literal_values(hint) else super()._get_type_str(action)

    return auto_parser(fn, prog=prog, as_positional=True, exit_on_error=False, formatter_class=HelpFormatter)


def config_files_first(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config FILE`` moved to the front (their own order kept), each FILE located
    by :func:`locate_config`.

    jsonargparse applies arguments left to right, so ``--budget=45m --config=day.yaml`` would let the
    file's ``budget`` win. W&B's agent renders a sweep's parameters sorted by name, which puts
    ``--config`` wherever its name falls; reading config files first makes every explicit flag (a
    sweep's own values included) override them, whatever the order.
    """
    files, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            files += ["--config", locate_config(argv[i + 1])]
            i += 2
            continue
        if argv[i].startswith("--config="):
            files.append("--config=" + locate_config(argv[i].split("=", 1)[1]))
        else:
            rest.append(argv[i])
        i += 1
    return files + rest


STAGES = ("data", "finetune", "eval", "submission", "sweeps")


def locate_config(path: str) -> str:
    """A config path as given, or, where nothing is there, the shipped file it names: the checkout-relative
    ``finetune/configs/X.yaml`` from any directory, in a checkout or an installed kit (sweeps name
    their configs that way and run wherever ``onegpu sweep`` is started)."""
    from pathlib import Path

    given = Path(path).expanduser()
    stage, _, rest = given.as_posix().partition("/")
    if given.exists() or given.is_absolute() or stage not in STAGES or not rest:
        return path
    from onegpu.paths import stage_dir

    shipped = stage_dir(stage) / rest
    return str(shipped) if shipped.is_file() else path


def _config_files(argv: list[str]) -> list[str]:
    return [argv[i + 1] if a == "--config" else a.split("=", 1)[1] for i, a in enumerate(argv)
            if (a == "--config" and i + 1 < len(argv)) or a.startswith("--config=")]


def explain_parse_error(message: str, fn, prog: str, argv: list[str]) -> UserError:
    """jsonargparse's parse error for ``prog`` -> a UserError naming the problem and the fix."""
    hints = _type_hints(fn)
    options = [*verb_parameters(fn), "config"]
    help_hint = f"`{prog} --help` lists every option"
    configs = _config_files(argv)

    def where(key: str) -> str:  # the flag as typed, or the config file it came from
        typed = any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv)
        return f"--{key}" if typed or not configs else f"{key!r} (in {', '.join(configs)})"

    if match := re.search(r"Unrecognized arguments: (.*)", message):
        tokens = match.group(1).split()
        flag = next((t for t in tokens if t.startswith("--")), None)
        if flag is None:
            params = list(inspect.signature(fn).parameters.values())
            bare = [p.name.upper() for p in params if p.default is inspect.Parameter.empty]
            if not bare and params:  # _optional_first_positional: the first option also goes bare
                bare = [f"[{params[0].name.upper()}]"]
            return UserError(f"unexpected argument(s): {' '.join(tokens)}",
                             fix=f"usage: {' '.join([prog, *bare])} [--OPTION VALUE ...]; {help_hint}")
        name = flag[2:].split("=", 1)[0]
        return UserError(f"{prog} has no option --{name}",
                         fix=did_you_mean(name, options, prefix="--") + help_hint)
    if match := re.search(r"Key '([^']+)' is not expected", message):
        key = match.group(1)
        origin = f" in {', '.join(configs)}" if configs else ""
        return UserError(f"unknown key {key!r}{origin}: {prog} has no option --{key}",
                         fix=did_you_mean(key.split(".")[0], options) + help_hint)
    if re.search(r"Problems parsing config|Unexpected config", message):
        first = message.strip().splitlines()[0]
        return UserError(f"{', '.join(configs) or 'the config'} is not a YAML mapping of options ({first})",
                         fix=f"write one option per line as `key: value` (e.g. `lora_r: 16`); {help_hint}")
    if match := re.search(r'Key "([^"]+)" is required', message):
        key = match.group(1)
        return UserError(f"missing {key.upper()}", fix=f"{prog} {key.upper()} ...; {help_hint}")
    if match := re.search(r"argument --(\S+): expected one argument", message):
        key = match.group(1)
        return UserError(f"--{key} needs a value", fix=f"--{key} VALUE, where VALUE is {_type_text(hints.get(key, str))}")
    if match := re.search(r'Parser key "([^"]+)":', message):
        key = match.group(1)
        value = re.search(r"(?:Given value|Got value): (.*)", message)
        value = value.group(1).strip() if value else None
        if key == "config":
            detail = message.split(":", 1)[1].strip().splitlines()[0]
            return UserError(f"--config: {detail}", fix="pass an existing YAML file whose keys are options of " + prog)
        allowed = literal_values(hints.get(key))
        if allowed:
            return UserError(f"{where(key)}: {value!r} is not a valid value",
                             fix=did_you_mean(str(value), [str(v) for v in allowed]) +
                             f"use one of: {', '.join(map(str, allowed))}")
        expected = _type_text(hints[key]) if key in hints else "another value"
        fix = f"use {expected}" if hints.get(key) is bool else f"give a value of type {expected}"
        return UserError(f"{where(key)}: {value!r} is not valid", fix=f"{fix}; {help_hint}")
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    return UserError(first, fix=help_hint)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from onegpu import __version__

        print(__version__)
        return 0
    found = match_verb(argv)
    if found is None:
        print(f"onegpu: unknown verb {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    words, rest = found
    module_name = VERBS[words][0]
    if not _available(module_name):
        print(f"onegpu: '{' '.join(words)}' is not available in this install (module {module_name} missing)",
              file=sys.stderr)
        return 2
    import jsonargparse

    fn = verb_function(words)
    prog = f"onegpu {' '.join(words)}"
    rest = config_files_first(_bare_bool_flags(fn, _optional_first_positional(
        fn, _gather_list_options(fn, gather_list_positionals(fn, rest)))))
    try:
        parser = verb_parser(fn, prog)
        try:
            args = parser.instantiate_classes(parser.parse_args(rest))
        except jsonargparse.ArgumentError as err:
            raise explain_parse_error(str(err), fn, prog, rest) from None
        args.pop("config", None)
        result = fn(**args)
    except UserError as err:
        print(f"{prog}: error: {err.problem}", file=sys.stderr)
        if err.fix:
            print(f"  fix: {err.fix}", file=sys.stderr)
        return exit_code_of(err)
    except RunStopped as stop:
        print(f"{prog}: {stop}", file=sys.stderr)
        return exit_code_of(stop)
    except KeyboardInterrupt as interrupted:
        print("\nonegpu: interrupted", file=sys.stderr)
        return exit_code_of(interrupted)
    return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0


def entrypoint() -> None:  # console_scripts target (and python -m onegpu)
    from onegpu.budget import charge_from_process_start

    charge_from_process_start()  # a run's budget clock starts at the process start, imports included
    # Tokenizers' thread pool and a forked DataLoader/server worker don't mix; we rarely need it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
