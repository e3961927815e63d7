"""The ReSuMe reward: `structure.py` (length and format), `retscore.py` (RetScore, r_phi),
`retrieval.py` (`RetrievalReward`, the object GRPO calls), `batch.py` (its per-completion
terms), `diagnostics.py` (repetition and query-overlap watches for reward hacking)."""

from resume.rewards.batch import RewardBatch
from resume.rewards.retrieval import RetrievalReward
from resume.rewards.retscore import DEFAULT_EDGES, DEFAULT_VALUES, bucket_index, discretize, ret_score
from resume.rewards.structure import StructureConfig, structure_reward

__all__ = [
    "DEFAULT_EDGES",
    "DEFAULT_VALUES",
    "RetrievalReward",
    "RewardBatch",
    "StructureConfig",
    "bucket_index",
    "discretize",
    "ret_score",
    "structure_reward",
]
