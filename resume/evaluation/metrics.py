"""Retrieval metrics with trec_eval semantics, plus TREC run-file I/O.

Our own numpy implementation of what `pytrec_eval` (trec_eval 9) computes, so that we
also get per-query values (for significance tests) and control over missing queries.
The semantics below were checked experimentally against pytrec-eval-terrier 0.5.11 and
are pinned by `tests/unit/test_metrics.py`:

- Ranking: score descending; ties broken by doc id in *descending* string order (C
  `strcmp`, which for UTF-8 equals Python's code-point order). Insertion order of the run
  never matters. All retrieved docs are ranked (no 1000-doc cap).
- Relevance: grade >= 1 is relevant (mrr, recall, precision, map). nDCG uses the grade as
  gain, with negative grades counting as 0, discount `log2(rank + 1)`, and the ideal DCG
  from all judged docs of the query, cut at the same k.
- Docs in the run but not in the qrels are non-relevant.
- Queries averaged over: every query with at least one judgment in the qrels. A query
  whose judgments are all grade <= 0 is kept and scores 0 on every metric (as pytrec_eval
  does). A judged query that is absent from the run scores 0 (`trec_eval -c`; pytrec_eval
  would silently drop it). A query with an empty judgment dict is skipped (it could not
  appear in a qrels file). Run queries absent from the qrels are ignored.
- `mrr@k` = trec_eval `recip_rank` on the run cut to its top k (how BEIR defines MRR@k).
  BEIR's `evaluate_custom(..., metric="mrr")` agrees up to its rounding to 5 decimals and
  its tie-breaking (insertion order instead of doc id), and it divides by `len(qrels)`.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

METRICS: tuple[str, ...] = ("mrr@10", "ndcg@10", "recall@100", "recall@1000")
METRIC_KINDS: tuple[str, ...] = ("mrr", "ndcg", "recall", "precision", "map")
RELEVANCE_LEVEL = 1  # trec_eval's default `-l 1`: grade >= 1 is relevant
_METRIC_RE = re.compile(rf"^({'|'.join(METRIC_KINDS)})@([1-9][0-9]*)$")


@dataclass
class EvalResult:
    """Metrics of one run: mean over evaluated queries, and per query."""

    aggregate: dict[str, float]
    per_query: dict[str, dict[str, float]]
    num_queries: int
    num_missing: int = 0  # judged queries absent from the run, counted as 0


def parse_metric(name: str) -> tuple[str, int]:
    """Split `"ndcg@10"` into `("ndcg", 10)`; raise ValueError on anything else."""
    match = _METRIC_RE.match(name) if isinstance(name, str) else None
    if match is None:
        forms = ", ".join(f"{kind}@k" for kind in METRIC_KINDS)
        raise ValueError(f"unknown metric name {name!r}; accepted forms are {forms} with integer k >= 1")
    return match.group(1), int(match.group(2))


def _scores_array(doc_scores: Mapping[str, float]) -> np.ndarray:
    values = np.fromiter(doc_scores.values(), dtype=np.float64, count=len(doc_scores))
    if np.isnan(values).any():
        raise ValueError("run contains NaN scores; trec_eval order is undefined for NaN (check the encoder)")
    return values


def rank_run(scores: Mapping[str, float], depth: int | None = None) -> list[tuple[str, float]]:
    """The `(doc_id, score)` pairs of one query in trec_eval order, cut to `depth`."""
    values = _scores_array(scores)
    order = np.argsort(-values, kind="stable")
    ordered = values[order]
    if np.any(ordered[1:] == ordered[:-1]):  # ties need the doc-id order: slower exact sort
        ranked = sorted(scores.items(), key=itemgetter(1, 0), reverse=True)
    else:
        items = list(scores.items())
        ranked = [items[i] for i in order[:depth].tolist()]
    return ranked if depth is None else ranked[:depth]


def _ranks(doc_scores: Mapping[str, float], doc_ids: Iterable[str]) -> dict[str, int]:
    """1-based trec_eval ranks of the retrieved docs among `doc_ids`, without a full sort.

    Only the judged docs need a rank, so we binary-search their scores in the sorted score
    array (O(n log n) in numpy) and resolve ties by doc id only inside the tie group.
    """
    values = _scores_array(doc_scores)
    ordered = np.sort(values)
    n, ranks = len(values), {}
    tie_groups: dict[float, list[str]] = {}
    for doc_id in doc_ids:
        if doc_id not in doc_scores:
            continue
        score = float(doc_scores[doc_id])
        lo, hi = np.searchsorted(ordered, score, "left"), np.searchsorted(ordered, score, "right")
        above = n - int(hi)  # docs with a strictly higher score
        if hi - lo > 1:  # tied: docs with the same score and a larger doc id come first
            if score not in tie_groups:
                tie_groups[score] = [d for d, s in doc_scores.items() if s == score]
            above += sum(other > doc_id for other in tie_groups[score])
        ranks[doc_id] = above + 1
    return ranks


def _query_metrics(
    judged: Mapping[str, int], doc_scores: Mapping[str, float], parsed: Sequence[tuple[str, str, int]]
) -> dict[str, float]:
    """All requested metrics for one query (see the module docstring for semantics)."""
    gains = {d: g for d, g in judged.items() if g > 0}
    num_rel = sum(g >= RELEVANCE_LEVEL for g in judged.values())
    ranks = _ranks(doc_scores, gains)
    rel_ranks = np.sort(
        np.array([r for d, r in ranks.items() if gains[d] >= RELEVANCE_LEVEL], dtype=np.int64)
    )
    gain_ranks = np.array(list(ranks.values()), dtype=np.int64)
    gain_values = np.array([gains[d] for d in ranks], dtype=np.float64)
    ideal = np.sort(np.array(list(gains.values()), dtype=np.float64))[::-1]
    out: dict[str, float] = {}
    for name, kind, k in parsed:
        top = rel_ranks[rel_ranks <= k]  # ranks of relevant docs within the cut, ascending
        if kind == "mrr":
            value = 1.0 / top[0] if len(top) else 0.0
        elif kind == "recall":
            value = len(top) / num_rel if num_rel else 0.0
        elif kind == "precision":
            value = len(top) / k  # trec_eval divides by k even if fewer docs were retrieved
        elif kind == "map":
            value = float(np.sum(np.arange(1, len(top) + 1) / top)) / num_rel if num_rel else 0.0
        else:  # ndcg
            cut = gain_ranks <= k
            dcg = float(np.sum(gain_values[cut] / np.log2(gain_ranks[cut] + 1.0)))
            best = ideal[:k]
            idcg = float(np.sum(best / np.log2(np.arange(2, len(best) + 2))))
            value = dcg / idcg if idcg > 0 else 0.0
        out[name] = float(value)
    return out


def evaluate(qrels: Qrels, run: Run, metrics: Sequence[str] = METRICS) -> EvalResult:
    """Evaluate `run` against `qrels` with trec_eval semantics (see the module docstring).

    Every query with at least one judgment is evaluated; those missing from the run
    score 0. Raises ValueError on an unknown metric name, a NaN score, or when no query is
    judged; TypeError when `metrics` is a bare string.
    """
    if isinstance(metrics, str):
        raise TypeError(f"metrics must be a sequence of names, got the string {metrics!r}; wrap it in a list")
    parsed = [(name, *parse_metric(name)) for name in dict.fromkeys(metrics)]
    if not parsed:
        raise ValueError("metrics is empty; pass at least one name such as 'ndcg@10'")
    query_ids = [q for q, judged in qrels.items() if len(judged) > 0]
    if not query_ids:
        raise ValueError("qrels has no judged query; nothing to evaluate (check the split / qrels path)")
    empty: dict[str, float] = {}
    per_query = {q: _query_metrics(qrels[q], run.get(q, empty), parsed) for q in query_ids}
    aggregate = {
        name: math.fsum(v[name] for v in per_query.values()) / len(per_query) for name, _, _ in parsed
    }
    missing = sum(q not in run for q in query_ids)
    return EvalResult(
        aggregate=aggregate, per_query=per_query, num_queries=len(per_query), num_missing=missing
    )


_WHITESPACE = re.compile(r"\s")


def _check_tokens(values: Sequence[str], what: str) -> None:
    """Reject ids that would break the whitespace-separated TREC format (one C-level scan)."""
    if all(values) and not _WHITESPACE.search("".join(values)):
        return
    bad = next(v for v in values if not v or _WHITESPACE.search(v))
    raise ValueError(f"{what} {bad!r} is empty or contains whitespace; a TREC run line cannot hold it")


def write_trec_run(
    path: str | os.PathLike[str], run: Run, tag: str = "resume", depth: int | None = 1000
) -> None:
    """Write `run` as a 6-column TREC run (`qid Q0 docid rank score tag`), atomically.

    Each query keeps its top `depth` docs in trec_eval order (None keeps all). Scores
    are written with `repr`, so reading the file back gives the identical floats.
    """
    if depth is not None and depth < 1:
        raise ValueError(f"depth ({depth}) must be >= 1 or None (no cut)")
    _check_tokens([tag], "tag")
    _check_tokens(list(run), "query id")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for qid, doc_scores in run.items():
                ranked = rank_run(doc_scores, depth)
                _check_tokens([doc_id for doc_id, _ in ranked], f"doc id (query {qid!r})")
                f.write(
                    "".join(
                        f"{qid} Q0 {doc_id} {rank} {float(score)!r} {tag}\n"
                        for rank, (doc_id, score) in enumerate(ranked, start=1)
                    )
                )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the complete new one, never half
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_trec_run(path: str | os.PathLike[str]) -> Run:
    """Read a 6-column TREC run file into `{qid: {docid: score}}`.

    Blank lines are skipped; a malformed line or a repeated (qid, docid) pair raises
    ValueError naming the file and the 1-based line number.
    """
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 6:
                    raise ValueError(f"expected 6 columns 'qid Q0 docid rank score tag', got {len(fields)}")
                qid, _, doc_id, rank, score, _ = fields
                int(rank)  # validated only: trec_eval ranks by score, not by this column
                value = float(score)
                if math.isnan(value):
                    raise ValueError("score is NaN")
                docs = run.get(qid)
                if docs is None:
                    docs = run[qid] = {}
                elif doc_id in docs:
                    raise ValueError(f"doc {doc_id!r} appears twice for query {qid!r}")
                docs[doc_id] = value
            except ValueError as err:
                raise ValueError(f"{os.fspath(path)}:{lineno}: {err}; line: {line.rstrip()!r}") from None
    return run
