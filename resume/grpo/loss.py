"""The GRPO objective as plain functions on tensors.

Each function re-derives, in our own code, the mathematics of TRL 1.16's `GRPOTrainer`
(`_compute_loss`; the advantages are `advantages.py`, the log-probs `logps.py`), so the
summarizer can be trained by any loop (Lightning, DeepSpeed) while staying numerically
identical to TRL. `tests/unit/test_grpo.py` checks that equality against a real
`trl.GRPOTrainer` for every shared loss type.

Layout conventions (the same as TRL's):
- rewards / advantages are flat `[B]` with `B = num_prompts * k`, laid out group by group
  (the `k` completions of one prompt are consecutive);
- per-token tensors (`logps`, `old_logps`, `ref_logps`, `mask`) are `[B, T]` over the
  completion tokens only; `mask` is 1 for a real completion token, 0 for padding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Normalisations of the summed per-token loss, under TRL 1.16's names. TRL's other loss types
# ("cispo", "sapo", "vespo", "luspo") change the surrogate itself, not its normalisation.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# Off-policy corrections for rollouts sampled by another engine (TRL's `vllm_importance_sampling_mode`).
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

__all__ = [
    "IMPORTANCE_SAMPLING_MODES",
    "LOSS_TYPES",
    "grpo_loss",
    "importance_weights",
    "masked_mean",
    "microbatch_weight",
    "per_token_loss",
    "reduce_loss",
]


# --------------------------------------------------------------------------- per-token loss
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the entries where `mask` is non-zero (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _check_shapes(logps: Tensor, mask: Tensor, **others: Tensor | None) -> None:
    if logps.dim() != 2:
        raise ValueError(f"logps must be [B, T], got shape {tuple(logps.shape)}")
    for name, tensor in {"mask": mask, **others}.items():
        if tensor is not None and tensor.shape != logps.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, logps has {tuple(logps.shape)}; both must be [B, T]"
            )


def per_token_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    delta: float | None = None,
    kl_ratio_correction: bool = True,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Token-level clipped surrogate of GRPO, plus `beta` times the k3 KL to the reference.

    With `ratio = exp(logps - old_logps)` and `A` the sequence advantage broadcast over tokens:
    `loss_t = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
             + beta * w * (exp(ref - logp) - (ref - logp) - 1)`,
    the k3 estimator of KL(pi || ref), weighted by `w = ratio` (`kl_ratio_correction`, TRL 1.16's
    default `use_bias_correction_kl=True`: it makes the KL gradient the unbiased reverse-KL
    gradient for tokens sampled from the old policy; the ratio carries gradient even where it is 1)
    or by `w = 1` (the plain k3 penalty of DeepSeekMath / earlier TRL).

    Args:
        logps: `[B, T]` log-probs of the sampled tokens under the current policy (with grad).
        old_logps: `[B, T]` log-probs under the sampling policy; `None` means on-policy
            (`logps.detach()`, TRL's shortcut when each batch is used for one step).
        advantages: `[B]` (or `[B, 1]`) one advantage per completion.
        mask: `[B, T]` 1 for completion tokens, 0 for padding (only used for the stats).
        epsilon_low, epsilon_high: clip range (DAPO's clip-higher when `epsilon_high > epsilon_low`).
        beta: KL coefficient; `> 0` requires `ref_logps`.
        ref_logps: `[B, T]` log-probs under the frozen reference policy. When given with
            `beta == 0` the KL is still reported (monitoring only).
        delta: optional upper cap on the unclipped ratio (INTELLECT-2's two-sided clipping,
            TRL `GRPOConfig.delta`); `None` disables it. It does not cap the KL weight, as in TRL.
        kl_ratio_correction: weight the KL term by the (uncapped) ratio, TRL's
            `use_bias_correction_kl`.
        is_weights: `[B, T]` or `[B, 1]` off-policy weights (`importance_weights`) multiplying the
            whole per-token loss, KL included, as TRL applies its vLLM correction; None = 1.

    Returns:
        The unreduced `[B, T]` loss (padding positions hold values; `reduce_loss` masks them)
        and detached stats named as TRL logs them: `kl` (masked mean of the, possibly ratio-weighted,
        per-token KL, when `ref_logps` is given),
        `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (token fractions
        clipped at the low bound with `A < 0`, at the high bound with `A > 0`, either),
        `clip_ratio/low_min`, `clip_ratio/high_max` (extremes of the per-sequence fractions), and
        `ratio/mean`, `ratio/min`, `ratio/max` over the completion tokens.
    """
    old_logps = logps.detach() if old_logps is None else old_logps
    _check_shapes(logps, mask, old_logps=old_logps, ref_logps=ref_logps)
    if advantages.dim() == 2 and advantages.size(1) == 1:
        advantages = advantages.squeeze(1)
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logps.size(0)}], got shape {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta ({beta}) must be >= 0")
    if beta > 0 and ref_logps is None:
        raise ValueError(
            f"beta ({beta}) > 0 needs ref_logps (the frozen reference's log-probs); pass them or set beta=0"
        )
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(
            f"clip range must be non-negative, got epsilon_low={epsilon_low}, epsilon_high={epsilon_high}"
        )

    adv = advantages.to(logps.dtype).unsqueeze(1)  # [B, 1], broadcast over tokens
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    loss = -torch.min(unclipped * adv, clipped * adv)

    stats: dict[str, float] = {}
    if ref_logps is not None:
        log_ref_ratio = ref_logps - logps
        # k3: an unbiased, non-negative estimator of KL(pi || ref) from tokens sampled from pi
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        if kl_ratio_correction:
            kl = kl * ratio  # importance weight of a token drawn from pi_old, not pi
        if beta > 0:
            loss = loss + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask).item()
    if is_weights is not None:
        loss = loss * is_weights.to(loss.dtype)
    stats.update(_clip_stats(ratio.detach(), adv.detach(), mask, epsilon_low, epsilon_high))
    return loss, stats


