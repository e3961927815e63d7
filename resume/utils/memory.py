"""Resident memory of this process, sampled while a phase runs (its peak and where it ended).

`ru_maxrss` only ever grows, so it cannot say which phase of a run held the memory; a small
thread reading `/proc/self/statm` a few times a second can. Where /proc is missing (macOS),
the sampler falls back to `ru_maxrss` and says so in its record.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """This process's resident set now, in MB (the peak so far where /proc is missing)."""
    return rss_split_mb()[0]


def rss_split_mb() -> tuple[float, float | None]:
    """(resident MB, of which anonymous MB) now; anonymous is None where /proc is missing (the first
    figure is then the peak so far).

    The rest of the resident set is file pages: the libraries' code and data (torch, vLLM) and
    mapped weight files. Those are clean and shared, and how many of them a process maps depends on
    the page cache, not on the run: a freshly installed .venv, whose files are all still cached,
    maps ~0.15 GB more of them than the same code does once the cache has moved on (measured:
    `import torch` maps 123 MB of libtorch files right after `pip install`, 80 MB after they are
    dropped from the cache). The anonymous part (tensors, Python objects, heap) is what a run uses.
    """
    try:
        fields = _STATM.read_text().split()
        resident, shared = int(fields[1]) * _PAGE / 2**20, int(fields[2]) * _PAGE / 2**20
        return resident, resident - shared
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None


def _glibc(function: str) -> Any:
    """glibc's `function` (malloc_trim, mallopt), or None where the C library lacks it (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_THRESHOLD_MB: float | None = None  # the fixed threshold set_mmap_threshold last set (None: glibc's own)
_HEAP_REUSE_MB = 32  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
_NO_TRIM = 2**31 - 1  # mallopt takes an int: a free heap top of up to 2 GB stays mapped


def _set_thresholds(mmap_mb: float, trim_bytes: int | None = None) -> bool:
    """glibc's mmap threshold and heap-top trim threshold (None: 2x the mmap threshold, glibc's own
    pairing of the two)."""
    assert _MALLOPT is not None
    trim = int(2 * mmap_mb * 2**20) if trim_bytes is None else trim_bytes
    return _MALLOPT(_M_MMAP_THRESHOLD, int(mmap_mb * 2**20)) == 1 and _MALLOPT(_M_TRIM_THRESHOLD, trim) == 1


def set_mmap_threshold(mb: float | None) -> bool:
    """Serve every allocation of `mb` MB or more with its own mmap, returned to the system when freed.

    glibc's threshold starts at 128 KB and rises to the size of each mmapped block freed (up to 32 MB),
    so after the first training step every activation and gradient block of a small model comes from
    the heap arenas, whose freed pages stay resident: the default run's GRPO rounds held ~0.6 GB more
    than they used (bench: 5.2 GB peak with glibc's default, 4.6 GB at 1 MB). A fixed threshold also
    stops the rise; the heap's free top is returned past 2x it (glibc's own pairing of the two, fixed
    here so `heap_reuse` can restore it). None keeps glibc's behaviour; returns whether it was set
    (False off glibc)."""
    if mb is None:
        return False
    if mb <= 0:
        raise ValueError(f"mmap_threshold_mb ({mb}) must be > 0, or null for glibc's default")
    global _THRESHOLD_MB
    if _MALLOPT is None or not _set_thresholds(mb):
        return False
    _THRESHOLD_MB = mb
    return True


@contextlib.contextmanager
def heap_reuse() -> Iterator[None]:
    """Serve the block's allocations under 32 MB from the heap, then hand its free pages back.

    Under a low fixed mmap threshold (`set_mmap_threshold(1)`), every tensor of 1 MB or more is a
    fresh mapping whose pages the kernel faults in and zeroes, and a free heap top of 2 MB goes back
    to the system at once; a training backward allocates and frees the same activation blocks layer
    after layer, so much of its time is that zeroing. Inside the block the mmap threshold is 32 MB
    and the heap's free top stays mapped, so freed blocks are reused; on exit both thresholds are
    restored and `malloc_trim` returns the heap's free pages, so what stays resident after the block
    is what it left alive. Allocate what outlives the block (gradients, optimizer state) outside it,
    or it pins heap pages. Without a fixed threshold (glibc's own, or off glibc) only the trim runs.
    """
    fixed = _THRESHOLD_MB  # only ever set where glibc's mallopt is there
    if fixed is not None:
        _set_thresholds(_HEAP_REUSE_MB, _NO_TRIM)
    try:
        yield
    finally:
        if fixed is not None:
            _set_thresholds(fixed)
        trim_heap()


def trim_heap() -> bool:
    """Hand glibc's free heap pages back to the system (`malloc_trim(0)`), without a garbage
    collection; returns whether it ran (False off glibc)."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def release_memory() -> float:
    """Collect garbage and hand glibc's free heap pages back to the system; returns MB released.

    A phase's tensors (activations, optimizer state, a model copy) are freed when it ends, but glibc
    keeps the pages of its arenas, so the process's resident set stays at the phase's peak and the
    next phase stacks its own peak on top. `malloc_trim(0)` returns them.
    """
    before = rss_mb()
    gc.collect()
    trim_heap()
    return max(0.0, before - rss_mb())


class PeakRSS:
    """`with PeakRSS() as m: ...` then `m.record()`: {start_mb, peak_mb, end_mb} of the block, and
    `peak_anon_mb`, the largest anonymous part of the resident set (see `rss_split_mb`), where /proc
    has it."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = self.end_mb = 0.0
        self.peak_anon_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _take(self) -> float:
        resident, anon = rss_split_mb()
        self.peak_mb = max(self.peak_mb, resident)
        if anon is not None:
            self.peak_anon_mb = max(self.peak_anon_mb or 0.0, anon)
        return resident

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def __enter__(self) -> Self:
        self.start_mb = self._take()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end_mb = self._take()

    def record(self) -> dict[str, float]:
        rec = {
            "start_mb": round(self.start_mb, 1),
            "peak_mb": round(self.peak_mb, 1),
            "end_mb": round(self.end_mb, 1),
        }
        if self.peak_anon_mb is not None:
            rec["peak_anon_mb"] = round(self.peak_anon_mb, 1)
        return rec


class PhaseMeter:
    """Seconds and resident memory per named part of a repeated block (a GRPO update's forward,
    backward, optimizer step): `with meter("backward"): ...`, then `meter.record()`.

    Memory is the RSS read as each part ends, the largest over its repetitions: right after a forward
    it holds the activations the backward will need, which is where a training step peaks. Freed
    pages glibc keeps count as resident until `release_memory`, so later parts read at least as high;
    the increments between parts are what each one added."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.rss: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.rss[name] = max(self.rss.get(name, 0.0), rss_mb())

    def mark(self, name: str) -> None:
        """The RSS now, under `name` (a point between parts, e.g. the step's start)."""
        self.rss[name] = max(self.rss.get(name, 0.0), rss_mb())

    def record(self, prefix: str = "") -> dict[str, float]:
        out = {f"time/{prefix}{name}": s for name, s in self.seconds.items()}
        out.update({f"mem/{prefix}{name}_mb": round(mb, 1) for name, mb in self.rss.items()})
        return out
