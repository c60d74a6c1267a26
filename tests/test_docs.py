"""README.md and docs/*.md say what works: every `onegpu` command of their ```bash blocks parses with its verb's
own parser (`--print_config` stops before anything runs), every link and every file, module or name they point
at exists, every module of the kit is on README's map, and they speak to users only."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
from pathlib import Path

import pytest

from onegpu import cli
from onegpu.paths import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
USER_FACING = [*DOCS, REPO_ROOT / "benchmarks" / "RESULTS.md"]

# `$NAME` in a command: what it stands for there (the commands are parsed, not run, so a path is enough).
VARIABLES = {"CKPT": "runs/base/checkpoint"}  # the checkpoint dir `onegpu model prepare` prints last
# `--config FILE` that is neither in the checkout nor shipped with the kit: the command that writes it. The test
# parses such a command against a stand-in FILE holding no options, so its flags alone are checked.
WRITTEN_BY_AN_EARLIER_COMMAND = {
    "runs/submission/server.yaml": "onegpu submission pack --out runs/submission",
    "runs/sweep-qs/best.yaml": "onegpu sweep sweeps/quickstart.yaml --out runs/sweep-qs (the winner's values)",
}
# Files the docs name that a command writes (so no checkout has them): what writes them.
OUTPUTS = {"benchmarks/gpu_check_results.json": "python benchmarks/gpu_check.py, on a GPU"}
# The stage folders install as these packages (pyproject.toml's package-dir); names like onegpu.data.schema resolve here.
PACKAGE_DIRS = {"onegpu": "onegpu", "onegpu.data": "data", "onegpu.finetune": "finetune", "onegpu.eval": "eval",
                "onegpu.submission": "submission", "onegpu.sweeps": "sweeps"}
CODE_DIRS = ("data", "finetune", "eval", "submission", "sweeps", "onegpu")
# Words that describe how the kit was made, not what a user needs (say "no GPU available", "load average 3.1").
NOT_FOR_USERS = re.compile(r"\bsessions?\b|\blent\b|shared with(?! one eval item)|other jobs|\bhelpers?\b|\bdevelopers?\b",
                           re.I)

FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)


def without_code_blocks(text: str) -> str:
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the block's first command, its text) for each ```bash block of ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == "bash"]


def logical_lines(block: str) -> list[tuple[int, str]]:
    """(line in the block, text) of each line as bash reads it: comments and line continuations gone, a quoted
    newline kept inside its line."""
    lines, out, quote, start, i = [], [], None, 0, 0
    while i < len(block):
        char = block[i]
        if quote:
            out.append(char)
            if char == quote:
                quote = None
            elif char == "\\" and quote == '"' and i + 1 < len(block):
                out.append(block[i + 1])
                i += 1
        elif char == "\\" and i + 1 < len(block):
            if block[i + 1] != "\n":  # an escaped character; a backslash-newline continues the line
                out.append(block[i:i + 2])
            i += 1
        elif char in "'\"":
            quote = char
            out.append(char)
        elif char == "#" and (not out or out[-1][-1] in " \t;&|("):  # a comment, to the end of the line
            while i + 1 < len(block) and block[i + 1] != "\n":
                i += 1
        elif char == "\n":
            lines.append((start, "".join(out)))
            out, start = [], block.count("\n", 0, i + 1)
        else:
            out.append(char)
        i += 1
    return [(n, text) for n, text in [*lines, (start, "".join(out))] if text.strip()]


def simple_commands(line: str) -> list[list[str]]:
    """The words of each command on a line: split at ; & && | || ( ) and `$(`, redirections dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    commands, words, redirect = [], [], False
    for token in lexer:
        if redirect:
            redirect = False
        elif token and set(token) <= set("<>"):
            redirect = True
        elif token and set(token) <= set("();|&"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [c for c in commands + [words] if c]


def without_env_assignments(words: list[str]) -> list[str]:
    """`HF_TOKEN=hf_... onegpu ...` -> `onegpu ...` (also `CKPT=$` left of a `$(` command substitution)."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    return words


def commands_in_docs() -> list[tuple[str, list[str]]]:
    """(where, words) of every command in the docs' ```bash blocks."""
    found = []
    for path in DOCS:
        for first, block in bash_blocks(path):
            for offset, line in logical_lines(block):
                for words in simple_commands(line):
                    if words := without_env_assignments(words):
                        found.append((f"{path.relative_to(REPO_ROOT)}:{first + offset}", words))
    return found


COMMANDS = commands_in_docs()
ONEGPU = [(where, words[1:]) for where, words in COMMANDS if words and words[0] == "onegpu"]


def test_the_docs_have_commands_to_check():
    """The extraction itself: a docs change that hid the commands from it would pass every test below vacuously."""
    pages = {where.split(":")[0] for where, _ in ONEGPU}
    assert len(ONEGPU) >= 60 and {"README.md", "docs/data.md", "docs/finetuning.md", "docs/evaluation.md"} <= pages
    serve = next(argv for _, argv in ONEGPU if argv[:1] == ["serve"] and "vllm_args" in " ".join(argv))
    assert serve[serve.index("--vllm_args") + 1] == '{"enforce_eager": true}'  # quotes and comments read as bash reads them


def expand_variables(argv: list[str], where: str) -> list[str]:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"{where}: ${name} has no stand-in: add it to VARIABLES in tests/test_docs.py"
        return VARIABLES[name]

    return [re.sub(r"\$\{(\w+)\}|\$(\w+)", value, word) for word in argv]


def config_files(argv: list[str]) -> list[str]:
    return [argv[i + 1] if word == "--config" else word.split("=", 1)[1]
            for i, word in enumerate(argv) if (word == "--config" and i + 1 < len(argv)) or word.startswith("--config=")]


@pytest.mark.parametrize("where,argv", ONEGPU, ids=[f"{w} {' '.join(a[:2])}" for w, a in ONEGPU])
def test_every_onegpu_command_parses(where, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths are the user's; shipped configs are found from any directory
    argv = expand_variables(argv, where)
    for config in config_files(argv):
        if not Path(cli.locate_config(config)).is_file():
            assert config in WRITTEN_BY_AN_EARLIER_COMMAND, (
                f"{where}: --config {config} is neither shipped nor written by a command listed in "
                "WRITTEN_BY_AN_EARLIER_COMMAND (tests/test_docs.py)")
            (tmp_path / config).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / config).write_text("{}\n")
    if argv[:1] in (["--help"], ["-h"]):
        assert cli.main(argv) == 0
        return
    try:
        code = cli.main([*argv, "--print_config"])
    except SystemExit as parsed:
        assert parsed.code in (0, None), f"{where}: onegpu {shlex.join(argv)}\n{capsys.readouterr().err}"
    else:
        pytest.fail(f"{where}: onegpu {shlex.join(argv)} did not parse (exit {code}):\n{capsys.readouterr().err}")


def test_planning_shows_the_analytic_plan_as_it_prints(tmp_path, monkeypatch, capsys):
    """docs/planning.md's example is the command's own output, as on a machine with room on its disk (the page says
    what changes where there is none) and without GPU check results (the page's MFUs are the assumed ones)."""
    monkeypatch.setenv("ONEGPU_GPU_CHECK", str(tmp_path / "no-gpu-check.json"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**50, 0, 2**50))
    monkeypatch.chdir(tmp_path)  # the plan's files go under runs/
    command = "onegpu finetune plan --config finetune/configs/llama2-7b-qlora-rtx4090.yaml --analytic"
    assert cli.main(shlex.split(command)[1:]) == 0
    page = (REPO_ROOT / "docs" / "planning.md").read_text()
    block = re.search(re.escape(f"`{command}` prints") + r"[^\n]*(?:\n[^\n]+)*\n\n```\n(.*?)\n```", page, re.S)
    assert block, "docs/planning.md no longer shows what the analytic plan prints"
    assert block.group(1).strip() == capsys.readouterr().out.strip()


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (REPO_ROOT / "Makefile").read_text(), re.M))


