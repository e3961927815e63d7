"""`RewardBatch`: every term of the reward for a batch of completions, and its logged statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from resume.rewards.retscore import DEFAULT_VALUES


@dataclass
class RewardBatch:
    """Per-completion reward terms (all on CPU; float32 unless noted).

    Completions without the separator have `num_tokens` = -1, `bucket` = -1 and NaN for
    `delta`, `ret_score_summary`, `repetition` and `query_overlap` (the summary is never
    encoded); their `retrieval` term is the configured penalty (-1).
    """

    total: Tensor  # structure + retrieval
    structure: Tensor
    retrieval: Tensor  # r_phi(Delta), or Delta itself without discretization
    delta: Tensor
    ret_score_summary: Tensor
    ret_score_doc: Tensor
    num_tokens: Tensor  # long; retriever tokens of the summary
    has_separator: Tensor  # bool
    bucket: Tensor  # long; bucket of Delta in the discrete mapping
    repetition: Tensor  # diagnostics.repetition_score of the summary
    query_overlap: Tensor  # diagnostics.query_overlap of the summary with the doc's q+
    negative_qids: list[tuple[str, ...]]  # q- used for each completion (shared by a doc's group)
    num_buckets: int = len(DEFAULT_VALUES)

    def __len__(self) -> int:
        return self.total.shape[0]

    def log_dict(self, prefix: str) -> dict[str, float]:
        """Batch statistics under `prefix/` (NaN where a statistic has no completion to average).

        Length, Delta, RetScore(s) and diagnostics average over completions with a
        separator; `bucket_i` is the fraction of ALL completions in bucket i (the buckets
        plus `1 - separator_rate` sum to 1).
        """

        def mean(x: Tensor) -> float:
            return float(x.float().mean()) if x.numel() else math.nan

        valid = self.has_separator
        stats = {
            "reward_mean": mean(self.total),
            "reward_std": float(self.total.std(unbiased=False)) if len(self) else math.nan,
            "reward_min": float(self.total.min()) if len(self) else math.nan,
            "reward_max": float(self.total.max()) if len(self) else math.nan,
            "structure_mean": mean(self.structure),
            "retrieval_mean": mean(self.retrieval),
            "delta_mean": mean(self.delta[valid]),
            "ret_score_summary_mean": mean(self.ret_score_summary[valid]),
            "ret_score_doc_mean": mean(self.ret_score_doc),
            "separator_rate": mean(valid),
            "length_mean": mean(self.num_tokens[valid]),
            "repetition_mean": mean(self.repetition[valid]),
            "query_overlap_mean": mean(self.query_overlap[valid]),
        }
        for i in range(self.num_buckets):
            stats[f"bucket_{i}"] = mean(self.bucket == i)
        return {f"{prefix}/{key}": value for key, value in stats.items()}
