"""The contrastive loss of retriever adaptation: InfoNCE with in-batch negatives.

`L = -log( exp(S(q, s+) / tau) / sum_{x in {s+} u N} exp(S(q, x) / tau) )` (the paper's
adaptation loss), with `S` the cosine similarity and `N` the other documents of the batch
(plus optional extra negatives shared by every query). As in Contriever's `src/inbatch.py`,
the function returns `(loss, stats)` with prefixed keys, ready for a logger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["info_nce"]


def info_nce(
    q: Tensor, d: Tensor, temperature: float, *, positive_offset: int = 0, prefix: str = "retriever/train/"
) -> tuple[Tensor, dict[str, float]]:
    """InfoNCE over cosine similarities with in-batch negatives.

    Args:
        q: query embeddings `[B, H]`, already L2-normalised (so `q @ d.T` is the cosine).
        d: document embeddings `[B + N, H]`, L2-normalised. Row `i < B` is query `i`'s positive
            (and a negative for every other query); rows `B..B+N-1` are extra negatives shared
            by all queries.
        temperature: the similarity scale `tau` (> 0); logits are `cos / tau`.
        positive_offset: query `i`'s positive is row `positive_offset + i` of `d` (documents
            gathered from several devices: this device's rows start there; every other row is a
            negative).
        prefix: namespace of the stat keys.

    Returns:
        The mean cross-entropy over the `B` queries (a scalar with grad), and float stats:
        `loss`; `accuracy`, the fraction of queries whose positive scores strictly above
        every negative; `pos_sim` and `neg_sim`, the mean cosine of positive and of negative
        pairs (`neg_sim` is NaN when there is no negative: a batch of one pair and `N = 0`).
    """
    if q.dim() != 2 or d.dim() != 2 or q.size(1) != d.size(1):
        raise ValueError(
            f"info_nce expects q [B, H] and d [B+N, H]; got q {tuple(q.shape)}, d {tuple(d.shape)}"
        )
    if positive_offset < 0 or d.size(0) < positive_offset + q.size(0):
        raise ValueError(
            f"info_nce needs one positive document per query: d has {d.size(0)} rows for {q.size(0)} queries"
        )
    if temperature <= 0:
        raise ValueError(f"InfoNCE temperature ({temperature}) must be > 0; set retriever.temperature > 0")
    b = q.size(0)
    sim = q @ d.T  # [B, B+N] cosines
    rows = torch.arange(b, device=q.device)
    labels = rows + positive_offset
    loss = F.cross_entropy(sim / temperature, labels)
    with torch.no_grad():
        sim = sim.detach().float()
        pos = sim[rows, labels]
        neg_mask = torch.ones_like(sim, dtype=torch.bool)
        neg_mask[rows, labels] = False
        n_neg = int(neg_mask.sum())
        best_neg = sim.masked_fill(~neg_mask, float("-inf")).max(dim=1).values
        stats = {
            f"{prefix}loss": float(loss.detach()),
            f"{prefix}accuracy": float((pos > best_neg).float().mean()),
            f"{prefix}pos_sim": float(pos.mean()),
            f"{prefix}neg_sim": float(sim[neg_mask].mean()) if n_neg else float("nan"),
        }
    return loss, stats
