"""Cheap text diagnostics logged beside the reward.

The reward only sees retrieval scores and a token count, so two failure modes stay
invisible in it: repeating a sentence to pad the length window (the paper's own Table 4
summary ends by restating its first sentence) and stuffing the summary with the words of
the training queries. These functions watch for both. Pure python, no tokenizer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

# A small closed-class list: enough to keep "what is the ..." from counting as overlap.
_STOPWORDS_TEXT = """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not now of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your
    yours yourself yourselves s t don doesn isn aren wasn weren
"""
STOPWORDS: frozenset[str] = frozenset(_STOPWORDS_TEXT.split())


def words(text: str) -> list[str]:
    """Lowercased word tokens (letters and digits, with an optional 's-style suffix)."""
    return _WORD_RE.findall(text.lower())


def repetition_score(text: str, n: int = 3) -> float:
    """Fraction of the word `n`-grams of `text` that repeat an earlier `n`-gram of it.

    0.0 for a text without repeats or with fewer than `n` words; a text made of one
    sentence written twice scores about 0.5.
    """
    if n < 1:
        raise ValueError(f"n ({n}) must be >= 1")
    tokens = words(text)
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for i in range(total):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            repeats += 1
        else:
            seen.add(gram)
    return repeats / total


def content_words(texts: Iterable[str]) -> set[str]:
    """Distinct non-stopword words of `texts`."""
    return {w for text in texts for w in words(text) if w not in STOPWORDS}


def query_overlap(summary: str, queries: Sequence[str]) -> float:
    """Fraction of the queries' distinct content words that occur in `summary`.

    A keyword-stuffing watch: a summary that copies its training queries scores near 1.
    0.0 when the queries have no content words.
    """
    targets = content_words(queries)
    if not targets:
        return 0.0
    present = set(words(summary))
    return len(targets & present) / len(targets)


def summary_stats(summaries: Sequence[str], n: int = 3) -> dict[str, float]:
    """Corpus-level statistics of a set of summaries (e.g. a cached summary corpus).

    Keys: `count`, `words_mean`, `empty_rate`, `repetition_mean`. Means are NaN for an
    empty input.
    """
    count = len(summaries)
    if count == 0:
        return {"count": 0.0, "words_mean": math.nan, "empty_rate": math.nan, "repetition_mean": math.nan}
    lengths = [len(words(s)) for s in summaries]
    return {
        "count": float(count),
        "words_mean": sum(lengths) / count,
        "empty_rate": sum(length == 0 for length in lengths) / count,
        "repetition_mean": sum(repetition_score(s, n) for s in summaries) / count,
    }
