"""Attention over a prefix tree (a prompt, then its `k` completions) that skips what the mask hides.

`logps.prefix_tree_logps` runs a prompt and its `k` completions as one sequence of `P + k C` tokens
under a boolean mask: causal over the prompt, and each completion token sees the whole prompt and
its own row. SDPA with an arbitrary mask computes every query-key block, ~(P + k C)^2, though the
prompt's own queries see only a causal triangle. At the GRPO default (P ~ 755, k C = 252) that is
twice the work the mask keeps, and in a gradient-checkpointed update attention was ~30% of the
forward and backward time (torch profiler, SmolLM2-135M, fp32, 2 cores).

This attention computes the same thing in two calls: the prompt's queries over the prompt's keys
with `is_causal=True` (SDPA's flash kernel skips the blocks above the diagonal), and the
completions' queries over all keys with the mask's completion rows. Softmax runs per query row, so
the split is exact up to float rounding. It takes effect only where the caller passes
`tree_prompt_length` (the forward of `prefix_tree_logps`, and its recompute under checkpointing,
which replays the same keyword); any other call is SDPA's own, unchanged.

Registered with transformers as the attention implementation `TREE_SDPA` (and SDPA's mask format);
`use_tree_attention(model)` switches a model from `sdpa` to it and returns a function that switches
it back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TREE_SDPA = "resume_prefix_tree_sdpa"


def prefix_tree_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    tree_prompt_length: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, split at `tree_prompt_length` when given (query/key/value [B, H, L, D], output
    [B, L, H, D] as transformers' SDPA returns it)."""
    p = tree_prompt_length
    length = query.shape[2]
    if p is None or attention_mask is None or not 0 < p < length or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    kwargs.pop("is_causal", None)
    prompt, _ = sdpa_attention_forward(
        module, query[:, :, :p], key[:, :, :p], value[:, :, :p], None, *args, is_causal=True, **kwargs
    )
    rest, _ = sdpa_attention_forward(
        module, query[:, :, p:], key, value, attention_mask[:, :, p:], *args, is_causal=False, **kwargs
    )
    return torch.cat([prompt, rest], dim=1), None


AttentionInterface.register(TREE_SDPA, prefix_tree_sdpa)
AttentionMaskInterface.register(TREE_SDPA, sdpa_mask)


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention a transformers model runs (`config._attn_implementation`); "eager" when unset."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"


def use_tree_attention(model: torch.nn.Module) -> Callable[[], None] | None:
    """Switch `model` (a transformers model on SDPA) to `TREE_SDPA`; returns the function that switches
    it back, or None (nothing changed) for a model on another attention or one that cannot switch."""
    if attention_implementation(model) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    model.set_attn_implementation(TREE_SDPA)
    if attention_implementation(model) != TREE_SDPA:
        return None

    def restore() -> None:
        model.set_attn_implementation("sdpa")

    return restore
