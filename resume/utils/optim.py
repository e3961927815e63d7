"""Optimizer plumbing shared by GRPO and retriever adaptation: parameter groups and lr schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def decay_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
    """Trainable parameters in two optimizer groups: matrices with the optimizer's weight decay,
    1-D tensors (norms, biases) without. Empty groups are left out."""
    params = [p for _, p in named_parameters if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # norms, biases: no decay
    ]
    return [g for g in groups if g["params"]]


def lr_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, kind: str = "constant", warmup_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate multiplier per optimizer step: linear warmup over `warmup_ratio` of the steps,
    then `constant`, `linear` decay to 0 or `cosine` decay to 0 at `total_steps`."""
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr schedule kind={kind!r} must be constant, linear or cosine")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio ({warmup_ratio}) must be in [0, 1)")
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # never 0: the first step already learns
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
