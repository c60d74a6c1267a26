"""The house rules, read from the source: each module in its stage, short functions, no reaching into
another module's private names, and heavy imports at module tops (a verb's front imports its engine
in one place; the few other in-function imports are optional dependencies, each saying why)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from onegpu.paths import REPO_ROOT

STAGES = ("data", "finetune", "eval", "submission", "sweeps")
MAX_FUNCTION_LINES = 80
MAX_IN_FUNCTION_IMPORTS = 40


@cache
def sources() -> dict[Path, ast.Module]:
    """Every module of the kit (the ground floor and the stages), parsed."""
    files = [f for top in ("onegpu", *STAGES) for f in sorted((REPO_ROOT / top).rglob("*.py"))]
    return {f.relative_to(REPO_ROOT): ast.parse(f.read_text(), str(f)) for f in files}


def functions(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_functions_are_short():
    long = [f"{path}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for path, tree in sources().items() for fn in functions(tree)
            if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_module_imports_another_modules_private_names():
    private = [f"{path}:{node.lineno} from {node.module} import {alias.name}"
               for path, tree in sources().items() for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("onegpu")
               for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not private, private


def test_in_function_imports_are_few_and_each_says_why():
    found, silent = 0, []
    for path, tree in sources().items():
        lines = (REPO_ROOT / path).read_text().splitlines()
        seen = set()
        for fn in functions(tree):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in seen:
                    seen.add(node.lineno)
                    found += 1
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#") and "#" not in above:
                        silent.append(f"{path}:{node.lineno} {here.strip()}")
    assert found < MAX_IN_FUNCTION_IMPORTS, f"{found} imports inside functions (heavy imports go at module tops)"
    assert not silent, f"in-function imports without a reason: {silent}"


def test_the_ground_floor_holds_only_what_stages_share():
    """Each onegpu/ module is used by two or more stages, itself or as the engine of one that is."""
    users: dict[str, set[str]] = {}
    for path, tree in sources().items():
        for name in imported_modules(tree):
            parts = name.split(".")
            if len(parts) >= 2 and parts[0] == "onegpu" and (REPO_ROOT / "onegpu" / f"{parts[1]}.py").is_file():
                users.setdefault(parts[1], set()).add(path.parts[0] if path.parts[0] in STAGES else f"onegpu.{path.stem}")
    entry = {"__init__", "__main__", "cli"}  # the command line itself

    def stages_of(module: str, seen: frozenset = frozenset()) -> set[str]:
        stages = set()
        for user in users.get(module, ()):
            if user in STAGES:
                stages.add(user)
            elif user.startswith("onegpu.") and user[7:] not in seen | {module}:
                stages |= stages_of(user[7:], seen | {module})
        return stages

    lonely = {path.stem: sorted(stages_of(path.stem)) for path in sorted((REPO_ROOT / "onegpu").glob("*.py"))
              if path.stem not in entry and len(stages_of(path.stem)) < 2}
    assert not lonely, f"onegpu/ modules one stage or none uses (move them into that stage): {lonely}"
