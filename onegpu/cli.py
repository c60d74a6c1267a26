"""The one ``onegpu`` command: a verb per stage, each a plain function parsed by jsonargparse.

Each verb's options come from its function's signature and docstring (litgpt style; or from option
dataclasses, :func:`takes_options`), so ``onegpu VERB --help`` explains every option, ``--config
FILE.yaml`` loads options from YAML and flags override it wherever they stand
(:func:`config_files_first`). :func:`parse_verb_args` is the one way a verb's arguments are read,
here and by the sweep runner. A verb's function is its front: light to import, it imports its heavy
engine only when it runs, so ``onegpu --help``, ``onegpu VERB --help`` and a mistyped option never
pay for torch.
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
from pathlib import Path

import docstring_parser
import jsonargparse

from onegpu import __version__
from onegpu.budget import charge_from_process_start
from onegpu.contracts import read_yaml
from onegpu.errors import RunStopped, UserError, did_you_mean, exit_code_of
from onegpu.paths import stage_dir
from onegpu.tracking import own_wandb_service

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
    ("day", "plan"): ("onegpu.finetune.verbs", "day_plan", "lay out the 24 h on the rented GPU, every step checked against the track"),
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
    lines += ["", "W&B runs are offline unless WANDB_MODE, `wandb agent` or `wandb offline` say otherwise; see docs/tracking.md."]
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


# ------------------------------------------------------------------------------ argv as users type it
def user_argv(fn: Callable, argv: list[str]) -> list[str]:
    """``argv`` (after the verb words) rewritten into what jsonargparse reads: several bare paths for a list,
    a bare first value, bare boolean flags, config files first."""
    argv = gather_list_positionals(fn, argv)
    argv = gather_list_options(fn, argv)
    argv = optional_first_positional(fn, argv)
    return config_files_first(bare_bool_flags(fn, argv))


def is_list(hint: typing.Any) -> bool:
    return "list" in str(hint).lower()


def gather_list_positionals(fn: Callable, rest: list[str]) -> list[str]:
    """``onegpu report A B C --out X``: several bare values for a list-typed first parameter.

    jsonargparse reads a list positional as one JSON/YAML token (``'[A, B, C]'``); shells and users
    expect space-separated paths, so consecutive bare tokens at the front become that one token.
    """
    required = positional_names(fn)
    if not required or not is_list(verb_parameters(fn)[required[0]].annotation):
        return rest
    bare = 0
    while bare < len(rest) and not rest[bare].startswith("-"):
        bare += 1
    if bare <= 1 or (len(required) > 1 and bare <= len(required)):
        return rest
    return [json.dumps(rest[:bare]), *rest[bare:]]


def gather_list_options(fn: Callable, rest: list[str]) -> list[str]:
    """``--results A B``: the bare values after a list-typed option become its one JSON list token.

    (A value already written as a list, ``'[A, B]'``, or ``null`` is passed as is.)
    """
    lists = {p.name for p in verb_parameters(fn).values()
             if p.default is not inspect.Parameter.empty and is_list(p.annotation)}
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


def optional_first_positional(fn: Callable, rest: list[str]) -> list[str]:
    """``onegpu model prepare ORG/NAME``: one bare value first = the first parameter, even with a default.

    jsonargparse makes only parameters without defaults positional. A verb whose first parameter
    has a default also takes it as a bare first argument; ``--NAME VALUE`` keeps working.
    """
    params = list(verb_parameters(fn).values())
    if not params or params[0].default is inspect.Parameter.empty or params[0].kind not in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
        return rest
    if not rest or rest[0].startswith("-") or (len(rest) > 1 and not rest[1].startswith("-")):
        return rest  # no bare first value, or several: check_argv names the extra ones
    return [f"--{params[0].name}", rest[0], *rest[1:]]


def bare_bool_flags(fn: Callable, rest: list[str]) -> list[str]:
    """``--analytic`` alone means ``--analytic true`` (jsonargparse wants a value for every boolean)."""
    flags = {f"--{name}" for name, hint in type_hints(fn).items() if hint in (bool, bool | None)}
    out = []
    for i, token in enumerate(rest):
        out.append(token)
        if token in flags and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
            out.append("true")
    return out


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
    given = Path(path).expanduser()
    stage, _, rest = given.as_posix().partition("/")
    if given.exists() or given.is_absolute() or stage not in STAGES or not rest:
        return path
    shipped = stage_dir(stage) / rest
    return str(shipped) if shipped.is_file() else path


# ------------------------------------------------------------------------------------ options
def verb_parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    """A verb's options: name -> parameter of its signature, the annotation evaluated (stage modules
    postpone annotations; a :func:`takes_options` verb's signature is generated from its dataclasses)."""
    return dict(inspect.signature(fn, eval_str=True).parameters)


