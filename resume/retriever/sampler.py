"""`UniqueDocBatchSampler`: contrastive batches in which no document is a false negative.

A pair's document must never act as an in-batch negative for a query it is relevant to, so a
batch holds each document (and each document relevant to one of its queries) at most once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Hashable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class _Batch:
    """A batch being packed: its pairs, their documents, and the documents relevant to their queries."""

    def __init__(self, doc_ids: list[Hashable], relevant: list[frozenset]) -> None:
        self.doc_ids, self.relevant = doc_ids, relevant
        self.items: list[int] = []
        self.docs: set[Hashable] = set()
        self.blocked: set[Hashable] = set()

    def fits(self, i: int) -> bool:
        return self.doc_ids[i] not in self.blocked and self.relevant[i].isdisjoint(self.docs)

    def add(self, i: int) -> None:
        self.items.append(i)
        self.docs.add(self.doc_ids[i])
        self.blocked.update(self.relevant[i])

    def __len__(self) -> int:
        return len(self.items)


class UniqueDocBatchSampler(Sampler[list[int]]):
    """Seeded shuffled batches in which no pair's document is relevant to another pair's query.

    Pair `i` has document `doc_ids[i]` and the set `relevant[i]` of documents judged relevant
    to its query (default `{doc_ids[i]}`); pairs `i` and `j` may share a batch only if
    `doc_ids[j] not in relevant[i]` and `doc_ids[i] not in relevant[j]`. So a batch never
    holds two pairs of one document (their positives would be false negatives of each other),
    nor, when `relevant` is given, two pairs of one query or a document relevant to another
    batch query.

    Packing (greedy, O(n) for realistic data): the pairs are permuted with
    `numpy.random.default_rng([seed, epoch])`; each batch first takes the pairs that were
    set aside earlier (oldest first), then fills up from the permutation; a pair that does
    not fit is set aside for a later batch. Every pair is used exactly once per epoch; only
    the last batches can be smaller than `batch_size` (`drop_last` drops those, and their
    pairs, for this epoch). The batch count can therefore differ between epochs by a few.

    Epochs work as with `DistributedSampler`: call `set_epoch(e)` before iterating (the same
    epoch always gives the same batches). With `num_replicas > 1` every rank builds the same
    plan of GLOBAL batches of `batch_size * num_replicas` pairs (no document twice across the
    ranks' concurrent batches, so negatives gathered across devices hold no false negative)
    and takes slice `rank` of each, split as evenly as possible: every rank takes the same
    number of steps. A last global batch with fewer pairs than ranks is dropped (at most
    `num_replicas - 1` pairs skipped that epoch).
    """

    def __init__(
        self,
        doc_ids: Sequence[Hashable],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        *,
        relevant: Sequence[Collection[Hashable]] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        if relevant is not None and len(relevant) != len(doc_ids):
            raise ValueError(
                f"relevant has {len(relevant)} entries for {len(doc_ids)} doc_ids; give one per pair"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank ({rank}) must be in [0, num_replicas={num_replicas})")
        self.doc_ids = list(doc_ids)
        self.relevant = [
            frozenset(relevant[i]) | {d} if relevant is not None else frozenset([d])
            for i, d in enumerate(self.doc_ids)
        ]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        """All (global) batches of `epoch` (default: the current one), before the split across replicas."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._pack(epoch, self.batch_size * self.num_replicas))
        return self._cache[1]

    def _pack(self, epoch: int, batch_size: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.doc_ids)).tolist()
        stream = iter(order)
        # Pairs set aside, grouped by (doc, relevant): members of one group are interchangeable and
        # conflict with each other, so a batch tries one per group (cheap even with 10k pairs of one doc).
        waiting: dict[tuple[Hashable, frozenset], deque[int]] = {}
        batches: list[list[int]] = []
        exhausted = False
        while waiting or not exhausted:
            batch = _Batch(self.doc_ids, self.relevant)
            for key in list(waiting):
                if len(batch) == batch_size:
                    break
                group = waiting[key]
                if batch.fits(group[0]):
                    batch.add(group.popleft())
                    if not group:
                        del waiting[key]
            while len(batch) < batch_size:
                i = next(stream, None)
                if i is None:
                    exhausted = True
                    break
                if batch.fits(i):
                    batch.add(i)
                else:
                    waiting.setdefault((self.doc_ids[i], self.relevant[i]), deque()).append(i)
            if batch.items:
                batches.append(batch.items)
        if self.drop_last:
            batches = [b for b in batches if len(b) == batch_size]
        return batches

    def _local(self) -> list[list[int]]:
        batches = self.plan()
        if self.num_replicas == 1:
            return batches
        return [
            [int(i) for i in np.array_split(np.array(b), self.num_replicas)[self.rank]]
            for b in batches
            if len(b) >= self.num_replicas
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._local())

    def __len__(self) -> int:
        return len(self._local())
