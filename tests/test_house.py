"""The shared pieces every stage runs through: the tracked run's exit code on success, error and SIGTERM,
the one text-table renderer, the one YAML reader that names what is wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from onegpu.contracts import read_yaml
from onegpu.errors import UserError
from onegpu.tables import text_table

RUN_BLOCK = textwrap.dedent("""
    import os, signal, sys, time
    from onegpu.errors import UserError, exit_code_of
    from onegpu.tracking import Run
    try:
        with Run("demo", sys.argv[1], {"x": 1}):
            how = sys.argv[2]
            if how == "error":
                raise ValueError("boom")
            if how == "bad-input":
                raise UserError("bad", fix="good")
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
    except BaseException as err:
        sys.exit(exit_code_of(err))
""")


@pytest.mark.parametrize("how,code", [("ok", 0), ("error", 1), ("bad-input", 2), ("sigterm", 143)])
def test_a_tracked_run_records_how_it_ended(tmp_path, how, code):
    out = tmp_path / how
    done = subprocess.run([sys.executable, "-c", RUN_BLOCK, str(out), how], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"}, timeout=120)
    assert done.returncode == code, done.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["exit_code"] == code and (out / "summary.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process's handler is untouched


def test_text_table_aligns_columns_and_formats_cells():
    table = text_table(["task", "score", "n"], [["mmlu", 0.123456, 5], ["a-long-task-name", None, 12]])
    lines = table.splitlines()
    assert lines[0].index("score") == lines[1].index("0.1235") and lines[0].index("n") == lines[2].index("12")
    assert lines[2].startswith("a-long-task-name  ") and lines[2].endswith("12")
    assert all(line == line.rstrip() for line in lines)
    cut = text_table(["path"], [["/a/long/path/to/train.csv"], ["short"]], max_width=10).splitlines()
    assert cut[1] == "/a/long/p…" and cut[2] == "short"  # a cut cell says it was cut


@pytest.mark.parametrize("text,problem", [
    ("a: [1, 2\n", "is not valid YAML at line"), ("- a\n- b\n", "is a YAML list, not a mapping"), (None, "does not exist"),
])
def test_read_yaml_names_the_file_and_what_is_wrong(tmp_path, text, problem):
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError) as err:
        read_yaml(path, "recipe")
    assert problem in err.value.problem and str(path) in err.value.problem and err.value.fix
    path.write_text("a: 1\n")
    assert read_yaml(path, "recipe") == {"a": 1}