def test_every_make_target_and_script_the_docs_run_exists():
    """In ```bash blocks and in the prose (`make helm-venv`): every make target, and every script run from the checkout."""
    targets = make_targets()
    missing = [f"{path.relative_to(REPO_ROOT)}: {span}" for path in DOCS for span in code_spans(path)
               if re.fullmatch(r"make [\w.-]+", span) and span.split()[1] not in targets]
    for where, words in COMMANDS:
        if words[:1] == ["make"]:
            missing += [f"{where}: make {t}" for t in words[1:] if not t.startswith("-") and t not in targets]
        if words and Path(words[0]).name in ("python", "python3", "bash"):
            missing += [f"{where}: {w}" for w in words[1:]
                        if re.fullmatch(r"(benchmarks|tests)/[\w/.-]+\.(py|sh)", w) and not (REPO_ROOT / w).is_file()]
    assert not missing, "the docs run what is not there:\n" + "\n".join(missing)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces -> '-', repeats -N."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", without_code_blocks(path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_every_relative_link_points_at_what_exists():
    broken = []
    for path in DOCS:
        prose = re.sub(r"`[^`\n]*`", "", without_code_blocks(path.read_text()))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:: not on this machine
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(REPO_ROOT)}: ({target}): no such file")
            elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
                broken.append(f"{path.relative_to(REPO_ROOT)}: ({target}): no heading with that anchor")
    assert not broken, "\n".join(broken)


