"""resume.utils.memory: the per-part meter a GRPO update reports (time/update_*, mem/update_*_mb)."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from resume.utils.memory import PeakRSS, PhaseMeter, rss_mb, rss_split_mb, set_mmap_threshold


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


_REUSE_SCRIPT = """
import resource, torch
from resume.utils.memory import heap_reuse, rss_mb, set_mmap_threshold
assert set_mmap_threshold(1)

def churn():  # a backward's pattern: the same 8 MB blocks allocated, touched and freed, 32 times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(32):
        block = torch.ones(8 * 2**20, dtype=torch.uint8)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = churn()
with heap_reuse():
    inside = churn()
    blocks = [torch.ones(8 * 2**20, dtype=torch.uint8) for _ in range(48)]  # 384 MB on the heap
    full = rss_mb()
    del blocks[:-1]  # the last one pins the heap's top
print(outside, inside, full - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and malloc_trim")
def test_heap_reuse_reuses_freed_blocks_inside_and_hands_them_back_on_exit():
    """Under a 1 MB mmap threshold each 8 MB block is a fresh mapping, faulted in and zeroed each time;
    inside `heap_reuse` freed blocks serve the next allocations (glibc cycles through a few before it
    reuses one: 8 seen here), and on exit the heap's free pages go back to the system."""
    out = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT], capture_output=True, text=True, check=True)
    outside, inside, released = (float(x) for x in out.stdout.split()[-3:])
    # relative, not in pages: with transparent huge pages a block faults in 4 times, not 2,048
    assert inside < outside / 2
    assert released > 300  # the 47 freed blocks' pages returned at exit (trim), the last one kept


def test_heap_reuse_restores_the_fixed_thresholds_and_leaves_glibcs_own_alone(monkeypatch):
    from resume.utils import memory

    calls = []
    monkeypatch.setattr(memory, "_MALLOPT", lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setattr(memory, "_MALLOC_TRIM", lambda pad: calls.append(("trim", pad)) or 1)
    monkeypatch.setattr(memory, "_THRESHOLD_MB", None)
    with memory.heap_reuse():  # glibc's own thresholds: never fixed here, only the trim
        pass
    assert calls == [("trim", 0)]
    calls.clear()
    assert memory.set_mmap_threshold(1)
    assert calls == [(-3, 2**20), (-1, 2 * 2**20)]  # mmap at 1 MB, trim the heap's top past 2 MB
    calls.clear()
    with pytest.raises(RuntimeError, match="inside"), memory.heap_reuse():
        assert calls == [(-3, 32 * 2**20), (-1, 2**31 - 1)]
        raise RuntimeError("inside")
    assert calls[2:] == [(-3, 2**20), (-1, 2 * 2**20), ("trim", 0)]  # restored even when the block raises


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_peak_rss_tells_the_runs_own_memory_from_mapped_file_pages(tmp_path):
    """A touched file mapping raises the resident set, not its anonymous part; a touched array raises both."""
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(48 * 2**20))
    anon_before = rss_split_mb()[1]
    with (
        PeakRSS(interval_s=0.01) as file_block,
        data.open("rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
    ):
        checksum = sum(mapped[i] for i in range(0, len(mapped), 4096))  # every page faulted in
        time.sleep(0.05)
    with PeakRSS(interval_s=0.01) as anon_block:
        held = np.ones(48 * 2**20 // 8)  # touched: anonymous and resident
        time.sleep(0.05)
    file_rec, anon_rec = file_block.record(), anon_block.record()
    assert checksum >= 0 and held.sum() > 0
    assert file_rec["peak_mb"] - file_rec["start_mb"] > 40  # the file's pages counted as resident ...
    assert file_rec["peak_anon_mb"] - anon_before < 10  # ... but not as the process's own memory
    assert anon_rec["peak_anon_mb"] > file_rec["peak_anon_mb"] + 40  # ... an array's as anonymous too
    resident, anon = rss_split_mb()
    assert anon is not None and 0 < anon < resident
