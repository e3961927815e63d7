"""LoRA for GRPO (`grpo.config.lora`): adapters injected into the policy's own modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def add_lora(policy: torch.nn.Module, spec: Mapping[str, Any]) -> Any:
    """Wrap `policy` in a peft model with adapters from `spec` ({r, alpha, dropout, target_modules}).

    Adapters are injected into `policy`'s own modules, so the summarizer's model (and its
    generation backend) runs the adapted policy with no change on their side; with adapters
    disabled the same modules are the frozen initial policy (the KL reference, at no memory cost).
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=int(spec.get("r", 8)),
        lora_alpha=int(spec.get("alpha", 16)),
        lora_dropout=float(spec.get("dropout", 0.0)),
        target_modules=spec.get("target_modules") or "all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(policy, lora)
