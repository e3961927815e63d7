"""Devices, dtypes and seeded RNG scopes: the torch plumbing both models share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

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


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU has AMX tiles (usable by this process), where bf16 matmuls run several times faster
    than fp32 (HF generate of SmolLM2 3x on such a Xeon).

    AVX512-BF16 alone is not enough (measured on a Xeon that exposes it without AMX: vLLM greedy 77 tok/s in
    bf16 vs 93 in fp32, a 2048^2 matmul 0.14 vs 0.19 TFLOP/s; HF generate 1.27x), and without either
    instruction set bf16 is emulated and slower than fp32.
    """
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def generation_dtype(
    dtype: str, device: torch.device | str, key: str = "summarizer.backend.dtype"
) -> torch.dtype:
    """The dtype to GENERATE in: `auto` -> bf16 on a CUDA GPU and on a CPU where bf16 is fast
    (`cpu_bf16_is_fast`: AMX), fp32 elsewhere; anything else as `resolve_dtype` reads it."""
    if dtype != "auto":
        return resolve_dtype(dtype, key)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16_is_fast() else torch.float32


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
