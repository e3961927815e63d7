"""Algorithm 1: `config.py` (LoopConfig, the evaluation points), `algorithm.py` (Loop, the only place
that knows both models exist), `phases.py` (the GRPO, summarize and adapt phases built from config),
`records.py` (one record per finished phase, so a killed run resumes)."""

from resume.loop.algorithm import Loop
from resume.loop.config import EvalPoint, LoopConfig
from resume.loop.phases import make_adapt, make_grpo, make_summarize
from resume.loop.records import PhaseRecords

__all__ = ["EvalPoint", "Loop", "LoopConfig", "PhaseRecords", "make_adapt", "make_grpo", "make_summarize"]
