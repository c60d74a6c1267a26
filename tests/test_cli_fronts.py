"""Light fronts, heavy engines: for every verb, `onegpu VERB --help` and a mistyped option answer without
importing torch, lightning, transformers, litgpt, lm_eval, wandb, datasets, bitsandbytes, optuna or
matplotlib (a verb's engine loads them only when the verb runs).

Each verb runs in a fresh interpreter through ``onegpu.cli.main``, both ways; the child reports the exit
codes, what it printed, the heavy modules in ``sys.modules`` at the end and, for each, the project line
whose import pulled it in first, so a failure names the module to make light.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from onegpu.cli import VERBS
from onegpu.paths import REPO_ROOT

HEAVY = ("torch", "lightning", "transformers", "litgpt", "lm_eval", "wandb", "datasets", "bitsandbytes", "optuna",
         "matplotlib")

# Runs `onegpu WORDS --help` and `onegpu WORDS --no_such_option 1` in this interpreter; prints one JSON line.
PROBE = """
import contextlib, io, json, os, sys, time, traceback
heavy, root, words = json.loads(os.environ["HEAVY"]), os.environ["ROOT"], sys.argv[1:]
first_importer = {}

class FirstImporter:  # notes the project line that imports each heavy package first; finds nothing itself
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in heavy and top not in first_importer:
            ours = [f"{os.path.relpath(f.filename, root)}:{f.lineno}" for f in traceback.extract_stack()
                    if f.filename.startswith(root) and "/.venv" not in f.filename]
            first_importer[top] = ours[-1] if ours else "?"
        return None

sys.meta_path.insert(0, FirstImporter())
started = time.perf_counter()
from onegpu.cli import main
cases = {}
for args in (["--help"], ["--no_such_option", "1"]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*words, *args])
        except SystemExit as exit:
            code = exit.code
    cases[args[0]] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
loaded = sorted(name for name in heavy if name in sys.modules)
print(json.dumps({"cases": cases, "heavy": {name: first_importer.get(name, "?") for name in loaded},
                  "seconds": time.perf_counter() - started}))
"""


def run_front(words: tuple[str, ...]) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline", "HEAVY": json.dumps(HEAVY), "ROOT": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, *words], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("words", list(VERBS), ids=[" ".join(words) for words in VERBS])
def test_help_and_a_mistyped_option_import_nothing_heavy(words):
    probe = run_front(words)
    helped, wrong = probe["cases"]["--help"], probe["cases"]["--no_such_option"]
    prog = "onegpu " + " ".join(words)
    assert helped["code"] == 0 and f"usage: {prog}" in helped["stdout"], helped
    assert wrong["code"] == 2 and f"{prog} has no option --no_such_option" in wrong["stderr"], wrong
    print(f"{prog}: --help and --no_such_option in {probe['seconds']:.2f} s")
    assert not probe["heavy"], f"{prog} imports heavy modules for --help / a config error: " + ", ".join(
        f"{name} (first from {where})" for name, where in probe["heavy"].items())
    assert probe["seconds"] < 5  # a loose bound: a second or two, not the tens that loading torch takes
