"""Group-relative advantages of GRPO, TRL 1.16's (`_generate_and_score_completions`) and the paper's
softmax variant (Eq. 1, as METHOD.md pins it). Rewards are flat `[B]`, `B = num_prompts * k`, the `k`
completions of one prompt consecutive; `tests/unit/test_grpo.py` checks them against `trl.GRPOTrainer`.
"""

from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_KINDS = ("zscore", "softmax")

__all__ = ["ADVANTAGE_KINDS", "group_advantages", "zero_variance_fraction"]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Validate flat group-major rewards and view them as `[num_groups, group_size]`."""
    if group_size < 2:
        raise ValueError(
            f"num_generations (k) ({group_size}) must be >= 2 for group-relative advantages; "
            "set grpo.config.num_generations>=2"
        )
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be flat [B*k], got shape {tuple(rewards.shape)}; flatten them group by group"
        )
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a positive multiple of num_generations (k) = "
            f"{group_size}; pass the k completions of every prompt, group by group"
        )
    if not torch.isfinite(rewards).all():
        # TRL turns unscorable (None) rewards into NaN and zeroes their advantage; our reward always
        # scores, so a non-finite value is a bug upstream and must not silently become "no signal".
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    kind: str = "zscore",
    scale: bool = True,
    eps: float = 1e-4,
    temperature: float = 0.5,
) -> Tensor:
    """Group-relative advantages, one per completion.

    Args:
        rewards: `[B*k]` scalar rewards, the `k` completions of each prompt consecutive.
        group_size: `k`, the number of completions per prompt (`num_generations`), >= 2.
        kind: `"zscore"`: standard GRPO, `A_i = (r_i - mean_g r) / (std_g r + eps)`, with the
            unbiased (Bessel-corrected, `/(k-1)`) group std, as TRL 1.16 (`nanstd`). With
            `scale=False` only the group mean is subtracted (Dr. GRPO; TRL `scale_rewards="none"`).
            `"softmax"`: the paper's Eq. 1 as pinned in METHOD.md,
            `A_i = softmax(r / temperature)_i - 1/k` (zero-sum within each group).
        scale: divide by the group std (`"zscore"` only).
        eps: added to the std, TRL's constant `1e-4`; an all-equal group gets advantage 0.
        temperature: softmax temperature (`"softmax"` only; the paper's beta = 0.5).

    Returns:
        `[B*k]` advantages, same dtype and device as `rewards`.
    """
    grouped = _grouped(rewards, group_size)
    if kind == "zscore":
        advantages = grouped - grouped.mean(dim=1, keepdim=True)
        if scale:
            advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)  # unbiased, as TRL's nanstd
    elif kind == "softmax":
        if temperature <= 0:
            raise ValueError(f"softmax advantage temperature ({temperature}) must be > 0")
        advantages = torch.softmax(grouped / temperature, dim=1) - 1.0 / group_size
    else:
        raise ValueError(f"unknown advantage kind {kind!r}; valid kinds: {', '.join(ADVANTAGE_KINDS)}")
    return advantages.reshape(-1)


def zero_variance_fraction(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal: they carry no learning signal.

    "Equal" uses TRL's test for its `frac_reward_zero_std` metric: the group's unbiased std is
    `torch.isclose` to 0 (absolute tolerance 1e-8). Every group has `k` completions, so this
    equals TRL's per-completion average.
    """
    std = _grouped(rewards, group_size).std(dim=1)
    return torch.isclose(std, torch.zeros_like(std)).float().mean().item()
