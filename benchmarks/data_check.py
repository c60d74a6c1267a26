"""`onegpu data check` vs `onegpu data build`: time to learn what is wrong with a recipe, and how much of it.

Two recipes on ../shared/datasets: the quickstart's (11 sources, no problem) and the same with three
independent problems (a misspelt source, a hub source that cannot be reached, a weight its source cannot
meet). Each command runs as a user runs it (a fresh process, the CLI); the table gives its wall time and the
problems it reports in that one run.

    python benchmarks/data_check.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(args: list[str]) -> tuple[float, int, int]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onegpu", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"})
    seconds = time.perf_counter() - start
    many = re.search(r"error: (\d+) problems:", proc.stderr)
    problems = int(many.group(1)) if many else int(proc.returncode == 2)
    return seconds, proc.returncode, problems


def main() -> None:
    from onegpu.paths import shared_datasets_dir

    data_dir = shared_datasets_dir()
    if data_dir is None:
        sys.exit("no local datasets: put ../shared/datasets beside the checkout or set ONEGPU_DATA_DIR")
    quickstart = REPO / "data" / "recipes" / "quickstart.yaml"
    broken = yaml.safe_load(quickstart.read_text())
    broken["sources"][0]["weight"] = 60  # dolly (34 rows) cannot meet this share
    broken["sources"] += [{"name": "samsum", "weight": 1, "location": "hub"}, {"name": "ethicz", "count": 2}]
    with tempfile.TemporaryDirectory() as tmp:
        broken_path = Path(tmp) / "broken.yaml"
        broken_path.write_text(yaml.safe_dump(broken, sort_keys=False))
        print(f"load average {os.getloadavg()[0]:.1f}\n")
        print("| command | recipe | wall s | exit | problems reported |")
        print("|---|---|---:|---:|---:|")
        for verb in ("check", "build"):
            for name, path in (("quickstart", quickstart), ("quickstart + 3 problems", broken_path)):
                extra = ["--out", str(Path(tmp) / f"out-{verb}")] if verb == "build" else []
                seconds, code, problems = run(["data", verb, str(path), "--data_dir", str(data_dir), *extra])
                print(f"| `onegpu data {verb}` | {name} | {seconds:.1f} | {code} | {problems} |")


if __name__ == "__main__":
    main()
