"""Split a summarizer completion into its reasoning and its summary.

Qwen3 "thinking" chat templates put the opening `<think>` in the prompt, so a completion
reads `reasoning </think> summary`. The summary is what follows the LAST separator: a
model that writes `</think>` twice has thought twice, and only its final answer is
indexed (the reasoning must never leak into the retrieved representation).
"""

from __future__ import annotations

from dataclasses import dataclass

SEPARATOR = "</think>"


@dataclass(frozen=True)
class ParsedCompletion:
    """One completion, split at the separator.

    `summary` is None when the separator is absent (the completion is then all
    reasoning and earns the structure penalty); it is `""` when the separator closes
    the completion (a well-formed but empty, hence under-length, summary).
    """

    reasoning: str
    summary: str | None
    has_separator: bool


def parse_completion(text: str, separator: str = SEPARATOR) -> ParsedCompletion:
    """Split `text` at the last occurrence of `separator`; the summary is stripped."""
    if not separator:
        raise ValueError("separator must be a non-empty string, e.g. '</think>'")
    head, found, tail = text.rpartition(separator)
    if not found:
        return ParsedCompletion(reasoning=text, summary=None, has_separator=False)
    return ParsedCompletion(reasoning=head, summary=tail.strip(), has_separator=True)
