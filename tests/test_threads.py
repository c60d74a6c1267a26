"""CPU threads for torch: as asked (--num_threads, then OMP_NUM_THREADS), or the cores free when the work
starts (a busy machine gets 1 thread)."""

from __future__ import annotations

import subprocess
import sys
import time

import torch
from onegpu.threads import other_runnable_tasks, set_cpu_threads, usable_cores


def test_a_busy_machine_gets_one_thread_and_an_explicit_count_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    cores = usable_cores()
    spin = "import time\nt = time.time() + 20\nwhile time.time() < t: pass"
    loops = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores + 1)]
    try:
        time.sleep(1.0)  # let them start spinning
        assert other_runnable_tasks() >= cores  # the kernel sees them (at least all cores' worth)
        line = set_cpu_threads()
        assert torch.get_num_threads() == 1 and line.startswith("1 CPU thread(s)") and "other task(s)" in line
        assert set_cpu_threads(2) == f"2 CPU thread(s), as asked ({cores} cores)" and torch.get_num_threads() == 2
    finally:
        for p in loops:
            p.kill()
        torch.set_num_threads(before)


def test_omp_num_threads_is_used_unless_a_count_is_asked(monkeypatch):
    before = torch.get_num_threads()
    cores = usable_cores()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_cpu_threads() == f"3 CPU thread(s), as OMP_NUM_THREADS asks ({cores} cores)"
        assert torch.get_num_threads() == 3
        assert set_cpu_threads(1) == f"1 CPU thread(s), as asked ({cores} cores)" and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "")  # set but empty: as if unset (the cores free now)
        assert "other task(s)" in set_cpu_threads()
    finally:
        torch.set_num_threads(before)
