"""The ReSuMe reward object: structure term + discretised retrieval delta, on a frozen retriever.

Implements METHOD.md, "Reward for one sampled summary" and "Ablation readings":

    r(s, d) = StructureReward(s) + r_phi(Delta),
    Delta   = RetScore(s) - RetScore(d),

with q+ the training queries relevant to d and q- `n_negatives` training queries drawn
uniformly from the rest. The maths are plain functions (`structure.py`, `retscore.py`);
`RetrievalReward` joins them to a retriever, the training split and a seeded sampler, and
is a TRL-style keyword reward callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from resume.rewards.batch import RewardBatch
from resume.rewards.diagnostics import query_overlap, repetition_score
from resume.rewards.retscore import (
    DEFAULT_EDGES,
    DEFAULT_VALUES,
    RETSCORE_MODES,
    bucket_index,
    check_buckets,
    discretize,
    ret_score,
)
from resume.rewards.structure import StructureConfig, as_structure
from resume.summarizer.parsing import SEPARATOR, parse_completion


class Retriever(Protocol):
    """What the reward needs from a retriever: L2-normalised embeddings and its tokenizer."""

    tokenizer: Any

    def encode_queries(self, texts: list[str]) -> Tensor: ...

    def encode_documents(self, texts: list[str]) -> Tensor: ...


def _completion_text(completion: Any) -> str:
    """A completion as text: TRL passes strings, or message lists in conversational mode."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    raise TypeError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}"
    )


def _check_retriever(retriever: Any) -> None:
    for name in ("encode_queries", "encode_documents"):
        if not callable(getattr(retriever, name, None)):
            raise TypeError(f"retriever {type(retriever).__name__} has no callable `{name}(texts)`")
    if getattr(retriever, "tokenizer", None) is None:
        raise TypeError(
            f"retriever {type(retriever).__name__} has no `tokenizer`: the structure reward counts "
            "summary tokens with the retriever's tokenizer"
        )


def _check_settings(separator: str, retscore: str, n_negatives: int) -> int:
    """Reject reward settings that cannot work together; returns `n_negatives`."""
    if not separator:
        raise ValueError("reward.separator must be a non-empty string, e.g. '</think>'")
    if retscore not in RETSCORE_MODES:
        raise ValueError(f"reward.retscore={retscore!r} is not one of {RETSCORE_MODES}")
    if n_negatives < 0:
        raise ValueError(f"reward.n_negatives ({n_negatives}) must be >= 0")
    if retscore == "ratio" and n_negatives == 0:
        raise ValueError(
            "reward.retscore=ratio with reward.n_negatives=0: without negative queries RetScore = "
            "sum_pos / sum_pos is identically 1, so Delta carries no signal; set reward.n_negatives>=1, "
            "or reward.retscore=positives_only for the w/o-negatives ablation"
        )
    if retscore == "positives_only" and n_negatives > 0:
        raise ValueError(
            f"reward.retscore=positives_only ignores negatives, but reward.n_negatives={n_negatives} "
            "would sample and encode them for nothing; set reward.n_negatives=0"
        )
    return n_negatives


def _positive_index(
    qids: Sequence[str], qrels: Mapping[str, Mapping[str, int]], doc_texts: Mapping[str, str]
) -> dict[str, list[int]]:
    """doc id -> sorted indices (into `qids`) of its training queries with grade >= 1."""
    qindex = {qid: i for i, qid in enumerate(qids)}
    positives: dict[str, set[int]] = {}
    for qid, judged in qrels.items():
        if qid not in qindex:
            raise ValueError(
                f"qrels name query {qid!r}, which is not in `queries`: the reward must be built from "
                "the training split only, with qrels and queries of the same split; pass the training "
                "qrels (dev/test queries must never reach the reward)"
            )
        for doc_id, grade in judged.items():
            if grade >= 1 and doc_id in doc_texts:
                positives.setdefault(doc_id, set()).add(qindex[qid])
    if not positives:
        raise ValueError(
            "no document of doc_texts has a training query with grade >= 1, so nothing can be "
            "rewarded; check that doc_texts and the training qrels use the same doc ids"
        )
    return {d: sorted(ix) for d, ix in sorted(positives.items())}