def type_hints(fn: Callable) -> dict[str, typing.Any]:
    """Option name -> its evaluated annotation."""
    return {name: p.annotation for name, p in verb_parameters(fn).items() if p.annotation is not inspect.Parameter.empty}


def positional_names(fn: Callable) -> list[str]:
    """The options without a default: jsonargparse reads them as bare (positional) arguments."""
    return [name for name, p in verb_parameters(fn).items() if p.default is inspect.Parameter.empty]


def literal_values(hint: typing.Any) -> list[typing.Any]:
    """The values a ``Literal[...]`` (possibly inside ``X | None`` or ``Union``) allows; [] if none."""
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    return [v for arg in typing.get_args(hint) for v in literal_values(arg)]


def choices(hint: typing.Any) -> list[typing.Any] | None:
    """The values a choice option takes (a ``Literal``, or ``Literal | None``, None included); else None."""
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    args = typing.get_args(hint)
    if args and type(None) in args and all(a is type(None) or typing.get_origin(a) is typing.Literal for a in args):
        return [*literal_values(hint), None]
    return None


def type_text(hint: typing.Any) -> str:
    values = literal_values(hint)
    if values:
        text = "{" + ", ".join(map(str, values)) + "}"
        return text + " or null" if type(None) in typing.get_args(hint) else text
    if hint is bool:
        return "true or false"
    return re.sub(r"\b(typing|pathlib|builtins)\.", "", getattr(hint, "__name__", None) or str(hint))


# ------------------------------------------------------------------------------------ parsing
def verb_parser(fn: Callable, prog: str) -> jsonargparse.ArgumentParser:
    """The jsonargparse parser of one verb (``fn``'s signature and docstring, plus ``--config``).

    It raises ``jsonargparse.ArgumentError`` instead of printing a usage block and exiting, so
    :func:`explain_parse_error` can say what was wrong and how to fix it.
    """
    hints = type_hints(fn)

    class HelpFormatter(jsonargparse.DefaultHelpFormatter):
        # jsonargparse's type text strips everything up to a dot, so Literal['bnb.nf4'] read as 'nf4'.
        def _get_type_str(self, action):
            hint = hints.get(action.dest)
            return type_text(hint) if literal_values(hint) else super()._get_type_str(action)

    return jsonargparse.auto_parser(fn, prog=prog, as_positional=True, exit_on_error=False,
                                    formatter_class=HelpFormatter)


def parse_verb_args(words: tuple[str, ...], argv: list[str]) -> dict[str, typing.Any]:
    """``onegpu WORDS ARGV``'s arguments, as the verb's function takes them: ``argv`` rewritten as users
    type it (:func:`user_argv`), checked against the verb's options (:func:`check_argv`) and parsed by
    its parser. Every problem is a UserError naming it and the fix; ``--help`` and ``--print_config``
    print and exit (SystemExit). The sweep runner reads each trial's command with it, too."""
    fn, prog = verb_function(words), f"onegpu {' '.join(words)}"
    argv = user_argv(fn, argv)
    check_argv(fn, prog, argv)
    parser = verb_parser(fn, prog)
    try:
        args = parser.instantiate_classes(parser.parse_args(argv))
    except jsonargparse.ArgumentError as err:
        raise explain_parse_error(str(err), fn, prog, argv) from None
    args.pop("config", None)
    return dict(args)


@dataclasses.dataclass
class GivenArgs:
    """What one command line gives a verb: options typed as flags (their text), config files and the
    options they set, and the bare (positional) values."""

    flags: dict[str, str] = dataclasses.field(default_factory=dict)
    configs: dict[str, dict[str, typing.Any]] = dataclasses.field(default_factory=dict)
    bare: list[str] = dataclasses.field(default_factory=list)

    def where(self, key: str) -> str:
        """The option as the user gave it: ``--key``, or ``'key' (in FILE)``."""
        if key in self.flags or not self.configs:
            return f"--{key}"
        return f"{key!r} (in {', '.join(f for f, doc in self.configs.items() if key in doc) or ', '.join(self.configs)})"

    def value(self, key: str) -> typing.Any:
        """What the user gave for ``key``: the flag's text, else the value in the last config file setting it."""
        if key in self.flags:
            return self.flags[key]
        return next((doc[key] for doc in reversed(self.configs.values()) if key in doc), None)

    def keys(self) -> list[str]:
        return list(dict.fromkeys([*(k for doc in self.configs.values() for k in doc), *self.flags]))


