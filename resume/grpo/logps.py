"""Completion log-probs with each prompt run once for its whole group (`grpo.config.shared_prompt`).

The `k` completions of a GRPO group share one prompt (~750 of SmolLM2's ~820 tokens per row at the
default budget). The packed path (`loss.sequence_logps`) runs prompt + completion for every row, so
the prompt's forward and backward are paid `k` times. Here the prompt runs once, its KV cache is
repeated for the `k` rows, and the completions run on top of it. Attention is causal, so every
completion token sees exactly the keys and values it sees in the packed layout, and gradients flow
back through the cache into the one prompt pass, where the `k` rows' contributions add up: the same
log-probs and the same gradient, up to float rounding (tested), for about `(P + kC) / (k (P + C))`
of the tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from resume.grpo.rollouts import PackedBatch


def shared_prompt_logps(
    model: torch.nn.Module, packed: PackedBatch, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """`(logps, entropies)`, both `[B, C]` over `packed`'s completion columns, as `loss.sequence_logps`
    returns them (padding 0, entropies detached), computed one prompt segment at a time."""
    from transformers import DynamicCache

    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    if not packed.prompt_segments:
        raise ValueError("the packed batch has no prompt segments; build it with pack_completions")
    device = next(model.parameters()).device
    width = packed.width
    completion_ids = packed.input_ids[:, -width:].to(device)
    completion_mask = packed.completion_mask.to(device)
    all_logps, all_entropies = [], []
    for prompt, rows in packed.prompt_segments:
        ids, mask = completion_ids[rows], completion_mask[rows]
        k, length = ids.shape
        cache = DynamicCache(config=model.config)
        first = model(
            input_ids=prompt.to(device)[None], past_key_values=cache, use_cache=True, logits_to_keep=1
        ).logits  # [1, 1, V]: predicts each row's first completion token
        logits = first.expand(k, 1, first.size(-1))
        if length > 1:
            cache.batch_repeat_interleave(k)
            p = prompt.numel()
            attention = torch.cat([torch.ones((k, p), dtype=mask.dtype, device=device), mask[:, :-1]], dim=1)
            positions = torch.arange(p, p + length - 1, device=device).expand(k, -1)
            rest = model(
                input_ids=ids[:, :-1],
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).logits  # [k, C - 1, V]
            logits = torch.cat([logits, rest], dim=1)
        logits = logits / temperature
        logps = selective_log_softmax(logits, ids)
        with torch.no_grad():
            entropies = entropy_from_logits(logits)
        padding = mask == 0
        all_logps.append(logps.masked_fill(padding, 0.0))
        all_entropies.append(entropies.masked_fill(padding, 0.0))
    return torch.cat(all_logps, dim=0), torch.cat(all_entropies, dim=0)
