"""Completion log-probs from the last hidden states, a few rows of logits at a time
(`grpo.config.chunked_head`).

The log-prob of a sampled token needs one row of `[V]` logits; materialising them for every completion
token of a micro-batch (4 x 64 x 49,152 floats = 50 MB for SmolLM2 at the default budget) and keeping
them for the backward, whose log-softmax gradient builds a few more such tensors, made ~0.15 GB of the
GRPO update's peak in the forward and again in the backward. Here the projection, the log-softmax and
its gradient run `chunk_rows` rows at a time: the forward keeps only each row's log-sum-exp, and the
backward recomputes a chunk's logits from the saved hidden states (one more `[rows, D] x [D, V]`
product, ~5% of the update's time here). Same log-probs and gradients up to float rounding (tested).

It is exact only where the model's logits are `lm_head(last hidden state)` with nothing after
(soft-capping, logit scales): `plain_head` checks that once per model on a few tokens, and the caller
keeps HF's own logits otherwise.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from resume.grpo.tied_grad import accumulates_in_place, add_product_to_grad, compute_dtype

_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


class _HeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, rows: int
    ) -> tuple[Tensor, Tensor]:
        logps = hidden.new_empty(hidden.size(0), dtype=torch.float32)
        entropies, lse = torch.empty_like(logps), torch.empty_like(logps)
        dtype = compute_dtype(hidden)  # under autocast its dtype, cast here: the cast outlives no chunk
        # in bf16 (fp16) a short last chunk is padded to `rows`: one matmul shape, not one per length
        # (oneDNN caches CPU kernels per shape)
        pad = rows if dtype != torch.float32 else 0
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for i in range(0, hidden.size(0), rows):
                logits = _logits(hidden[i : i + rows], w, temperature, pad)
                lse[i : i + rows] = torch.logsumexp(logits, dim=-1)
                logps[i : i + rows] = logits.gather(-1, targets[i : i + rows, None])[:, 0] - lse[i : i + rows]
                probs = torch.softmax(logits, dim=-1)
                entropies[i : i + rows] = lse[i : i + rows] - (probs * logits).sum(-1)
        ctx.save_for_backward(hidden, targets, lse)
        ctx.weight, ctx.temperature, ctx.rows, ctx.dtype, ctx.pad = weight, temperature, rows, dtype, pad
        ctx.in_place = accumulates_in_place(weight)
        ctx.mark_non_differentiable(entropies)
        return logps, entropies

    @staticmethod
    def backward(ctx: Any, grad_logps: Tensor, _grad_entropies: Tensor) -> tuple[Tensor | None, ...]:
        with torch.autocast(grad_logps.device.type, enabled=False):  # the dtypes are the forward's
            return _HeadLogps._backward(ctx, grad_logps)

    @staticmethod
    def _backward(ctx: Any, grad_logps: Tensor) -> tuple[Tensor | None, ...]:
        hidden, targets, lse = ctx.saved_tensors
        weight: Tensor = ctx.weight
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        # autograd's gradient for the weight, unless it goes straight into .grad (tied_grad_in_place)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] and not ctx.in_place else None
        w = weight.to(ctx.dtype)  # the forward's logits again, in the forward's dtype
        for i in range(0, hidden.size(0), ctx.rows):
            h = hidden[i : i + ctx.rows]
            # d logp / d logits = onehot(target) - softmax, times the incoming gradient, / temperature
            g = torch.exp(_logits(h, w, ctx.temperature, ctx.pad) - lse[i : i + ctx.rows, None])
            g.mul_(-grad_logps[i : i + ctx.rows, None])
            g.scatter_add_(-1, targets[i : i + ctx.rows, None], grad_logps[i : i + ctx.rows, None])
            g.div_(ctx.temperature)
            g = g.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[i : i + ctx.rows] = _matmul(g.to(w.dtype), w, ctx.pad).to(hidden.dtype)
            if ctx.in_place:
                add_product_to_grad(weight, g.t(), h)
            elif grad_weight is not None:
                grad_weight.addmm_(g.t().to(grad_weight.dtype), h.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None


def _logits(hidden: Tensor, weight: Tensor, temperature: float, pad: int = 0) -> Tensor:
    """fp32 logits of `hidden` computed in `weight`'s dtype (as `pad` rows when it has fewer)."""
    logits = _matmul(hidden.to(weight.dtype), weight.t(), pad).float()
    return logits if temperature == 1.0 else logits.div_(temperature)


def _matmul(a: Tensor, b: Tensor, pad: int = 0) -> Tensor:
    """`a @ b`, run with `a` zero-padded to `pad` rows when it has fewer (the extra rows dropped)."""
    n = a.size(0)
    if n >= pad:
        return a @ b
    return (torch.cat([a, a.new_zeros(pad - n, a.size(1))]) @ b)[:n]


def head_logps(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, chunk_rows: int = 64
) -> tuple[Tensor, Tensor]:
    """`(logps, entropies)` of `targets` (`[...]`) under `softmax(hidden @ weight.T / temperature)`, with
    `hidden` `[..., D]`; entropies carry no gradient. Both fp32, shaped like `targets`."""
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    shape = targets.shape
    logps, entropies = _HeadLogps.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), float(temperature), chunk_rows
    )
    return logps.view(shape), entropies.view(shape)


def plain_head(model: torch.nn.Module) -> bool:
    """Whether `model`'s logits are its output embedding applied to its decoder's last hidden state, as
    `head_logps` assumes (checked once per model on eight tokens: not so for soft-capped or scaled logits)."""
    if model in _CHECKED:
        return _CHECKED[model]
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    plain = False
    head = get_head() if get_head is not None else None
    if get_decoder is not None and isinstance(head, torch.nn.Linear) and head.bias is None:
        device = head.weight.device
        ids = torch.arange(8, device=device)[None] % head.weight.size(0)
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # fp32 on both sides
            full = model(input_ids=ids, use_cache=False).logits.float()
            ours = _logits(get_decoder()(input_ids=ids, use_cache=False).last_hidden_state, head.weight, 1.0)
        model.train(was_training)
        scale = float(full.abs().max().clamp(min=1.0))
        plain = bool(torch.allclose(full, ours, rtol=1e-4, atol=1e-4 * scale))
    _CHECKED[model] = plain
    return plain
