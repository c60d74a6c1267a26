"""MFU's CPU peak: measured once per machine (CPU model, torch version, dtype, threads), cached, and
measured again when asked or once the machine is quieter than when it was measured, so MFU compares
across the segments of a run and across runs."""

from __future__ import annotations

import json
import os

import torch
from onegpu.finetune import telemetry


def test_cpu_peak_is_measured_once_cached_and_remeasured_on_demand(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEGPU_CACHE", str(tmp_path))
    first, how = telemetry.cached_cpu_peak()
    assert how["measured_now"] and first > 0
    for part in (telemetry.cpu_model(), f"torch {torch.__version__}", "fp32", f"{torch.get_num_threads()} threads"):
        assert part in how["key"], part
    cache = tmp_path / telemetry.PEAK_CACHE_FILE
    assert json.loads(cache.read_text())[how["key"]]["flops"] == first

    # a later start (a resumed segment, the next run) divides by the same peak, whatever the load now
    again, how_again = telemetry.cached_cpu_peak()
    assert again == first and not how_again["measured_now"] and how_again["measured_at"] == how["measured_at"]
    peak, source, details = telemetry.device_peak_flops(torch.device("cpu"), "32-true")
    assert peak == first and "cached, measured" in source and details["method"].startswith("best of")

    remeasured, how_new = telemetry.cached_cpu_peak(remeasure=True)
    assert how_new["measured_now"] and json.loads(cache.read_text())[how["key"]]["flops"] == remeasured


def test_a_peak_measured_under_load_is_replaced_once_the_machine_is_quieter(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEGPU_CACHE", str(tmp_path))
    _, how = telemetry.cached_cpu_peak()
    cache = tmp_path / telemetry.PEAK_CACHE_FILE
    busy = os.getloadavg()[0] + (os.cpu_count() or 1) + 5  # "measured while the cores were oversubscribed"

    # a low value from a busy moment: measured again now, and the higher value kept
    cache.write_text(json.dumps({how["key"]: {**json.loads(cache.read_text())[how["key"]], "flops": 1.0,
                                                "load_average_1m": busy}}))
    peak, how_now = telemetry.cached_cpu_peak()
    assert how_now["measured_now"] and peak > 1.0 and json.loads(cache.read_text())[how["key"]]["flops"] == peak

    # a value higher than anything this CPU can do now: the cached one still stands
    cache.write_text(json.dumps({how["key"]: {**json.loads(cache.read_text())[how["key"]], "flops": 1e18,
                                                "load_average_1m": busy}}))
    peak, how_now = telemetry.cached_cpu_peak()
    assert peak == 1e18 and not how_now["measured_now"]
