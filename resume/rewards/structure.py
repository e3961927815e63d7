"""StructureReward: the length-and-format term of the ReSuMe reward (METHOD.md).

A summary of 64..128 retriever tokens scores 1.0, a longer one 0.9, a shorter one 0.3, and a
completion without the `</think>` separator -1 (it has no summary to measure).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


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


def as_structure(structure: StructureConfig | Mapping[str, Any] | None) -> StructureConfig:
    if structure is None:
        return StructureConfig()
    if isinstance(structure, StructureConfig):
        return structure
    known = {f.name for f in fields(StructureConfig)}
    unknown = sorted(set(structure) - known)
    if unknown:
        raise ValueError(f"unknown reward.structure keys {unknown}; allowed keys are {sorted(known)}")
    return StructureConfig(**dict(structure))
