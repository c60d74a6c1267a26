"""benchmarks/gpu_check.py --tiny: every section of the GPU check runs end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from onegpu.paths import REPO_ROOT


@pytest.mark.slow
def test_gpu_check_tiny_end_to_end(tmp_path, bundled_checkpoint, monkeypatch):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out),
                           "--tokenizer_dir", str(bundled_checkpoint), "--num_threads", "2"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["mode"] == "tiny" and not r["cuda"] and not r["errors"]
    assert r["attention"]["sdpa_vs_alone_max_abs"] < 1e-4  # packed rows compute what the examples compute alone
    assert [t["method"] for t in r["train"]] == ["lora", "qlora-4bit"]
    for t in r["train"]:
        assert t["tokens_per_s"] > 0 and t["litgpt_tokens_per_s"] > 0 and t["speedup_vs_litgpt"] > 0
        assert abs(t["analytic_error"]) <= 0.15  # the analytic peak vs the measured one, as in the validation
    assert len(r["tracks"]) == 4 and all("analytic_fits" in t for t in r["tracks"])
    levels = r["server"]["levels"]
    assert set(levels) == {"1", "4"} and all(lvl["req_per_s"] > 0 for lvl in levels.values())
    assert "| LoRA r=8" in proc.stdout and "batching speed-up" in proc.stdout

    # the planner takes its MFU only from a CUDA run of the check
    from onegpu.finetune.planning.analytic import assumed_mfu
    from onegpu.finetune.planning.memory import Workload

    mfu, source = assumed_mfu(Workload(), None, out)
    assert "CPU run" in source and 0 < mfu < 1
