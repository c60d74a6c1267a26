"""onegpu/contracts.py: atomic writes keep the old file on failure and give files the usual modes."""

from __future__ import annotations

import os
import stat

import pytest

from onegpu.contracts import TRACKS, QUANTIZE_MODES, atomic_write_json, atomic_write_text, read_json, staged_dir


def test_atomic_write_replaces_whole_file_with_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "first")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        staged = None
        with staged_dir(tmp_path / "dir") as work:
            (work / "f").write_text("x")
            staged = work
    finally:
        os.umask(old)
    assert path.read_text() == "first" and read_json(tmp_path / "b.json") == {"x": 1}
    # a root-written checkpoint must stay readable by the serving image's non-root user
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == 0o755
    assert not staged.exists() and (tmp_path / "dir" / "f").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "dir"]  # no temp files left


def test_failed_writes_leave_the_previous_version(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(TypeError):
        atomic_write_text(tmp_path / "a.txt", None)  # type: ignore[arg-type]  # fails inside the write
    assert (tmp_path / "a.txt").read_text() == "old"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("v1")
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "d") as work:
        (work / "keep").write_text("v2")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "d" / "keep").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]


def test_one_table_of_tracks_and_quantize_modes():
    assert set(TRACKS) == {"rtx4090-24gb", "a100-40gb"}
    assert TRACKS["rtx4090-24gb"].memory_gib < 24 < TRACKS["a100-40gb"].memory_gib
    assert "bnb.nf4-dq" in QUANTIZE_MODES and all(m.startswith("bnb.") for m in QUANTIZE_MODES)
