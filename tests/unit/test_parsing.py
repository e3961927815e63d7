"""Splitting completions at the `</think>` separator."""

import pytest

from resume.summarizer.parsing import SEPARATOR, ParsedCompletion, parse_completion


def test_separator_is_the_closing_think_tag():
    assert SEPARATOR == "</think>"


def test_summary_follows_the_separator_and_is_stripped():
    parsed = parse_completion("Let me think.\n</think>\n\n  PBC is a liver disease.  \n")
    assert parsed == ParsedCompletion(
        reasoning="Let me think.\n", summary="PBC is a liver disease.", has_separator=True
    )


def test_missing_separator_gives_no_summary():
    text = "<think> I ran out of tokens while reasoning"
    parsed = parse_completion(text)
    assert parsed.summary is None
    assert not parsed.has_separator
    assert parsed.reasoning == text


def test_opening_tag_alone_is_not_the_separator():
    assert not parse_completion("<think> summary text").has_separator


def test_last_separator_wins():
    parsed = parse_completion("a</think>draft</think> final summary")
    assert parsed.summary == "final summary"
    assert parsed.reasoning == "a</think>draft"


def test_empty_summary_is_present_but_empty():
    parsed = parse_completion("reasoning</think>   \n")
    assert parsed.has_separator
    assert parsed.summary == ""


def test_separator_only():
    assert parse_completion("</think>") == ParsedCompletion(reasoning="", summary="", has_separator=True)


def test_custom_separator():
    parsed = parse_completion("r [SUMMARY] s", separator="[SUMMARY]")
    assert parsed.summary == "s"
    assert parse_completion("r </think> s", separator="[SUMMARY]").summary is None


def test_empty_separator_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        parse_completion("text", separator="")


def test_parsed_completion_is_frozen():
    parsed = parse_completion("a</think>b")
    with pytest.raises(AttributeError):
        parsed.summary = "c"  # type: ignore[misc]
