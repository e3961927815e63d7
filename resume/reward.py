"""The ReSuMe reward: structure term + discretised retrieval delta.

Implements METHOD.md, "Reward for one sampled summary" and "Ablation readings":

    r(s, d) = StructureReward(s) + r_phi(Delta),
    Delta   = RetScore(s) - RetScore(d),
    RetScore(x) = sum_{q+} S(q, x) / (sum_{q+} S(q, x) + sum_{q-} S(q, x)),

with S the frozen retriever's cosine clamped at 0, q+ the training queries relevant to d
and q- `n_negatives` training queries drawn uniformly from the rest. The maths are plain
functions on tensors (`structure_reward`, `ret_score`, `discretize`, `bucket_index`);
`RetrievalReward` joins them to a retriever, the training split and a seeded sampler, and
is a TRL-style keyword reward callable.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from resume.diagnostics import query_overlap, repetition_score
from resume.summarizer.parsing import SEPARATOR, parse_completion

# Interior edges of the discrete mapping r_phi: bucket i is [edges[i-1], edges[i]),
# the outer buckets are open-ended, so Delta = 1.0 lands in the top bucket.
DEFAULT_EDGES: tuple[float, ...] = (-0.5, -0.2, -0.1, 0.0, 0.1, 0.2, 0.5)
DEFAULT_VALUES: tuple[float, ...] = (-1.0, -0.8, -0.6, -0.3, 0.3, 0.6, 0.8, 1.0)
RETSCORE_MODES: tuple[str, ...] = ("ratio", "positives_only")


# ----------------------------------------------------------------------------- structure


def structure_reward(
    num_tokens: int | None,
    *,
    min_tokens: int = 64,
    max_tokens: int = 128,
    in_range: float = 1.0,
    over: float = 0.9,
    under: float = 0.3,
    missing: float = -1.0,
) -> float:
    """StructureReward of a summary of `num_tokens` retriever tokens (None: no separator).

    `min_tokens..max_tokens` inclusive -> `in_range`; longer -> `over`; shorter (an empty
    summary included) -> `under`; separator missing -> `missing`.
    """
    if num_tokens is None:
        return missing
    if num_tokens < 0:
        raise ValueError(f"num_tokens ({num_tokens}) must be >= 0, or None when the separator is missing")
    if num_tokens < min_tokens:
        return under
    if num_tokens > max_tokens:
        return over
    return in_range


@dataclass(frozen=True)
class StructureConfig:
    """Parameters of `structure_reward`; the `reward.structure` node of the config."""

    min_tokens: int = 64
    max_tokens: int = 128
    in_range: float = 1.0
    over: float = 0.9
    under: float = 0.3
    missing: float = -1.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"structure window [{self.min_tokens}, {self.max_tokens}] must satisfy "
                "0 <= min_tokens <= max_tokens; fix reward.structure.min_tokens / max_tokens"
            )

    def __call__(self, num_tokens: int | None) -> float:
        return structure_reward(num_tokens, **{f.name: getattr(self, f.name) for f in fields(self)})


def _as_structure(structure: StructureConfig | Mapping[str, Any] | None) -> StructureConfig:
    if structure is None:
        return StructureConfig()
    if isinstance(structure, StructureConfig):
        return structure
    known = {f.name for f in fields(StructureConfig)}
    unknown = sorted(set(structure) - known)
    if unknown:
        raise ValueError(f"unknown reward.structure keys {unknown}; allowed keys are {sorted(known)}")
    return StructureConfig(**dict(structure))


# ----------------------------------------------------------------------------- RetScore


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


# ----------------------------------------------------------------------------- discrete mapping


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


def _check_buckets(
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
    edges, values = _check_buckets(edges, values)
    if not delta.is_floating_point():
        delta = delta.to(torch.float32)
    index = bucket_index(delta, edges)
    table = torch.tensor(values, dtype=delta.dtype, device=delta.device)
    out = table[index.clamp_min(0)]
    return torch.where(index < 0, torch.full_like(out, math.nan), out)


# ----------------------------------------------------------------------------- batch of rewards


@dataclass
class RewardBatch:
    """Per-completion reward terms (all on CPU; float32 unless noted).

    Completions without the separator have `num_tokens` = -1, `bucket` = -1 and NaN for
    `delta`, `ret_score_summary`, `repetition` and `query_overlap` (the summary is never
    encoded); their `retrieval` term is the configured penalty (-1).
    """

    total: Tensor  # structure + retrieval
    structure: Tensor
    retrieval: Tensor  # r_phi(Delta), or Delta itself without discretization
    delta: Tensor
    ret_score_summary: Tensor
    ret_score_doc: Tensor
    num_tokens: Tensor  # long; retriever tokens of the summary
    has_separator: Tensor  # bool
    bucket: Tensor  # long; bucket of Delta in the discrete mapping
    repetition: Tensor  # diagnostics.repetition_score of the summary
    query_overlap: Tensor  # diagnostics.query_overlap of the summary with the doc's q+
    negative_qids: list[tuple[str, ...]]  # q- used for each completion (shared by a doc's group)
    num_buckets: int = len(DEFAULT_VALUES)

    def __len__(self) -> int:
        return self.total.shape[0]

    def log_dict(self, prefix: str) -> dict[str, float]:
        """Batch statistics under `prefix/` (NaN where a statistic has no completion to average).

        Length, Delta, RetScore(s) and diagnostics average over completions with a
        separator; `bucket_i` is the fraction of ALL completions in bucket i (the buckets
        plus `1 - separator_rate` sum to 1).
        """

        def mean(x: Tensor) -> float:
            return float(x.float().mean()) if x.numel() else math.nan

        valid = self.has_separator
        stats = {
            "reward_mean": mean(self.total),
            "reward_std": float(self.total.std(unbiased=False)) if len(self) else math.nan,
            "reward_min": float(self.total.min()) if len(self) else math.nan,
            "reward_max": float(self.total.max()) if len(self) else math.nan,
            "structure_mean": mean(self.structure),
            "retrieval_mean": mean(self.retrieval),
            "delta_mean": mean(self.delta[valid]),
            "ret_score_summary_mean": mean(self.ret_score_summary[valid]),
            "ret_score_doc_mean": mean(self.ret_score_doc),
            "separator_rate": mean(valid),
            "length_mean": mean(self.num_tokens[valid]),
            "repetition_mean": mean(self.repetition[valid]),
            "query_overlap_mean": mean(self.query_overlap[valid]),
        }
        for i in range(self.num_buckets):
            stats[f"bucket_{i}"] = mean(self.bucket == i)
        return {f"{prefix}/{key}": value for key, value in stats.items()}


# ----------------------------------------------------------------------------- reward object


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
        for name in ("encode_queries", "encode_documents"):
            if not callable(getattr(retriever, name, None)):
                raise TypeError(f"retriever {type(retriever).__name__} has no callable `{name}(texts)`")
        if getattr(retriever, "tokenizer", None) is None:
            raise TypeError(
                f"retriever {type(retriever).__name__} has no `tokenizer`: the structure reward counts "
                "summary tokens with the retriever's tokenizer"
            )
        if not separator:
            raise ValueError("reward.separator must be a non-empty string, e.g. '</think>'")
        if retscore not in RETSCORE_MODES:
            raise ValueError(f"reward.retscore={retscore!r} is not one of {RETSCORE_MODES}")
        n_negatives = int(n_negatives)
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
        self.retriever = retriever
        self.separator = separator
        self.structure = _as_structure(structure)
        self.n_negatives = n_negatives
        self.retscore = retscore
        self.discrete = bool(discrete)
        self.clamp_similarity = bool(clamp_similarity)
        self.bucket_edges, self.bucket_values = _check_buckets(bucket_edges, bucket_values)
        self.missing_retrieval = float(missing_retrieval)
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._doc_texts = doc_texts
        self._query_texts = queries
        # Sorted ids: the sample depends on the seed and the split, not on mapping order.
        self._qids: list[str] = sorted(queries)
        qindex = {qid: i for i, qid in enumerate(self._qids)}
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
        self._positives: dict[str, list[int]] = {d: sorted(ix) for d, ix in sorted(positives.items())}
        if not self._positives:
            raise ValueError(
                "no document of doc_texts has a training query with grade >= 1, so nothing can be "
                "rewarded; check that doc_texts and the training qrels use the same doc ids"
            )
        worst = max(self._positives, key=lambda d: len(self._positives[d]))
        pool = len(self._qids) - len(self._positives[worst])
        if n_negatives > pool:
            raise ValueError(
                f"reward.n_negatives ({n_negatives}) exceeds the negative pool of document {worst!r}: "
                f"{len(self._qids)} training queries minus {len(self._positives[worst])} relevant ones "
                f"leave {pool}; set reward.n_negatives<={pool}"
            )
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
