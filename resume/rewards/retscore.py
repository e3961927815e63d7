"""RetScore and the discrete mapping r_phi: the retrieval term of the ReSuMe reward (METHOD.md).

    RetScore(x) = sum_{q+} S(q, x) / (sum_{q+} S(q, x) + sum_{q-} S(q, x)),
    Delta       = RetScore(summary) - RetScore(document),   r_phi(Delta) = value of Delta's bucket,

with S the frozen retriever's cosine clamped at 0. Plain functions on tensors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Interior edges of the discrete mapping r_phi: bucket i is [edges[i-1], edges[i]),
# the outer buckets are open-ended, so Delta = 1.0 lands in the top bucket.
DEFAULT_EDGES: tuple[float, ...] = (-0.5, -0.2, -0.1, 0.0, 0.1, 0.2, 0.5)
DEFAULT_VALUES: tuple[float, ...] = (-1.0, -0.8, -0.6, -0.3, 0.3, 0.6, 0.8, 1.0)
RETSCORE_MODES: tuple[str, ...] = ("ratio", "positives_only")


def ret_score(
    pos_sims: Tensor,
    neg_sims: Tensor,
    *,
    pos_mask: Tensor | None = None,
    clamp: bool = True,
    mode: str = "ratio",
) -> Tensor:
    """RetScore of B texts from their similarities to positive [B, P] and negative [B, N] queries.

    `pos_mask` [B, P] (bool) marks the real positives when rows have different numbers of
    them (padding is ignored). With `clamp`, every similarity is clamped at 0 first, so a
    negative cosine neither rewards nor punishes. Modes:
    - "ratio": sum_pos / (sum_pos + sum_neg), 0 where the denominator is 0;
    - "positives_only": mean similarity over the positives (0 for a row without any),
      the w/o-negatives ablation; `neg_sims` is ignored.
    """
    if mode not in RETSCORE_MODES:
        raise ValueError(f"retscore mode {mode!r} is not one of {RETSCORE_MODES}")
    if pos_sims.ndim != 2 or neg_sims.ndim != 2 or pos_sims.shape[0] != neg_sims.shape[0]:
        raise ValueError(
            f"pos_sims {tuple(pos_sims.shape)} and neg_sims {tuple(neg_sims.shape)} must be [B, P] and [B, N]"
        )
    if pos_mask is not None and (pos_mask.shape != pos_sims.shape or pos_mask.dtype != torch.bool):
        raise ValueError(
            f"pos_mask must be a bool tensor shaped like pos_sims {tuple(pos_sims.shape)}, "
            f"got {pos_mask.dtype} {tuple(pos_mask.shape)}"
        )
    if clamp:
        pos_sims, neg_sims = pos_sims.clamp_min(0), neg_sims.clamp_min(0)
    if pos_mask is not None:
        pos_sims = pos_sims.masked_fill(~pos_mask, 0)
        count = pos_mask.sum(dim=1)
    else:
        count = torch.full((pos_sims.shape[0],), pos_sims.shape[1], device=pos_sims.device)
    pos_sum = pos_sims.sum(dim=1)
    if mode == "positives_only":
        return torch.where(count > 0, pos_sum / count.clamp_min(1), torch.zeros_like(pos_sum))
    denom = pos_sum + neg_sims.sum(dim=1)
    nonzero = denom != 0
    return torch.where(nonzero, pos_sum / torch.where(nonzero, denom, torch.ones_like(denom)), 0.0)


def _check_edges(edges: Sequence[float]) -> tuple[float, ...]:
    edges = tuple(float(e) for e in edges)
    if not all(math.isfinite(e) for e in edges):
        raise ValueError(f"bucket_edges {list(edges)} must be finite numbers")
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(
            f"bucket_edges {list(edges)} must be strictly increasing (bucket i is "
            "[edges[i-1], edges[i])); sort them and drop duplicates, keeping bucket_values in step"
        )
    return edges


def check_buckets(
    edges: Sequence[float], values: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    edges = _check_edges(edges)
    values = tuple(float(v) for v in values)
    if len(values) != len(edges) + 1:
        raise ValueError(
            f"bucket_values has {len(values)} entries but bucket_edges has {len(edges)}: k interior "
            f"edges make k+1 buckets, so give exactly {len(edges) + 1} values (one per bucket)"
        )
    return edges, values


def bucket_index(delta: Tensor, edges: Sequence[float] = DEFAULT_EDGES) -> Tensor:
    """Bucket (0..len(edges)) of each Delta, left-closed: edges[i-1] <= delta < edges[i].

    Values below the first edge are bucket 0, values at or above the last edge the top
    bucket. NaN maps to -1. Comparisons use `delta`'s own floating dtype, so a float32
    Delta equal to float32(0.1) is in the [0.1, 0.2) bucket.
    """
    edges = _check_edges(edges)
    if not delta.is_floating_point():
        delta = delta.to(torch.float32)
    boundaries = torch.tensor(edges, dtype=delta.dtype, device=delta.device)
    index = torch.bucketize(delta, boundaries, right=True)
    return torch.where(torch.isnan(delta), torch.full_like(index, -1), index)


def discretize(
    delta: Tensor, edges: Sequence[float] = DEFAULT_EDGES, values: Sequence[float] = DEFAULT_VALUES
) -> Tensor:
    """The discrete mapping r_phi(Delta): the value of each Delta's bucket (NaN stays NaN)."""
    edges, values = check_buckets(edges, values)
    if not delta.is_floating_point():
        delta = delta.to(torch.float32)
    index = bucket_index(delta, edges)
    table = torch.tensor(values, dtype=delta.dtype, device=delta.device)
    out = table[index.clamp_min(0)]
    return torch.where(index < 0, torch.full_like(out, math.nan), out)
