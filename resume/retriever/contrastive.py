"""Retriever adaptation's LightningModule: InfoNCE on (query, text) batches around a `DenseRetriever`.

Built per fit by `adapt_retriever` with that fit's optimizer, warmup and negative gathering, so
the retriever itself carries no training state (the same pattern as `resume.grpo.GRPOModule`
around the summarizer). Batches are `{"query": {input_ids, attention_mask}, "doc": {...}}`
whose doc rows `0..B-1` are the positives of the `B` queries (rows `B..`: extra negatives).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from resume.retriever.loss import info_nce
from resume.utils.optim import decay_groups, lr_schedule


class ContrastiveModule(pl.LightningModule):
    """Trains `retriever` in place with `info_nce` at `retriever.temperature`.

    Args:
        retriever: a `DenseRetriever` (its encoder's weights are what the optimizer updates).
        optimizer: factory `params -> Optimizer`, e.g. `functools.partial(torch.optim.AdamW, lr=1e-5)`;
            biases and LayerNorm weights get no weight decay.
        warmup_ratio: fraction of the fit's steps with a linear lr warmup (0: constant lr).
        gather_negatives: on several devices, every query also scores the documents of the other
            devices' batches (embeddings all-gathered with their gradients).
    """

    def __init__(
        self,
        retriever: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_ratio: float = 0.0,
        gather_negatives: bool = False,
    ) -> None:
        super().__init__()
        self.retriever = retriever
        self.optimizer_factory = optimizer
        self.warmup_ratio = warmup_ratio
        self.gather_negatives = gather_negatives

    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        q = self.retriever(batch["query"]["input_ids"], batch["query"]["attention_mask"])
        d = self.retriever(batch["doc"]["input_ids"], batch["doc"]["attention_mask"])
        offset = 0
        if self.gather_negatives and self.trainer.world_size > 1:
            d, offset = gather_rows(d)
        loss, stats = info_nce(
            q, d, self.retriever.temperature, positive_offset=offset, prefix="retriever/train/"
        )
        if self.trainer.world_size > 1:
            # DDP averages the ranks' gradients; with uneven shares of a global batch (its last one) the
            # mean over ranks of per-rank means is not the mean over the batch's queries. Weighting this
            # rank's mean by its share x world makes the averaged gradient the global batch's.
            counts = self.all_gather(torch.tensor(q.size(0), device=q.device))
            loss = loss * (q.size(0) * self.trainer.world_size / float(counts.sum()))
        stats["retriever/train/lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        stats["retriever/train/negatives"] = float(d.size(0) - 1)  # per query: in-batch + extra
        self.log_dict(stats, batch_size=q.size(0), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(decay_groups(self.retriever.named_parameters()))
        if self.warmup_ratio <= 0:
            return optimizer
        # linear warmup then constant: the paper names only AdamW and its lr, no schedule
        scheduler = lr_schedule(
            optimizer, self.trainer.estimated_stepping_batches, "constant", self.warmup_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of `x` from every rank, concatenated in rank order, with gradients flowing back to each
    rank's own rows; and where this rank's rows start. Ranks may hold different row counts."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([x.size(0)], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    width = max(sizes)
    padded = torch.cat([x, x.new_zeros(width - x.size(0), x.size(1))]) if width > x.size(0) else x
    parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])