def _clip_stats(
    ratio: Tensor, adv: Tensor, mask: Tensor, epsilon_low: float, epsilon_high: float
) -> dict[str, float]:
    """The clip fractions TRL logs: a token counts only where the clip bound is the active term of the min."""
    mask_f = mask.to(ratio.dtype)
    low = ((ratio < 1.0 - epsilon_low) & (adv < 0)).to(ratio.dtype)
    high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).to(ratio.dtype)
    region = torch.maximum(low, high)
    lengths = mask_f.sum(dim=1)
    has_tokens = lengths > 0  # TRL's per-sequence means are NaN for empty rows, then skipped by nanmin/nanmax
    per_seq_low = (low * mask_f).sum(dim=1)[has_tokens] / lengths[has_tokens]
    per_seq_high = (high * mask_f).sum(dim=1)[has_tokens] / lengths[has_tokens]
    active = ratio[mask.bool()]
    nan = float("nan")
    return {
        "clip_ratio/low_mean": masked_mean(low, mask_f).item(),
        "clip_ratio/high_mean": masked_mean(high, mask_f).item(),
        "clip_ratio/region_mean": masked_mean(region, mask_f).item(),
        "clip_ratio/low_min": per_seq_low.min().item() if per_seq_low.numel() else nan,
        "clip_ratio/high_max": per_seq_high.max().item() if per_seq_high.numel() else nan,
        "ratio/mean": active.mean().item() if active.numel() else nan,
        "ratio/min": active.min().item() if active.numel() else nan,
        "ratio/max": active.max().item() if active.numel() else nan,
    }


