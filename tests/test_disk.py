"""Disk before work: `onegpu finetune` sizes what it will write (finetune/disk.py) and refuses to start
without the room; a disk that fills up during a save keeps the previous checkpoint whole and loadable;
space gone before the merge keeps the adapter checkpoint and says how to merge later.

The small disks are size-limited tmpfs mounts (root only; elsewhere these tests are skipped, saying why).
W&B is off on them (WANDB_MODE=disabled): its own files would land on the small disk too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onegpu.finetune.tiny import make_data_dir, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bundled_checkpoint, shared_datasets):
    root = tmp_path_factory.mktemp("disk")
    return {"ckpt": make_tiny_checkpoint(root / "ckpt", bundled_checkpoint),
            "data": make_data_dir(root / "data", shared_datasets, n_train=24, n_val=8, max_seq_length=64)}


def _cmd(tiny, out: Path, **extra) -> list[str]:
    # LoRA on the LM head too: a 4.6 MiB checkpoint, larger than what the full-disk tests leave free
    args = {"data": tiny["data"], "checkpoint_dir": tiny["ckpt"], "out_dir": out, "micro_batch_size": 2,
            "global_batch_size": 2, "max_seq_length": 64, "learning_rate": 3e-3, "warmup_steps": 1, "max_steps": 8,
            "save_interval": 2, "keep_last": 2, "num_threads": 1, "eval_interval": 0, "num_samples": 0,
            "progress": "false", "save_interval_minutes": 0, "lora_head": "true", **extra}
    return [sys.executable, "-m", "onegpu", "finetune", *[x for k, v in args.items() for x in (f"--{k}", str(v))]]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **extra}


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["_step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("disk-ref") / "ft"
    done = subprocess.run(_cmd(tiny, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(MiB)``: a fresh tmpfs of that size (unmounted after the test)."""
    mounted = []

    def mount(mib: int) -> Path:
        path = tmp_path / f"disk-{mib}m"
        path.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a size-limited tmpfs needs root and mount(8); without them the full-disk tests cannot run")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here (`mount -t tmpfs`: {done.stderr.strip()})")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of ``disk`` (another program filling it)."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, shutil.disk_usage(disk).free - leave)
    return filler


def _run_until(cmd, env, ready, timeout=300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return proc


@pytest.mark.slow
def test_disk_need_is_what_a_run_writes(reference, tiny):
    """The formula's parts against the files of a real run: merged weights exact, the rest upper bounds."""
    from onegpu.finetune import disk
    from onegpu.finetune.config import resolve
    from onegpu.finetune.options import finetune_options

    cfg = resolve(finetune_options(data=str(tiny["data"]), checkpoint_dir=tiny["ckpt"], out_dir=reference,
                                   lora_head=True, max_seq_length=64))
    sizes = disk.config_sizes(cfg)
    final = reference / "final"
    assert sizes.merged == pytest.approx((final / "lit_model.pth").stat().st_size, rel=0.01)
    checkpoint = (reference / "checkpoints" / "step-000008" / "state.pt").stat().st_size
    assert checkpoint <= sizes.checkpoint <= checkpoint + disk.TRAIN_STATE_BYTES
    assert (final / "lit_model.pth.lora").stat().st_size <= sizes.adapter + 64 * 1024
    assert sum(p.stat().st_size for p in final.iterdir()) <= sizes.merged + sizes.adapter + sizes.small_files


@pytest.mark.slow
def test_a_run_that_cannot_fit_is_refused_before_the_model_loads(tiny, small_disk):
    disk = small_disk(40)  # the run needs ~77 MiB with the margin
    done = subprocess.run(_cmd(tiny, disk / "ft"), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"not enough free disk for this fine-tune: {disk}: needs " in done.stderr
    for part in ("step checkpoints (3 x 5.5 MiB)", "merged model: 24.3 MiB", "MiB free", "fix:", "--keep_last"):
        assert part in done.stderr, part
    assert "trainable /" not in done.stderr  # refused before the model was built
    assert not (disk / "ft" / "checkpoints").exists()


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tiny, small_disk, reference):
    """The disk fills up after the step-2 checkpoint: the saves of steps 4, 6 and 8 fail, each leaving
    nothing behind; the run says so and ends with exit 2 naming the step-2 checkpoint, which loads and
    resumes (once there is room again) to the uninterrupted run's losses."""
    from onegpu.finetune import checkpoint as ckpt_io

    disk = small_disk(128)
    out = disk / "ft"
    cmd = _cmd(tiny, out, resume="auto")
    proc = _run_until(cmd, _env(), lambda: (out / "checkpoints" / "step-000002" / "state.pt").is_file())
    os.killpg(proc.pid, signal.SIGSTOP)  # the disk fills up right there
    filler = _fill(disk, leave=1 << 20)
    os.killpg(proc.pid, signal.SIGCONT)
    _stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    assert "warning: the checkpoint of step 4 was not saved: No space left on device" in stderr
    assert f"the previous checkpoint {out / 'checkpoints' / 'step-000002'} is kept whole" in stderr
    assert "the disk is full (No space left on device)" in stderr and "--resume auto" in stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # no half step dir, no temp
    state = ckpt_io.load(out / "checkpoints" / "step-000002")
    assert state["train_state"]["step"] == 2 and state["model"] and state["optimizer"]["state"]
    assert not (out / "final").exists()

    filler.unlink()
    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"--resume auto: found {out / 'checkpoints' / 'step-000002'}" in resumed.stderr
    assert _losses(out) == pytest.approx(_losses(reference), rel=1e-6)
    assert (out / "final" / "lit_model.pth").read_bytes() == (reference / "final" / "lit_model.pth").read_bytes()


@pytest.mark.slow
def test_space_gone_before_the_merge_keeps_the_adapter_checkpoint(tiny, small_disk, reference):
    """Room for the last checkpoint but not for final/: the merge is not started, the run names the
    checkpoint that holds every trained weight and how to merge later; `--resume auto` does it."""
    disk = small_disk(128)
    out = disk / "ft"
    cmd = _cmd(tiny, out, resume="auto")
    proc = _run_until(cmd, _env(), lambda: (out / "checkpoints" / "step-000006" / "state.pt").is_file())
    os.killpg(proc.pid, signal.SIGSTOP)
    filler = _fill(disk, leave=12 << 20)  # a 4.6 MiB checkpoint fits, the ~60 MiB final/ does not
    os.killpg(proc.pid, signal.SIGCONT)
    _stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    assert f"not enough free disk for final/ (the merge): {disk}: needs " in stderr and "merged model" in stderr
    step8 = out / "checkpoints" / "step-000008"
    assert f"the LoRA weights and optimizer of step 8 are in {step8}" in stderr
    assert "--resume auto: it merges without training more" in stderr and "--merge false" in stderr
    assert (step8 / "state.pt").is_file() and not (out / "final").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".final.")]  # nothing half-merged

    filler.unlink()
    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {step8} at step 8/8" in resumed.stderr
    assert (out / "final" / "lit_model.pth").read_bytes() == (reference / "final" / "lit_model.pth").read_bytes()
