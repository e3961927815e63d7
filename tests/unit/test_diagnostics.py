"""Repetition and query-overlap diagnostics."""

import math

import pytest

from resume.rewards.diagnostics import (
    STOPWORDS,
    content_words,
    query_overlap,
    repetition_score,
    summary_stats,
    words,
)

# Table 4 of the paper: the generated summary ends by restating its first sentence.
PAPER_SUMMARY = (
    "Primary biliary cirrhosis (PBC) is a chronic liver disease that slowly destroys medium-sized bile "
    "ducts within the liver. In PBC, bile ducts are destroyed by inflammation, causing bile to accumulate "
    "in the liver. This bile accumulation leads to gradual liver cell injury and cirrhosis, or scarring of "
    "the liver. Bile is a digestive liquid produced by the liver that normally travels through bile ducts "
    "to the small intestine to aid fat and fatty vitamin digestion. PBC causes progressive liver scarring "
    "as cirrhosis advances. Primary biliary cirrhosis is a chronic liver disease.x"
)


def test_words_lowercase_and_split_punctuation():
    assert words("The PBC's ducts, medium-sized!") == ["the", "pbc's", "ducts", "medium", "sized"]


@pytest.mark.parametrize("text", ["", "one", "two words"])
def test_repetition_of_texts_shorter_than_n_is_zero(text):
    assert repetition_score(text, n=3) == 0.0


def test_repetition_without_repeats_is_zero():
    assert repetition_score("the cat sat on the mat") == 0.0


def test_repetition_of_a_sentence_written_twice():
    # 12 words, 10 trigrams; the 4 trigrams of the second copy repeat the first copy's,
    # the 2 bridging trigrams ("the mat the", "mat the cat") are new.
    assert repetition_score("The cat sat on the mat. The cat sat on the mat.") == pytest.approx(4 / 10)


def test_repetition_unigrams():
    assert repetition_score("a b a b a", n=1) == pytest.approx(3 / 5)


def test_repetition_flags_the_paper_summary():
    clean = PAPER_SUMMARY.rsplit(" Primary biliary", 1)[0]
    assert repetition_score(clean) < 0.02
    assert repetition_score(PAPER_SUMMARY) > 0.03
    assert repetition_score(PAPER_SUMMARY) > repetition_score(clean) + 0.03


def test_repetition_rejects_bad_n():
    with pytest.raises(ValueError, match="n"):
        repetition_score("a b c", n=0)


def test_content_words_drop_stopwords():
    assert {"what", "is", "the", "of"} <= STOPWORDS
    assert content_words(["What is the cause of PBC?"]) == {"cause", "pbc"}


def test_query_overlap_hand_computed():
    queries = ["what is primary biliary cirrhosis", "PBC symptoms"]
    # content words: primary, biliary, cirrhosis, pbc, symptoms -> 4 of 5 in the summary
    assert query_overlap("Primary biliary cirrhosis (PBC) destroys bile ducts.", queries) == pytest.approx(
        4 / 5
    )
    assert query_overlap("Bile ducts are destroyed.", queries) == 0.0
    assert query_overlap("primary biliary cirrhosis pbc symptoms", queries) == 1.0


def test_query_overlap_without_content_words_is_zero():
    assert query_overlap("anything", []) == 0.0
    assert query_overlap("anything", ["what is the"]) == 0.0


def test_summary_stats():
    stats = summary_stats(["a b c a b c", "", "one two"])
    assert stats["count"] == 3.0
    assert stats["words_mean"] == pytest.approx(8 / 3)
    assert stats["empty_rate"] == pytest.approx(1 / 3)
    assert stats["repetition_mean"] == pytest.approx((1 / 4) / 3)  # abc bca cab abc: 1 repeat of 4
    assert all(math.isnan(v) for k, v in summary_stats([]).items() if k != "count")
