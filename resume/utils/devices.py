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


def resolve_dtype(dtype: str) -> torch.dtype:
    """`auto` -> bf16 when a CUDA GPU is visible, else fp32 (CPU bf16 matmuls are slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"summarizer.dtype={dtype!r} must be one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


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
