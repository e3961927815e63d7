"""GRPO of the summarizer: `config.py` (GRPOConfig), `advantages.py` (group-relative advantages),
`loss.py` (clipped surrogate, KL, off-policy weights, TRL's normalisations), `logps.py` (completion
log-probs), `rollouts.py` (documents per step, packing), `module.py` (GRPOModule, one step),
`callbacks.py`, `history.py` (stats, curves, samples), `lora.py`, `trainer.py` (run_grpo)."""

from resume.grpo.config import GRPOConfig
from resume.grpo.trainer import run_grpo

__all__ = ["GRPOConfig", "run_grpo"]
