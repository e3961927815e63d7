"""Summaries of the whole corpus: `cache.py` (the crash-safe, sharded JSONL cache keyed by the
summarizer's weights and settings), `corpus.py` (the cached corpus pass and its per-rank shards;
`python -m resume.summarize_corpus` is its command), `stats.py` (what a pass produced)."""

from resume.summaries.cache import SummaryCache, SummaryCacheError, doc_hash
from resume.summaries.corpus import SummaryResult, summarize_corpus, summarize_shard
from resume.summaries.stats import summary_stats

__all__ = [
    "SummaryCache",
    "SummaryCacheError",
    "SummaryResult",
    "doc_hash",
    "summarize_corpus",
    "summarize_shard",
    "summary_stats",
]
