"""The toy lexicon: made-up words that the toy corpus and the tiny test tokenizers share.

It lives below both (`resume.data.toy` writes documents with it, `resume.utils.tiny` builds
vocabularies from it), so neither imports the other.
"""

from __future__ import annotations

import numpy as np

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
FILLER = [
    "the",
    "a",
    "of",
    "and",
    "in",
    "to",
    "is",
    "was",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "that",
    "it",
    "an",
    "are",
    "be",
]


def _words(rng: np.random.Generator, n: int, used: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4))))
        if w not in used:
            used.add(w)
            out.append(w)
    return out


def lexicon(seed: int = 0, n_words: int = 400) -> list[str]:
    """Words the toy generator may use (for building tiny tokenizers)."""
    return _words(np.random.default_rng(seed), n_words, set(FILLER)) + FILLER
