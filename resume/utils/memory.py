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
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _glibc(function: str) -> Any:
    """glibc's `function` (malloc_trim, mallopt), or None where the C library lacks it (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def set_mmap_threshold(mb: float | None) -> bool:
    """Serve every allocation of `mb` MB or more with its own mmap, returned to the system when freed.

    glibc's threshold starts at 128 KB and rises to the size of each mmapped block freed (up to 32 MB),
    so after the first training step every activation and gradient block of a small model comes from
    the heap arenas, whose freed pages stay resident: the default run's GRPO rounds held ~0.6 GB more
    than they used (bench: 5.2 GB peak with glibc's default, 4.6 GB at 1 MB). A fixed threshold also
    stops the rise. None keeps glibc's behaviour; returns whether it was set (False off glibc)."""
    if mb is None:
        return False
    if mb <= 0:
        raise ValueError(f"mmap_threshold_mb ({mb}) must be > 0, or null for glibc's default")
    return _MALLOPT is not None and _MALLOPT(_M_MMAP_THRESHOLD, int(mb * 2**20)) == 1


def release_memory() -> float:
    """Collect garbage and hand glibc's free heap pages back to the system; returns MB released.

    A phase's tensors (activations, optimizer state, a model copy) are freed when it ends, but glibc
    keeps the pages of its arenas, so the process's resident set stays at the phase's peak and the
    next phase stacks its own peak on top. `malloc_trim(0)` returns them.
    """
    before = rss_mb()
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    return max(0.0, before - rss_mb())


class PeakRSS:
    """`with PeakRSS() as m: ...` then `m.record()`: {start_mb, peak_mb, end_mb} of the block."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = self.end_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> Self:
        self.start_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end_mb = rss_mb()
        self.peak_mb = max(self.peak_mb, self.end_mb)

    def record(self) -> dict[str, float]:
        return {
            "start_mb": round(self.start_mb, 1),
            "peak_mb": round(self.peak_mb, 1),
            "end_mb": round(self.end_mb, 1),
        }


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
