"""Retrieval evaluation: `evaluator.py` (encode the corpus view, index, search, score, write the run
file) and `metrics.py` (MRR@k, nDCG@k, R@k with trec_eval semantics, TREC run files)."""

from resume.evaluation.evaluator import Evaluator
from resume.evaluation.metrics import METRICS, evaluate

__all__ = ["METRICS", "Evaluator", "evaluate"]