def code_spans(path: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", without_code_blocks(path.read_text()))


def test_every_file_the_docs_name_exists():
    """`data/recipe.py`, `finetune/configs/cpu-quickstart.yaml`... in the prose: a moved module fails here, by name."""
    repo_file = re.compile(rf"(?:{'|'.join(CODE_DIRS)}|benchmarks|tests|docs)/[a-z0-9_/.-]*\.(?:py|yaml|conf|json|sh|md)")
    missing = sorted({f"{path.relative_to(REPO_ROOT)}: {span}" for path in DOCS for span in code_spans(path)
                      if repo_file.fullmatch(span) and span not in OUTPUTS and not (REPO_ROOT / span).is_file()})
    assert not missing, "the docs name files that are not there (moved? update the docs):\n" + "\n".join(missing)


def module_file(dotted: str) -> Path | None:
    for package, folder in sorted(PACKAGE_DIRS.items(), key=lambda item: -len(item[0])):
        if dotted == package or dotted.startswith(package + "."):
            base = REPO_ROOT / folder / Path(*dotted[len(package):].lstrip(".").split("."))
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
    return None


def defines(module: Path, name: str) -> bool:
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def test_every_python_name_the_docs_give_is_defined():
    """`onegpu.contracts.artifact_name`, `onegpu.inference.uses_bos`...: the module, then the name in it."""
    missing = []
    for path in DOCS:
        for span in code_spans(path):
            if not re.fullmatch(r"onegpu(\.\w+)+", span):
                continue
            parts = span.split(".")
            module = next(((n, f) for n in range(len(parts), 0, -1) if (f := module_file(".".join(parts[:n])))), None)
            if module is None or (module[0] < len(parts) and not defines(module[1], parts[module[0]])):
                missing.append(f"{path.relative_to(REPO_ROOT)}: {span}")
    assert not missing, "the docs name Python that is not there (moved? update the docs):\n" + "\n".join(missing)


def test_readme_maps_every_module():
    """README's "Where things live" names every module of the kit, so a newcomer finds each one from its step."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Where things live"):]
    section = section[:section.index("\n## ", 1)]
    modules = sorted(p.relative_to(REPO_ROOT).as_posix() for folder in CODE_DIRS for p in (REPO_ROOT / folder).rglob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    unmapped = [m for m in modules if f"`{m}`" not in section]
    assert not unmapped, "README's map (\"Where things live\") lacks: " + ", ".join(unmapped)


def test_the_docs_speak_to_users():
    said = [f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}" for path in USER_FACING
            for n, line in enumerate(path.read_text().splitlines(), 1) if NOT_FOR_USERS.search(line)]
    assert not said, "say what the user needs (the machine, its load average, 'no GPU available'):\n" + "\n".join(said)
