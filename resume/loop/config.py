"""The loop's configuration: iterations, early stopping, the selection split and the evaluation points.

Which rows a run evaluates, after which iteration, on which corpus view and split, is data
(`loop.eval_points` in `conf/`), so a new row is a YAML change and the loop never branches on
an experiment's or a row's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

VIEWS = ("documents", "summaries", "lead")  # lead: each document's first `lead_words` words
STAGES = ("summarized", "adapted")


@dataclass(frozen=True)
class EvalPoint:
    """One extra row evaluated on the way through Algorithm 1.

    `iteration` t and `stage` say when: `summarized` is after step 2 of iteration t (the corpus
    summarized by theta_t, the retriever still phi_{t-1}); `adapted` after step 3 (phi_t).
    Iteration 0 is the initial state (theta_0, phi_0; stage `summarized` only). `view` is what
    is indexed: the original `documents`, the `summaries` of theta_t, or the `lead` of each
    document (its first `loop.lead_words` words: the extractive control a summary must beat).
    `splits` empty means the run's evaluation splits.

    The paper's Table 1 from one run: `baseline` (t=0, documents), `fixed_summary` (t=0,
    summaries) and `non_iterative` (t=1, summarized: one GRPO round, original retriever).
    """

    row: str
    iteration: int = 0
    stage: str = "summarized"
    view: str = "summaries"
    splits: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"loop.eval_points row {self.row!r}"
        if not self.row:
            raise ValueError("loop.eval_points: every point needs a non-empty `row` name")
        if not isinstance(self.iteration, int) or self.iteration < 0:
            raise ValueError(f"{where}: iteration ({self.iteration}) must be an integer >= 0")
        if self.stage not in STAGES:
            raise ValueError(f"{where}: stage={self.stage!r} must be one of {STAGES}")
        if self.iteration == 0 and self.stage != "summarized":
            raise ValueError(
                f"{where}: iteration 0 is the initial state, which has no adaptation; use stage: summarized"
            )
        if self.view not in VIEWS:
            raise ValueError(f"{where}: view={self.view!r} must be one of {VIEWS}")
        object.__setattr__(self, "splits", tuple(self.splits))

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> EvalPoint:
        known = {"row", "iteration", "stage", "view", "splits"}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ValueError(
                f"loop.eval_points entry {dict(node)} has unknown keys {unknown}; "
                f"allowed keys are {sorted(known)}"
            )
        return cls(**{k: (tuple(v) if k == "splits" else v) for k, v in node.items()})


@dataclass
class LoopConfig:
    max_iterations: int = 0  # T; 0 = evaluate the initial models only (baseline, fixed summary)
    stop_on: str = "reward_mean"  # reward_mean, or <select_split>/<metric> (e.g. dev/mrr@10)
    epsilon: float = 0.0  # stop when the watched value improves by less than this
    min_iterations: int = 1  # never stop before this many iterations
    select_split: str | None = "dev"  # evaluated after every iteration (early stopping); None = never
    eval_points: Sequence[EvalPoint] = field(default_factory=tuple)
    adapt_view: str = "summaries"  # what step 3 pairs with the training queries: summaries | documents
    seed: int = 0  # every phase starts from seed-derived RNG states
    lead_words: int = 75  # the `lead` view: each document's first this many words (title included)

    def __post_init__(self) -> None:
        if self.max_iterations < 0:
            raise ValueError(f"loop.max_iterations={self.max_iterations} must be >= 0")
        if self.lead_words < 1:
            raise ValueError(f"loop.lead_words={self.lead_words} must be >= 1")
        if self.adapt_view not in VIEWS:
            raise ValueError(f"loop.adapt_view={self.adapt_view!r} must be one of {VIEWS}")
        self.eval_points = tuple(
            p if isinstance(p, EvalPoint) else EvalPoint.from_config(p) for p in self.eval_points
        )
        if self.stop_on != "reward_mean":
            split, _, metric = self.stop_on.partition("/")
            if not metric or split != self.select_split:
                raise ValueError(
                    f"loop.stop_on={self.stop_on!r} must be reward_mean or <select_split>/<metric> with "
                    f"select_split={self.select_split!r}, e.g. {self.select_split or 'dev'}/mrr@10"
                )

    @property
    def stop_metric(self) -> str | None:
        """The metric watched on the selection split, or None when the reward is watched."""
        return None if self.stop_on == "reward_mean" else self.stop_on.split("/", 1)[1]
