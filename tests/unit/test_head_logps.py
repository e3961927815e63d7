"""Completion log-probs a few rows of logits at a time (resume/grpo/head_logps.py) equal the whole-logits
path: values, entropies and gradients, with and without the tied weight's in-place accumulation."""

from __future__ import annotations

import types

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from resume.grpo.head_logps import head_logps, plain_head
from resume.grpo.tied_grad import tied_grad_in_place
from resume.utils.config import compose_node


def _inputs(seed: int = 0, rows: int = 2, cols: int = 37, dim: int = 16, vocab: int = 101):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, cols, dim, generator=gen, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen))
    targets = torch.randint(vocab, (rows, cols), generator=gen)
    upstream = torch.randn(rows, cols, generator=gen)
    return hidden, weight, targets, upstream


@pytest.mark.parametrize(("temperature", "chunk_rows"), [(1.0, 8), (0.7, 5), (1.3, 1000)])
def test_head_logps_equal_the_whole_logits_path(temperature, chunk_rows):
    hidden, weight, targets, upstream = _inputs()
    logits = (hidden @ weight.t()) / temperature
    expected = selective_log_softmax(logits, targets)
    expected_entropy = entropy_from_logits(logits.detach())
    (expected * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None

    logps, entropies = head_logps(hidden, weight, targets, temperature, chunk_rows=chunk_rows)
    assert not entropies.requires_grad
    (logps * upstream).sum().backward()
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropies, expected_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, grads[1], rtol=1e-5, atol=1e-5)


def test_inside_tied_grad_in_place_the_weight_gradient_goes_straight_into_grad():
    hidden, weight, targets, upstream = _inputs(seed=1)
    (selective_log_softmax(hidden @ weight.t(), targets) * upstream).sum().backward()
    expected = weight.grad.clone()
    weight.grad = torch.ones_like(weight)  # accumulates onto what is there, as autograd does

    seen = []
    weight.register_hook(lambda g: seen.append(g) if g is not None else None)
    model = types.SimpleNamespace()  # tied_grad_in_place only needs the tied pair
    embedding = torch.nn.Embedding(*weight.shape)
    embedding.weight = weight
    projection = torch.nn.Linear(weight.size(1), weight.size(0), bias=False)
    projection.weight = weight
    model.get_input_embeddings, model.get_output_embeddings = (lambda: embedding), (lambda: projection)
    with tied_grad_in_place(model) as engaged:
        assert engaged
        logps, _ = head_logps(hidden, weight, targets, chunk_rows=7)
    (logps * upstream).sum().backward()
    assert seen == []  # autograd produced no dense gradient for the weight
    torch.testing.assert_close(weight.grad, expected + 1, rtol=1e-5, atol=1e-5)


def test_plain_head_tells_models_whose_logits_are_the_projection_of_the_last_hidden_state():
    cfg = OmegaConf.create({"seed": 0, "summarizer": compose_node("summarizer", ["summarizer=tiny"])})
    model = instantiate(cfg.summarizer).model
    assert plain_head(model)

    class Scaled(torch.nn.Module):  # soft-capped / scaled logits: not the projection alone
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def get_decoder(self) -> torch.nn.Module:
            return self.inner.get_decoder()

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.inner.get_output_embeddings()

        def forward(self, **kwargs):
            return types.SimpleNamespace(logits=2.0 * self.inner(**kwargs).logits)

    assert not plain_head(Scaled(model))
    assert not plain_head(torch.nn.Linear(2, 2))  # no decoder at all


def test_under_bf16_autocast_the_head_runs_in_bf16_with_fp32_gradients():
    """Under autocast (`grpo.config.autocast`) the chunked head computes the logits in bf16, as autograd's
    own `hidden @ weight.T` does there, and returns fp32 log-probs and fp32 gradients close to those."""
    hidden, weight, targets, upstream = _inputs(seed=2)
    exact = selective_log_softmax(hidden @ weight.t(), targets).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = selective_log_softmax((hidden @ weight.t()).float(), targets)
    (expected * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None

    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        logps, _ = head_logps(hidden, weight, targets, chunk_rows=8)
    (logps * upstream).sum().backward()
    assert logps.dtype == hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)  # the same bf16 logits
    assert (logps - exact).abs().max() > 1e-3  # and not fp32's: the head did run in bf16
    for ours, theirs in zip((hidden.grad, weight.grad), grads):
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-2
