"""resume.utils.memory: the per-part meter a GRPO update reports (time/update_*, mem/update_*_mb)."""

from __future__ import annotations

import time

import numpy as np

from resume.utils.memory import PhaseMeter, rss_mb


def test_phase_meter_adds_seconds_over_repeats_and_sees_memory_a_part_holds():
    meter = PhaseMeter()
    meter.mark("start")
    held = []
    for _ in range(2):
        with meter("work"):
            time.sleep(0.02)
            held.append(np.ones(64 * 2**20 // 8))  # 64 MB, touched: resident
    with meter("idle"):
        pass
    rec = meter.record("update_")
    assert set(rec) == {
        "time/update_work",
        "time/update_idle",
        "mem/update_start_mb",
        "mem/update_work_mb",
        "mem/update_idle_mb",
    }
    assert rec["time/update_work"] >= 0.04 > rec["time/update_idle"]  # both repeats counted
    assert rec["mem/update_work_mb"] - rec["mem/update_start_mb"] > 100  # the 128 MB held at the end
    assert abs(rec["mem/update_idle_mb"] - rss_mb()) < 50
    del held
