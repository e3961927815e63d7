"""resume.utils.memory: the per-part meter a GRPO update reports (time/update_*, mem/update_*_mb)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from resume.utils.memory import PhaseMeter, rss_mb, set_mmap_threshold


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


_HEAP_SCRIPT = """
import sys, torch
from resume.utils.memory import rss_mb, set_mmap_threshold
if sys.argv[1] == "set":
    assert set_mmap_threshold(1)
first = torch.ones(16 * 2**20, dtype=torch.uint8)
del first  # a freed 16 MB mmap: glibc's default threshold rises to 16 MB
blocks = [torch.ones(8 * 2**20, dtype=torch.uint8) for _ in range(48)]  # 384 MB in 8 MB blocks
full = rss_mb()
del blocks[:-1]  # the last block stays: the heap top cannot shrink past it
print(full - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_fixed_mmap_threshold_returns_freed_blocks_that_the_heap_would_keep():
    def released(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", _HEAP_SCRIPT, mode], capture_output=True, text=True, check=True
        )
        return float(out.stdout.split()[-1])

    assert released("default") < 100  # glibc keeps the freed 8 MB blocks resident
    assert released("set") > 300  # each was its own mmap, unmapped on free
    with pytest.raises(ValueError, match="mmap_threshold_mb"):
        set_mmap_threshold(0)
    assert set_mmap_threshold(None) is False
