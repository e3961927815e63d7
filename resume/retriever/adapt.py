"""Retriever adaptation (steps 2-3 of each iteration): contrastive fine-tuning on (query, summary) pairs.

The loop calls `adapt_retriever(retriever, training_pairs(train_split, summaries))`: InfoNCE
with in-batch negatives (`resume.retriever.loss.info_nce`, at `retriever.temperature`),
AdamW, one `pytorch_lightning.Trainer` fit. Batches come from `UniqueDocBatchSampler`,
which never lets a pair's document act as a negative for a query it is relevant to.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from resume.data import Split
from resume.retriever.contrastive import ContrastiveModule
from resume.retriever.sampler import UniqueDocBatchSampler
from resume.utils.lightning import make_trainer, release_fit

log = logging.getLogger(__name__)

__all__ = ["Pair", "PairCollator", "PairData", "UniqueDocBatchSampler", "adapt_retriever", "training_pairs"]


class Pair(NamedTuple):
    """One training example: a query and the text of one document judged relevant to it."""

    query: str
    doc: str  # the document's representation being adapted to (its summary, or the full text)
    doc_id: str
    query_id: str = ""
    relevant: frozenset[str] = (
        frozenset()
    )  # every doc judged relevant to the query (kept out of its negatives)


def training_pairs(split: Split, doc_texts: Mapping[str, str], min_grade: int = 1) -> list[Pair]:
    """One `Pair` per judged-relevant (grade >= `min_grade`) (query, document) of `split`, in qrels order.

    `doc_texts` maps doc id -> the text the retriever is adapted to (summaries in the method;
    full documents also work). Every judged-relevant document must have a text: a missing
    summary is an error, not a silently smaller training set.
    """
    pairs: list[Pair] = []
    missing: list[str] = []
    for qid, judged in split.qrels.items():
        relevant = frozenset(d for d, g in judged.items() if g >= min_grade)
        for did in sorted(relevant):
            if did not in doc_texts:
                missing.append(did)
                continue
            pairs.append(Pair(split.queries[qid], doc_texts[did], did, qid, relevant))
    if missing:
        raise ValueError(
            f"{len(missing)} judged-relevant (query, doc) pairs of split {split.name!r} name documents "
            f"without a text in doc_texts (e.g. {sorted(set(missing))[:5]}); summarize every judged "
            "document first"
        )
    return pairs


@dataclass
class PairCollator:
    """Pairs -> `{"query": {input_ids, attention_mask}, "doc": {...}}` for `DenseRetriever.training_step`.

    `tokenize(texts, kind)` is the retriever's (query max length for queries, doc max length for
    documents). With `negatives > 0`, that many documents drawn uniformly from `negative_pool`
    (doc id -> text), none judged relevant to any query of the batch, are appended after the
    positives and shared by all queries. They are random, not mined ("hard") negatives.
    """

    tokenize: Callable[[list[str], str], Mapping[str, torch.Tensor]]
    negatives: int = 0
    negative_pool: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self._pool_ids = list(self.negative_pool) if self.negatives else []  # ids are listed only when needed
        self._rng = np.random.default_rng(self.seed)
        if self.negatives > len(self._pool_ids):
            raise ValueError(
                f"hard_negatives ({self.negatives}) exceeds the {len(self._pool_ids)} documents available "
                "to draw them from; lower adaptation.hard_negatives or pass doc_texts"
            )

    def sample_negatives(self, batch: Sequence[Pair]) -> list[str]:
        """Ids of `negatives` distinct random docs, none relevant to a query of `batch`."""
        excluded = set().union(*(p.relevant | {p.doc_id} for p in batch))
        chosen: dict[str, None] = {}
        for _ in range(100):  # rejection sampling; the pool is normally far larger than the exclusions
            for j in self._rng.integers(len(self._pool_ids), size=2 * self.negatives).tolist():
                did = self._pool_ids[j]
                if did not in excluded and did not in chosen:
                    chosen[did] = None
                    if len(chosen) == self.negatives:
                        return list(chosen)
        raise ValueError(
            f"could not draw {self.negatives} documents outside the {len(excluded)} relevant to this batch "
            f"from {len(self._pool_ids)}; lower adaptation.hard_negatives"
        )

    def __call__(self, batch: Sequence[Pair]) -> dict[str, dict[str, torch.Tensor]]:
        docs = [p.doc for p in batch]
        if self.negatives:
            docs += [self.negative_pool[d] for d in self.sample_negatives(batch)]
        q = self.tokenize([p.query for p in batch], "query")
        d = self.tokenize(docs, "doc")
        keep = ("input_ids", "attention_mask")
        return {"query": {k: q[k] for k in keep}, "doc": {k: d[k] for k in keep}}


class PairData(pl.LightningDataModule):
    """Builds the epoch's dataloader once the Trainer knows the world size, rank and epoch."""

    def __init__(
        self, pairs: Sequence[Pair], collate: PairCollator, batch_size: int, seed: int, drop_last: bool
    ):
        super().__init__()
        self.pairs, self.collate = list(pairs), collate
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last

    def train_dataloader(self) -> DataLoader:
        sampler = UniqueDocBatchSampler(
            [p.doc_id for p in self.pairs],
            self.batch_size,
            self.seed,
            self.drop_last,
            relevant=[p.relevant for p in self.pairs],
            num_replicas=self.trainer.world_size,
            rank=self.trainer.global_rank,
        )
        # rebuilt every epoch (reload_dataloaders_every_n_epochs=1): len() is this epoch's exact batch count
        sampler.set_epoch(self.trainer.current_epoch)
        return DataLoader(self.pairs, batch_sampler=sampler, collate_fn=self.collate, num_workers=0)