def _check_negative_pool(positives: Mapping[str, list[int]], n_queries: int, n_negatives: int) -> None:
    worst = max(positives, key=lambda d: len(positives[d]))
    pool = n_queries - len(positives[worst])
    if n_negatives > pool:
        raise ValueError(
            f"reward.n_negatives ({n_negatives}) exceeds the negative pool of document {worst!r}: "
            f"{n_queries} training queries minus {len(positives[worst])} relevant ones "
            f"leave {pool}; set reward.n_negatives<={pool}"
        )


class RetrievalReward:
    """ReSuMe's reward for sampled summaries, scored by a frozen retriever on the TRAINING split.

    `doc_texts` maps doc id -> the text whose RetScore is the baseline of Delta; `queries`
    and `qrels` must be the training split only (dev/test queries must never reach the
    reward; qrels naming a query outside `queries` are rejected). Negatives for a document
    are drawn once per call and shared by all its completions and by RetScore(d), from a
    private generator seeded with `seed`. Query and document embeddings are memoised by
    id: call `clear_cache()` whenever the retriever's weights change.
    """

    log_prefix = "reward"  # namespace of the metrics sent through TRL's `log_metric`

    def __init__(
        self,
        retriever: Retriever,
        doc_texts: Mapping[str, str],
        queries: Mapping[str, str],
        qrels: Mapping[str, Mapping[str, int]],
        *,
        separator: str = SEPARATOR,
        structure: StructureConfig | Mapping[str, Any] | None = None,
        n_negatives: int = 8,
        retscore: str = "ratio",
        discrete: bool = True,
        clamp_similarity: bool = True,
        bucket_edges: Sequence[float] = DEFAULT_EDGES,
        bucket_values: Sequence[float] = DEFAULT_VALUES,
        missing_retrieval: float = -1.0,
        seed: int = 0,
    ) -> None:
        _check_retriever(retriever)
        n_negatives = _check_settings(separator, retscore, int(n_negatives))
        self.retriever = retriever
        self.separator = separator
        self.structure = as_structure(structure)
        self.n_negatives = n_negatives
        self.retscore = retscore
        self.discrete = bool(discrete)
        self.clamp_similarity = bool(clamp_similarity)
        self.bucket_edges, self.bucket_values = check_buckets(bucket_edges, bucket_values)
        self.missing_retrieval = float(missing_retrieval)
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._doc_texts = doc_texts
        self._query_texts = queries
        # Sorted ids: the sample depends on the seed and the split, not on mapping order.
        self._qids: list[str] = sorted(queries)
        self._positives = _positive_index(self._qids, qrels, doc_texts)
        _check_negative_pool(self._positives, len(self._qids), n_negatives)
        self._query_cache: dict[str, Tensor] = {}
        self._doc_cache: dict[str, Tensor] = {}
        self.last_batch: RewardBatch | None = None  # the latest __call__'s terms, for logging

    # ------------------------------------------------------------------ public helpers

    def rewardable_doc_ids(self) -> list[str]:
        """Doc ids (sorted) that have at least one positive training query: the only ones to sample."""
        return list(self._positives)

    def positive_qids(self, doc_id: str) -> list[str]:
        """q+ of `doc_id`: its training queries with grade >= 1."""
        self._check_rewardable(doc_id)
        return [self._qids[i] for i in self._positives[doc_id]]

    def sample_negatives(self, doc_id: str) -> tuple[str, ...]:
        """Draw q- for `doc_id`: `n_negatives` distinct training queries not relevant to it.

        Uniform over the k-subsets of Q minus q+ (Floyd's algorithm on the complement's
        indices, so a relevant query is never drawn and nothing has to be redrawn).
        """
        self._check_rewardable(doc_id)
        relevant = self._positives[doc_id]
        pool = len(self._qids) - len(relevant)
        chosen: set[int] = set()
        for j in range(pool - self.n_negatives, pool):
            t = int(torch.randint(0, j + 1, (1,), generator=self._generator))
            chosen.add(j if t in chosen else t)
        negatives = []
        for rank in sorted(chosen):  # the rank-th non-relevant query: step over relevant indices
            index = rank
            for r in relevant:
                if r > index:
                    break
                index += 1
            negatives.append(self._qids[index])
        return tuple(negatives)

    def reseed(self, seed: int) -> None:
        """Restart the negative sampler from `seed`.

        A trainer calls it once per step with `base seed + step`, so the negatives of step
        `n` depend only on `n`: a run resumed from a checkpoint draws the same q- as an
        uninterrupted one (the embedding caches are unaffected).
        """
        self._generator.manual_seed(int(seed))

    def clear_cache(self) -> None:
        """Forget memoised embeddings; required after the retriever's weights change."""
        self._query_cache.clear()
        self._doc_cache.clear()

    # ------------------------------------------------------------------ internals

    def _check_rewardable(self, doc_id: str) -> None:
        if doc_id in self._positives:
            return
        if doc_id not in self._doc_texts:
            raise KeyError(f"doc id {doc_id!r} is not in the reward's doc_texts")
        raise ValueError(
            f"doc id {doc_id!r} has no relevant training query, so its summaries cannot be rewarded; "
            "sample prompts from RetrievalReward.rewardable_doc_ids()"
        )

    @staticmethod
    def _encode_cached(
        ids: list[str],
        cache: dict[str, Tensor],
        texts: Mapping[str, str],
        encode: Callable[[list[str]], Tensor],
    ) -> Tensor:
        missing = [i for i in dict.fromkeys(ids) if i not in cache]
        if missing:
            embeddings = encode([texts[i] for i in missing])
            if embeddings.shape[0] != len(missing):
                raise ValueError(
                    f"the retriever returned {embeddings.shape[0]} embeddings for {len(missing)} texts"
                )
            cache.update(zip(missing, embeddings.detach()))
        return torch.stack([cache[i] for i in ids])

    def _count_tokens(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        encoded = self.retriever.tokenizer(texts, add_special_tokens=False)
        return [len(ids) for ids in encoded["input_ids"]]

    # ------------------------------------------------------------------ reward

    def _ret_scores(
        self,
        docs: list[str],
        positives: Mapping[str, list[str]],
        negatives: Mapping[str, tuple[str, ...]],
        summaries: list[str],
        summary_docs: list[str],
    ) -> tuple[Tensor, Tensor]:
        """RetScore (float64, CPU) of each distinct doc and of each summary (of `summary_docs[i]`)."""
        # Every query needed in this call, encoded at most once (and memoised across calls).
        needed = list(dict.fromkeys(q for d in docs for q in (*positives[d], *negatives[d])))
        column = {qid: j for j, qid in enumerate(needed)}
        query_emb = self._encode_cached(
            needed, self._query_cache, self._query_texts, self.retriever.encode_queries
        )
        device = query_emb.device
        width = max(len(positives[d]) for d in docs)
        pos_index = torch.zeros((len(docs), width), dtype=torch.long)
        pos_mask = torch.zeros((len(docs), width), dtype=torch.bool)
        neg_index = torch.zeros((len(docs), self.n_negatives), dtype=torch.long)
        for row, d in enumerate(docs):
            pos_index[row, : len(positives[d])] = torch.tensor([column[q] for q in positives[d]])
            pos_mask[row, : len(positives[d])] = True
            neg_index[row] = torch.tensor([column[q] for q in negatives[d]], dtype=torch.long)

        def score(text_emb: Tensor, rows: list[int]) -> Tensor:
            sims = (text_emb.to(device) @ query_emb.T).double().cpu()  # cosines of normalised embeddings
            return ret_score(
                sims.gather(1, pos_index[rows]),
                sims.gather(1, neg_index[rows]),
                pos_mask=pos_mask[rows],
                clamp=self.clamp_similarity,
                mode=self.retscore,
            )

        doc_emb = self._encode_cached(docs, self._doc_cache, self._doc_texts, self.retriever.encode_documents)
        ret_doc = score(doc_emb, list(range(len(docs))))
        ret_summary = torch.zeros(0, dtype=torch.float64)
        if summaries:  # one encoder call for every well-formed summary of the batch
            doc_row = {d: row for row, d in enumerate(docs)}
            summary_emb = self.retriever.encode_documents(summaries)
            ret_summary = score(summary_emb, [doc_row[d] for d in summary_docs])
        return ret_doc, ret_summary

    @torch.no_grad()
    def compute(self, completions: Sequence[Any], doc_ids: Sequence[str]) -> RewardBatch:
        """All reward terms for `completions[i]`, a sampled summary of document `doc_ids[i]`."""
        if len(completions) != len(doc_ids):
            raise ValueError(
                f"got {len(completions)} completions but {len(doc_ids)} doc ids; pass one doc id each"
            )
        parsed = [parse_completion(_completion_text(c), self.separator) for c in completions]
        docs = list(dict.fromkeys(doc_ids))  # distinct, in order of first appearance
        for doc_id in docs:
            self._check_rewardable(doc_id)
        # One draw per document and call: its whole group and its own RetScore(d) share q-.
        negatives = {d: self.sample_negatives(d) for d in docs}
        positives = {d: self.positive_qids(d) for d in docs}
        valid = [i for i, p in enumerate(parsed) if p.has_separator]
        summaries = [parsed[i].summary or "" for i in valid]
        summary_docs = [doc_ids[i] for i in valid]

        size = len(parsed)
        structure = torch.full((size,), self.structure(None), dtype=torch.float32)
        retrieval = torch.full((size,), self.missing_retrieval, dtype=torch.float32)
        delta = torch.full((size,), math.nan, dtype=torch.float32)
        ret_summary = torch.full((size,), math.nan, dtype=torch.float32)
        ret_doc = torch.zeros(size, dtype=torch.float32)
        num_tokens = torch.full((size,), -1, dtype=torch.long)
        bucket = torch.full((size,), -1, dtype=torch.long)
        repetition = torch.full((size,), math.nan, dtype=torch.float32)
        overlap = torch.full((size,), math.nan, dtype=torch.float32)
        if docs:
            ret_doc_per_doc, ret_s = self._ret_scores(docs, positives, negatives, summaries, summary_docs)
            doc_row = {d: row for row, d in enumerate(docs)}
            ret_doc = ret_doc_per_doc[[doc_row[d] for d in doc_ids]].float()
        if valid:
            at = torch.tensor(valid, dtype=torch.long)
            delta_valid = ret_s - ret_doc_per_doc[[doc_row[d] for d in summary_docs]]  # float64: exact edges
            r_phi = (
                discretize(delta_valid, self.bucket_edges, self.bucket_values)
                if self.discrete
                else delta_valid
            )
            counts = self._count_tokens(summaries)
            num_tokens[at] = torch.tensor(counts, dtype=torch.long)
            structure[at] = torch.tensor([self.structure(n) for n in counts], dtype=torch.float32)
            retrieval[at] = r_phi.float()
            delta[at] = delta_valid.float()
            ret_summary[at] = ret_s.float()
            bucket[at] = bucket_index(delta_valid, self.bucket_edges)
            query_texts = {d: [self._query_texts[q] for q in positives[d]] for d in docs}
            repetition[at] = torch.tensor([repetition_score(s) for s in summaries], dtype=torch.float32)
            overlap[at] = torch.tensor(
                [query_overlap(s, query_texts[d]) for s, d in zip(summaries, summary_docs)],
                dtype=torch.float32,
            )
        return RewardBatch(
            total=structure + retrieval,
            structure=structure,
            retrieval=retrieval,
            delta=delta,
            ret_score_summary=ret_summary,
            ret_score_doc=ret_doc,
            num_tokens=num_tokens,
            has_separator=torch.tensor([p.has_separator for p in parsed], dtype=torch.bool),
            bucket=bucket,
            repetition=repetition,
            query_overlap=overlap,
            negative_qids=[negatives[d] for d in doc_ids],
            num_buckets=len(self.bucket_values),
        )

    def __call__(self, completions: Sequence[Any], doc_ids: Sequence[str], **kwargs: Any) -> list[float]:
        """TRL keyword reward: the total reward of each completion.

        Extra keyword arguments from the trainer are ignored, except TRL's `log_metric`,
        which receives this batch's `log_dict` (NaN statistics are skipped).
        """
        batch = self.compute(completions, doc_ids)
        self.last_batch = batch
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            for name, value in batch.log_dict(self.log_prefix).items():
                if math.isfinite(value):
                    log_metric(name, value)
        return batch.total.tolist()