# --------------------------------------------------------------------------- off-policy correction
def importance_weights(
    old_logps: Tensor,
    sampling_logps: Tensor,
    mask: Tensor,
    *,
    mode: str = "token_truncate",
    cap: float | None = 3.0,
    floor: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance weights `pi_old / pi_engine` for rollouts sampled by another engine.

    A vLLM engine in bf16 samples from slightly other probabilities than the fp32 policy that is
    trained, so its rollouts are slightly off-policy. Each token's loss is multiplied by
    `w = exp(old_logps - sampling_logps)` (TRL's `vllm_importance_sampling_correction`):

    - `token_*`: one weight per token; `sequence_*`: one per completion, `exp(sum of the differences)`;
    - `*_truncate`: `w` clamped to `[floor, cap]` (truncated IS, bounded variance);
      `*_mask`: weights outside `[floor, cap]` set to 0 (the token or sequence is dropped).

    Tokens outside `mask`, and tokens whose engine log-prob is NaN, get a difference of 0 (weight 1).

    Args:
        old_logps: `[B, T]` log-probs under the policy at rollout time (no grad).
        sampling_logps: `[B, T]` log-probs the engine reported for the same tokens.
        mask: `[B, T]` completion mask.

    Returns:
        `w` (`[B, T]` for token modes, `[B, 1]` for sequence modes, detached) and stats
        `is_ratio_mean`, `is_ratio_min`, `is_ratio_max` (over completion tokens, or sequences),
        `is_masked_fraction` (mask modes), `logp_difference_mean`, `logp_difference_max` (|old - engine|).
    """
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(
            f"importance sampling mode {mode!r} is not one of {', '.join(IMPORTANCE_SAMPLING_MODES)}"
        )
    _check_shapes(old_logps, mask, sampling_logps=sampling_logps)
    active = mask.bool()
    diff = torch.nan_to_num((old_logps - sampling_logps).detach(), nan=0.0) * active
    per_sequence = mode.startswith("sequence")
    log_w = diff.sum(dim=1, keepdim=True) if per_sequence else diff
    w = torch.exp(log_w)
    low = -math.inf if floor is None else floor
    high = math.inf if cap is None else cap
    outside = (w < low) | (w > high)
    if mode.endswith("truncate"):
        w = torch.clamp(w, min=floor, max=cap)
    else:
        w = w.masked_fill(outside, 0.0)
    rows = active.any(dim=1, keepdim=True)
    shown = w[rows.squeeze(1)].flatten() if per_sequence else w[active]
    gap = diff.abs()[active]
    nan = float("nan")
    stats = {
        "is_ratio_mean": shown.mean().item() if shown.numel() else nan,
        "is_ratio_min": shown.min().item() if shown.numel() else nan,
        "is_ratio_max": shown.max().item() if shown.numel() else nan,
        "logp_difference_mean": gap.mean().item() if gap.numel() else nan,
        "logp_difference_max": gap.max().item() if gap.numel() else nan,
    }
    if mode.endswith("mask"):
        hit = outside[rows.squeeze(1)].flatten() if per_sequence else outside[active]
        stats["is_masked_fraction"] = hit.float().mean().item() if hit.numel() else nan
    return w, stats


# --------------------------------------------------------------------------- reduction
def reduce_loss(
    per_token: Tensor,
    mask: Tensor,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    num_active_tokens: float | Tensor | None = None,
) -> Tensor:
    """Reduce a `[B, T]` per-token loss to a scalar, under TRL 1.16's `loss_type` names.

    - `"grpo"`: mean over each sequence's tokens, then mean over sequences (length-biased).
    - `"bnpo"`: sum over the batch / number of active tokens in this (local) batch.
    - `"dr_grpo"`: sum / (B * max_completion_length), a constant normaliser (Dr. GRPO).
    - `"dapo"`: sum / number of active tokens. TRL divides by the token count of the whole
      generation batch across processes and accumulation steps (`num_items_in_batch`, rescaled to
      one accumulation window); with one process and one micro-batch per optimizer step that
      count is this mask's, the default here. Pass `num_active_tokens` (the window-global count)
      to reproduce TRL under accumulation or data parallelism.

    The loss is per micro-batch: TRL further divides grpo/bnpo/dr_grpo by the number of gradient
    accumulation steps; the caller's training loop owns that scaling.
    """
    if per_token.shape != mask.shape:
        raise ValueError(
            f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must have the same [B, T] shape"
        )
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length <= 0:
            raise ValueError(
                f"loss_type='dr_grpo' normalises by B * max_completion_length, got max_completion_length="
                f"{max_completion_length}; pass the generation's max_new_tokens"
            )
        return masked.sum() / (per_token.size(0) * max_completion_length)
    if loss_type == "dapo":
        count = mask.sum() if num_active_tokens is None else torch.as_tensor(num_active_tokens)
        return masked.sum() / count.to(per_token.dtype).clamp(min=1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types: {', '.join(LOSS_TYPES)}")


def microbatch_weight(loss_type: str, rows: int, batch_rows: int) -> float:
    """Factor on a micro-batch's loss when one rollout batch of `batch_rows` sequences is
    accumulated over micro-batches, so the summed gradient is the whole batch's.

    `dapo` already divides by the whole batch's token count (pass it as `num_active_tokens`):
    1. The other normalisations are per micro-batch: weight by its share of the sequences
    (exact for `grpo` and `dr_grpo`; `bnpo` then averages per-micro-batch token means).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types: {', '.join(LOSS_TYPES)}")
    if not 0 < rows <= batch_rows:
        raise ValueError(f"a micro-batch of {rows} rows does not fit a batch of {batch_rows}")
    return 1.0 if loss_type == "dapo" else rows / batch_rows


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    delta: float | None = None,
    kl_ratio_correction: bool = True,
    max_completion_length: int | None = None,
    num_active_tokens: float | Tensor | None = None,
    entropies: Tensor | None = None,
    is_weights: Tensor | None = None,
    prefix: str = "",
) -> tuple[Tensor, dict[str, float]]:
    """The full GRPO loss: `per_token_loss` reduced by `reduce_loss`.

    Arguments are those of the two functions (`loss_type` defaults to TRL's default, `"dapo"`);
    `entropies` (`[B, T]`, optional) are only logged (masked mean). Returns the scalar loss and
    stats whose keys are `prefix` + name, e.g. `summarizer/train/clip_ratio/high_mean`.
    """
    if loss_type not in LOSS_TYPES:  # fail before any work
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types: {', '.join(LOSS_TYPES)}")
    per_token, stats = per_token_loss(
        logps,
        old_logps,
        advantages,
        mask,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        beta=beta,
        ref_logps=ref_logps,
        delta=delta,
        kl_ratio_correction=kl_ratio_correction,
        is_weights=is_weights,
    )
    loss = reduce_loss(
        per_token,
        mask,
        loss_type,
        max_completion_length=max_completion_length,
        num_active_tokens=num_active_tokens,
    )
    stats = {"loss": loss.item(), **stats}
    if entropies is not None:
        stats["entropy"] = masked_mean(entropies.detach(), mask).item()
    return loss, {f"{prefix}{key}": value for key, value in stats.items()}
