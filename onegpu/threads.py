"""How many CPU threads torch gets: the cores nobody else is using when the work starts.

On a shared CPU, more torch threads than free cores make the threads of each parallel region wait
for whichever one the scheduler parked: measured on 2 cores beside 3 busy loops (load ~8), one LoRA
forward + backward of 512 tokens on the bundled model took 54 s with 1 thread and 133 s with 2
(benchmarks/RESULTS.md, quickstart section). On an idle machine every core is free and all are used.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def other_runnable_tasks(samples: int = 5, interval_s: float = 0.05) -> int:
    """Tasks running or ready to run on this machine right now, this one excluded.

    The kernel's instantaneous count (``/proc/loadavg``'s 4th field), median of a few samples: the
    1-minute load average still holds the previous pipeline step for a minute after it ended.
    """
    counts = []
    for i in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return round(os.getloadavg()[0])
        counts.append(max(0, running - 1))  # minus this process, which is running while it reads
        if i < samples - 1:
            time.sleep(interval_s)
    return int(statistics.median(counts))


def set_cpu_threads(requested: int | None = None) -> str:
    """Set torch's intra-op threads to ``requested``, or (None, 0) to ``OMP_NUM_THREADS`` when the environment
    sets it (the usual way to share a machine between jobs), else to the cores free now; say which and why."""
    cores = usable_cores()
    if requested:
        torch.set_num_threads(requested)
        return f"{requested} CPU thread(s), as asked ({cores} cores)"
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        torch.set_num_threads(int(from_env))
        return f"{int(from_env)} CPU thread(s), as OMP_NUM_THREADS asks ({cores} cores)"
    # Inside a CPU-limited container the kernel's count is the whole host's: all of our cores, then.
    busy = other_runnable_tasks() if cores == (os.cpu_count() or cores) else 0
    threads = max(1, cores - busy)
    torch.set_num_threads(threads)
    return (f"{threads} CPU thread(s): {cores} cores, {busy} other task(s) running now "
            "(more threads than free cores make torch's threads wait for each other)")
