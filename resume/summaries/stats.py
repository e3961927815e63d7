"""What a corpus pass produced, in numbers that make invalid summaries visible."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from resume.summaries.corpus import SummaryResult


def summary_stats(result: SummaryResult, count_tokens: Callable[[str], int]) -> dict[str, Any]:
    """Statistics that make invalid summaries visible; lengths are in RETRIEVER tokens (`count_tokens`).

    `summary_tokens_*` cover documents with a separator (their summaries); `index_tokens_mean`
    covers every indexed text, fallbacks included.
    """
    n = len(result.records)
    recs = list(result.records.values())
    lengths = {d: count_tokens(t) for d, t in result.texts.items()}
    summary_lengths = np.array(
        [lengths[d] for d, r in result.records.items() if r["has_separator"]], dtype=float
    )
    n_fallback = len(result.fallback_ids)

    def q(p: float) -> float | None:
        return float(np.percentile(summary_lengths, p)) if summary_lengths.size else None

    stats: dict[str, Any] = {
        "n_docs": n,
        "separator_failure_rate": n_fallback / n if n else 0.0,
        "n_fallback": n_fallback,
        "fallback": result.fallback,
        "fallback_leaks_document": result.fallback == "document" and n_fallback > 0,
        "n_empty": sum(1 for t in result.texts.values() if not t.strip()),
        "summary_tokens_mean": float(summary_lengths.mean()) if summary_lengths.size else None,
        "summary_tokens_p50": q(50),
        "summary_tokens_p90": q(90),
        "summary_tokens_max": int(summary_lengths.max()) if summary_lengths.size else None,
        "index_tokens_mean": float(np.mean(list(lengths.values()))) if lengths else None,
        "generated_tokens_total": int(sum(r["num_generated_tokens"] for r in recs)),
        "generated_tokens_run": result.generated_tokens,
        "n_generated": result.n_generated,
        "cache_hits": result.n_cached,
        "seconds": result.seconds,
        "docs_per_s": result.n_generated / result.seconds if result.seconds > 0 else None,
        "tokens_per_s": result.generated_tokens / result.seconds if result.seconds > 0 else None,
    }
    if stats["fallback_leaks_document"]:
        stats["warning"] = (
            f"{n_fallback} of {n} documents are indexed as their ORIGINAL text (fallback=document): "
            "the summary index leaks the baseline representation"
        )
    return stats
