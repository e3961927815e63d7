"""The tied embedding's gradient accumulated in place (`grpo.config.tied_grad_in_place`).

SmolLM2 (like most small LMs) ties its output projection to its input embedding: one `[V, D]` matrix,
49,152 x 576 floats = 113 MB. Autograd gives it two dense `[V, D]` gradients per backward, one from
the logits (`grad_logits^T @ hidden`) and one from the lookup (a scatter into zeros), holds the first
until the second arrives, adds them, and only then adds the sum into `.grad`: up to two 113 MB
temporaries alive at the end of every backward, which was the default run's memory peak
(experiments/bench/RESULTS.md). Here both contributions go straight into `.grad`: the projection's as
one in-place `addmm_`, the lookup's as an `index_add_` of the looked-up rows only. Same gradient up to
float summation order (tested), no `[V, D]` temporary.

It writes `.grad` itself, around autograd's accumulation, so it is only for one process holding whole
weights: DDP's and FSDP's hooks (and DeepSpeed's partitioned gradients) never see it. `GRPOModule`
enables it on a single-device strategy only, and only where the weight is tied and trainable; anywhere
else the modules' own forward runs. Under autocast the projection runs in the autocast dtype, as
`F.linear` would (the weight cast inside the function, so no autocast cache keeps the cast), and its
weight gradient is accumulated in the weight's own dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_IN_PLACE: set[int] = set()  # ids of the weights whose gradient is accumulated in place right now


def accumulates_in_place(weight: Tensor) -> bool:
    """Whether a forward run now should put `weight`'s gradient straight into `.grad` (inside
    `tied_grad_in_place` of its model), as `head_logps` does for the projection."""
    return id(weight) in _IN_PLACE


def add_product_to_grad(weight: Tensor, a: Tensor, b: Tensor) -> None:
    """`weight.grad += a @ b`, the product written into `.grad` itself once it exists (`addmm_`): no
    `[V, D]` temporary. The first contribution becomes `.grad`, as autograd's accumulation does."""
    if weight.grad is None:
        weight.grad = a.to(weight.dtype) @ b.to(weight.dtype)
    else:
        weight.grad.addmm_(a.to(weight.grad.dtype), b.to(weight.grad.dtype))


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype a matmul on `tensor` runs in here: the autocast dtype when autocast is on for its
    device, else its own."""
    kind = tensor.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else tensor.dtype


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, padding_idx: int | None) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, None, None]:
        (ids,) = ctx.saved_tensors
        weight: Tensor = ctx.weight
        ids, rows = ids.reshape(-1), grad_out.reshape(-1, grad_out.size(-1)).to(weight.dtype)
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as in F.embedding
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, ids, rows)
        return None, None, None


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(hidden)
        ctx.weight, ctx.dtype = weight, compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.to(ctx.dtype), weight.to(ctx.dtype))

    @staticmethod
    def backward(ctx: Any, grad_logits: Tensor) -> tuple[Tensor | None, None]:
        (hidden,) = ctx.saved_tensors
        weight: Tensor = ctx.weight
        grad_hidden = None
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are the forward's
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad_logits.to(ctx.dtype) @ weight.to(ctx.dtype)).to(hidden.dtype)
            g = grad_logits.reshape(-1, grad_logits.size(-1))
            add_product_to_grad(weight, g.t(), hidden.reshape(-1, hidden.size(-1)))
        return grad_hidden, None


def tied_weight(model: torch.nn.Module) -> Tensor | None:
    """The input embedding's weight when the output projection is the same tensor and both are plain
    (no bias, no max_norm, no sparse or frequency-scaled gradient); else None."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    embedding, projection = get_in(), get_out()
    if not isinstance(embedding, torch.nn.Embedding) or not isinstance(projection, torch.nn.Linear):
        return None
    if type(embedding).forward is not torch.nn.Embedding.forward or type(projection).forward is not (
        torch.nn.Linear.forward
    ):
        return None  # a subclass (scaled embeddings, a LoRA layer) computes something else
    if projection.weight is not embedding.weight or projection.bias is not None:
        return None
    if embedding.max_norm is not None or embedding.sparse or embedding.scale_grad_by_freq:
        return None
    return embedding.weight


@contextlib.contextmanager
def tied_grad_in_place(model: torch.nn.Module) -> Iterator[bool]:
    """Within the block, the model's tied embedding and projection (see `tied_weight`) run the functions
    above, so the backward of what the block computes accumulates their gradient in place. Yields
    whether it did: False (and nothing changed) for an untied or frozen model."""
    weight = tied_weight(model)
    if weight is None or not weight.requires_grad:
        yield False
        return
    embedding, projection = model.get_input_embeddings(), model.get_output_embeddings()
    embedding.forward = lambda ids: _Lookup.apply(ids, embedding.weight, embedding.padding_idx)
    projection.forward = lambda hidden: _Project.apply(hidden, projection.weight)
    _IN_PLACE.add(id(weight))
    try:
        yield True
    finally:
        _IN_PLACE.discard(id(weight))
        del embedding.forward, projection.forward