def given_args(fn: Callable, prog: str, argv: list[str]) -> GivenArgs:
    """Read ``argv`` (as :func:`user_argv` left it) against the verb's option names: an unknown option (a
    positional one written as a flag included), an option without its value, or a config file that is
    missing, not a YAML mapping or has an unknown key is a UserError here, before jsonargparse."""
    options, given, i = verb_parameters(fn), GivenArgs(), 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--"):
            given.bare.append(token)
            continue
        name, eq, value = token[2:].partition("=")
        if name == "print_config":
            continue
        if (name not in options and name != "config") or name in positional_names(fn):
            raise unknown_option(fn, prog, name, argv[i] if not eq and i < len(argv) else value)
        if not eq:
            if i == len(argv) or argv[i].startswith("--"):
                hint = options[name].annotation if name in options else str
                raise UserError(f"--{name} needs a value", fix=f"--{name} VALUE, where VALUE is {type_text(hint)}")
            value, i = argv[i], i + 1
        if name == "config":
            given.configs[value] = config_keys(fn, prog, value)
        else:
            given.flags[name] = value
    return given


def unknown_option(fn: Callable, prog: str, name: str, value: str) -> UserError:
    if name in positional_names(fn):  # jsonargparse takes a parameter without a default only bare
        return UserError(f"{prog} takes {name.upper()} positionally, not as --{name}",
                         fix=f"give it as the bare argument: {prog} {value or name.upper()} [--OPTION VALUE ...]")
    return UserError(f"{prog} has no option --{name}",
                     fix=did_you_mean(name, [*verb_parameters(fn), "config"], prefix="--") + help_hint(prog))


def config_keys(fn: Callable, prog: str, path: str) -> dict[str, typing.Any]:
    """A ``--config`` file's options, each one the verb has."""
    doc = read_yaml(path, "--config")
    options = verb_parameters(fn)
    for key in doc:
        if key not in options:
            raise UserError(f"unknown key {key!r} in {path}: {prog} has no option --{key}",
                            fix=did_you_mean(str(key), options) + help_hint(prog))
    return doc


def check_argv(fn: Callable, prog: str, argv: list[str]) -> None:
    """What the verb's signature decides alone, before jsonargparse: the options and config keys
    (:func:`given_args`), each choice option's value (a ``Literal``'s values), and bare values beyond
    the positional ones. ``--help`` skips the checks: it prints the help, whatever else is on the line."""
    if "--help" in argv or "-h" in argv:
        return
    given = given_args(fn, prog, argv)
    hints = type_hints(fn)
    for key in given.keys():
        allowed = choices(hints.get(key))
        value = given.value(key)
        null = value is None or (key in given.flags and value == "null")
        if allowed is not None and not (null and None in allowed) and str(value) not in map(str, allowed):
            values = [str(v) for v in allowed if v is not None]
            raise UserError(f"{given.where(key)}: {value!r} is not a valid value",
                            fix=did_you_mean(str(value), values) + f"use one of: {', '.join(values)}")
    required = positional_names(fn)
    if len(given.bare) > len(required):
        bare = [name.upper() for name in required] or [f"[{name.upper()}]" for name in list(verb_parameters(fn))[:1]]
        raise UserError(f"unexpected argument(s): {' '.join(given.bare[len(required):])}",
                        fix=f"usage: {' '.join([prog, *bare])} [--OPTION VALUE ...]; {help_hint(prog)}")


def help_hint(prog: str) -> str:
    return f"`{prog} --help` lists every option"


def explain_parse_error(message: str, fn: Callable, prog: str, argv: list[str]) -> UserError:
    """jsonargparse's parse error for ``prog`` -> a UserError naming the problem and the fix.

    :func:`check_argv` has decided what the verb's signature answers before parsing. Left are a value
    its type rejects (``--lora_r abc``), which jsonargparse names only in its message, ``Parser key
    "KEY": ...`` (the one message read by a pattern), and, after it as jsonargparse orders them, a
    positional argument not given."""
    given = given_args(fn, prog, argv)
    match = re.search(r'Parser key "([^"]+)":', message)
    if match and match.group(1) != "config":
        key, hint = match.group(1), type_hints(fn).get(match.group(1))
        expected = type_text(hint) if hint is not None else "another value"
        fix = f"use {expected}" if hint is bool else f"give a value of type {expected}"
        return UserError(f"{given.where(key)}: {given.value(key)!r} is not valid", fix=f"{fix}; {help_hint(prog)}")
    missing = [name for name in positional_names(fn)[len(given.bare):] if name not in given.keys()]
    if missing:
        return UserError(f"missing {missing[0].upper()}", fix=f"{prog} {missing[0].upper()} ...; {help_hint(prog)}")
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    return UserError(first, fix=help_hint(prog))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
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
    prog = f"onegpu {' '.join(words)}"
    own_wandb_service()  # a stage started from a process that uses W&B still owns its W&B run
    try:
        result = verb_function(words)(**parse_verb_args(words, rest))
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
    charge_from_process_start()  # a run's budget clock starts at the process start, imports included
    # Tokenizers' thread pool and a forked DataLoader/server worker don't mix; we rarely need it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