def adapt_retriever(
    retriever: Any,
    pairs: Sequence[Pair],
    *,
    batch_size: int = 32,
    batch_size_per: str = "device",
    epochs: int = 1,
    max_steps: int = -1,
    lr: float = 1e-5,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.0,
    hard_negatives: int = 0,
    doc_texts: Mapping[str, str] | None = None,
    drop_last: bool = False,
    seed: int = 0,
    gather_negatives: bool = True,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    loggers: Any = None,
) -> dict[str, float]:
    """Fine-tune `retriever` (a `DenseRetriever`) in place on `pairs` with InfoNCE; return training stats.

    Args:
        retriever: the model; trained in train mode on the Trainer's device, then moved back to its
            device and mode.
        pairs: from `training_pairs` (training queries x texts of their relevant documents).
        batch_size: pairs per batch and per device (in-batch negatives: `batch_size - 1` per query).
        batch_size_per: `device` (as above) or `world`: `batch_size` is the global batch, which each
            of the trainer's `devices x num_nodes` ranks takes an equal share of (`trainer=ddp`: the same
            config on N ranks takes the steps of one process).
        epochs, max_steps: training stops at whichever comes first (`max_steps=-1`: epochs only).
        lr, weight_decay: AdamW's (the paper: lr 1e-5); biases and LayerNorm get no decay.
        warmup_ratio: fraction of the steps with a linear lr warmup (0: none; constant lr afterwards).
        hard_negatives: extra negatives per batch shared by all queries, drawn at random from
            `doc_texts` among the documents relevant to no query of the batch (0, the paper's setting).
        doc_texts: doc id -> text to draw those negatives from (required when `hard_negatives > 0`).
        drop_last: drop each epoch's incomplete last batches (their pairs are skipped that epoch).
        seed: seeds batch order and negative sampling (dropout follows the global torch seed).
        gather_negatives: with several devices, every query also scores the documents of the other
            devices' batches (embeddings all-gathered with their gradients), so the negatives are those
            of the global batch `batch_size * devices`, as on one device; False keeps them per device.
            Extra `hard_negatives` are drawn per device, outside that device's relevant documents only.
        optimizer: a factory `params -> Optimizer` replacing `AdamW(lr, weight_decay)`.
        trainer_kwargs: more `pytorch_lightning.Trainer` arguments (accelerator, devices, precision,
            strategy, gradient_clip_val, ...); epochs, steps, loggers and data loading are set here.
        loggers: Lightning logger(s) receiving the per-step `retriever/train/*` metrics.

    Returns:
        `retriever/train/{steps, epochs, pairs, loss, accuracy, seconds}`; loss and accuracy are
        those of the last step.
    """
    if not pairs:
        raise ValueError(
            "adapt_retriever got no training pairs; the training split has no judged-relevant pair"
        )
    if batch_size < 2 and hard_negatives < 1:
        raise ValueError(
            f"batch_size ({batch_size}) leaves a query no negative, so InfoNCE is constant; "
            f"set adaptation.batch_size >= 2 or adaptation.hard_negatives >= 1"
        )
    if epochs < 1:
        raise ValueError(f"adaptation.epochs ({epochs}) must be >= 1")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"adaptation.warmup_ratio ({warmup_ratio}) must be in [0, 1)")
    if hard_negatives < 0 or (hard_negatives > 0 and not doc_texts):
        raise ValueError(
            f"hard_negatives={hard_negatives} needs hard_negatives >= 0 and, when > 0, doc_texts to draw "
            "them from"
        )
    if not any(p.requires_grad for p in retriever.parameters()):
        raise ValueError(
            "the retriever has no trainable parameter (frozen as a reward model?); "
            "call retriever.requires_grad_(True) before adapting it"
        )
    if batch_size_per not in ("device", "world"):
        raise ValueError(f"adaptation.batch_size_per={batch_size_per!r} must be 'device' or 'world'")
    trainer = make_trainer(
        trainer_kwargs,
        defaults={
            "accelerator": "auto",
            "devices": 1,
            "precision": "32-true",
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
        },
        owned={
            "max_epochs": epochs,
            "max_steps": max_steps,
            "logger": loggers if loggers else False,
            "reload_dataloaders_every_n_epochs": 1,  # a fresh, correctly sized batch plan every epoch
            "use_distributed_sampler": False,  # UniqueDocBatchSampler shards across ranks itself
        },
        owner="adapt_retriever",
        fix="use adaptation.epochs / adaptation.max_steps and the loggers argument instead",
    )
    if batch_size_per == "world":
        if batch_size % trainer.world_size:
            raise ValueError(
                f"adaptation.batch_size={batch_size} (batch_size_per: world) must be a multiple of the "
                f"world size {trainer.world_size}"
            )
        batch_size //= trainer.world_size
    collate = PairCollator(retriever.tokenize, hard_negatives, doc_texts if hard_negatives else {}, seed)
    data = PairData(pairs, collate, batch_size, seed, drop_last)
    opt = optimizer or functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)
    module = ContrastiveModule(retriever, opt, warmup_ratio=warmup_ratio, gather_negatives=gather_negatives)
    device, was_training = retriever.device, retriever.training
    t0 = time.perf_counter()
    try:
        module.train()  # dropout on; Lightning 2.x keeps whatever mode the module arrives in
        trainer.fit(module, datamodule=data)
    finally:
        retriever.to(device)
        retriever.train(was_training)
        retriever.zero_grad(set_to_none=True)  # the last step's gradients would stay resident all run
        release_fit(trainer, module)  # ... and AdamW's moments, through the retriever's link to the trainer
    seconds = time.perf_counter() - t0
    metrics = trainer.callback_metrics
    stats = {
        "retriever/train/steps": float(trainer.global_step),
        "retriever/train/epochs": float(trainer.current_epoch),
        "retriever/train/pairs": float(len(pairs)),
        "retriever/train/loss": float(metrics.get("retriever/train/loss", float("nan"))),
        "retriever/train/accuracy": float(metrics.get("retriever/train/accuracy", float("nan"))),
        "retriever/train/seconds": round(seconds, 3),
    }
    log.info("retriever adaptation: %s", stats)
    return stats
