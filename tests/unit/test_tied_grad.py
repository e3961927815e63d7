"""The tied embedding's gradient accumulated in place (resume/grpo/tied_grad.py) equals autograd's."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from resume.grpo.logps import prefix_tree_logps
from resume.grpo.loss import grpo_loss
from resume.grpo.rollouts import pack_completions
from resume.grpo.tied_grad import tied_grad_in_place, tied_weight
from resume.summarizer.generate import Completion
from resume.utils.config import compose_node


@pytest.fixture()
def model() -> torch.nn.Module:
    cfg = OmegaConf.create({"seed": 0, "summarizer": compose_node("summarizer", ["summarizer=tiny"])})
    model = instantiate(cfg.summarizer).model.train()
    assert tied_weight(model) is not None  # conf/summarizer/tiny.yaml ties its embeddings, as SmolLM2
    return model


def _chunks(seed: int = 0) -> list:
    """Two micro-batches of GRPO groups (random ids, a padded completion among them)."""
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for prompt_len in (9, 5):
        prompt = torch.randint(5, 400, (prompt_len,), generator=gen).tolist()
        rows = [torch.randint(5, 400, (n,), generator=gen).tolist() for n in (6, 3, 6)]
        chunks.append(pack_completions([Completion("", r, prompt, True) for r in rows], pad_id=0))
    return chunks


def _backward(
    model: torch.nn.Module, in_place: bool, checkpointing: bool, bf16: bool = False
) -> tuple[dict, int]:
    """Gradients of a GRPO loss over two micro-batches (the forwards under bf16 autocast when `bf16`, as
    `grpo.config.autocast` runs them), and how many dense gradients autograd itself produced for the
    tied weight."""
    model.zero_grad(set_to_none=True)
    seen = []
    handle = tied_weight(model).register_hook(lambda g: seen.append(g) if g is not None else None)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(1)
    for packed in _chunks():
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=not checkpointing)
        with tied_grad_in_place(model) if in_place else torch.enable_grad() as engaged, amp:
            assert engaged is not False or not in_place
            logps, _ = prefix_tree_logps(model, packed, 0.7)
        advantages = torch.randn(logps.size(0), generator=gen)
        loss, _ = grpo_loss(
            logps, logps.detach() + 0.05, advantages, packed.completion_mask, loss_type="dapo"
        )
        loss.backward()
    handle.remove()
    if checkpointing:
        model.gradient_checkpointing_disable()
    assert all(tuple(g.shape) == tuple(tied_weight(model).shape) for g in seen)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, len(seen)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_in_place_gradient_equals_autograds_over_micro_batches(model, checkpointing):
    reference, dense_reference = _backward(model, in_place=False, checkpointing=checkpointing)
    ours, dense_ours = _backward(model, in_place=True, checkpointing=checkpointing)
    assert dense_reference == 2  # autograd: one dense [V, D] gradient per backward for the tied weight
    assert dense_ours == 0  # in place: none; both contributions went into .grad directly
    assert reference.keys() == ours.keys()
    for name, g in reference.items():
        gap = ((ours[name] - g).norm() / g.norm().clamp(min=1e-12)).item()
        assert gap < 1e-5, f"{name}: relative gradient difference {gap:.2e}"
    assert tied_weight(model).grad.abs().sum() > 0
    assert "forward" not in vars(model.get_input_embeddings())  # the modules' own forward is back


def test_the_padding_row_gets_no_gradient_as_in_f_embedding():
    """The lookup on its own, with a padding row: what `torch.nn.Embedding` gives, row for row."""
    from resume.grpo.tied_grad import _Lookup

    weight = torch.nn.Parameter(torch.randn(7, 3))
    ids = torch.tensor([[1, 0, 4], [4, 4, 0]])
    grad_out = torch.randn(2, 3, 3)
    (torch.nn.functional.embedding(ids, weight, padding_idx=0) * grad_out).sum().backward()
    expected = weight.grad.clone()
    weight.grad = None
    (_Lookup.apply(ids, weight, 0) * grad_out).sum().backward()
    torch.testing.assert_close(weight.grad, expected)
    assert weight.grad[0].abs().sum() == 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_under_bf16_autocast_the_in_place_gradient_is_autocasts(model, checkpointing):
    """Under autocast the projection runs in bf16 as `F.linear` does, its weight gradient accumulated in
    fp32 (autograd's is a bf16 product): the two agree to bf16's resolution, and both differ from fp32's
    (the forward did run in bf16). Measured, worst weight: 2.9e-4 relative to autograd's under autocast;
    both 0.25 from fp32's (this tiny model's init 1.0 saturates its softmaxes, which bf16 moves)."""
    fp32, _ = _backward(model, in_place=False, checkpointing=checkpointing)
    reference, dense_reference = _backward(model, in_place=False, checkpointing=checkpointing, bf16=True)
    ours, dense_ours = _backward(model, in_place=True, checkpointing=checkpointing, bf16=True)
    assert (dense_reference, dense_ours) == (2, 0)
    assert all(g.dtype == torch.float32 for g in ours.values())  # fp32 gradients of fp32 master weights
    gaps = {n: ((ours[n] - g).norm() / g.norm().clamp(min=1e-12)).item() for n, g in reference.items()}
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] < 5e-3, f"{worst}: relative gradient difference {gaps[worst]:.2e}"
    moved = max(((reference[n] - g).norm() / g.norm().clamp(min=1e-12)).item() for n, g in fp32.items())
    assert moved > 1e-4  # bf16 changed the gradient: the comparison above was made in bf16


def test_untied_and_frozen_models_are_left_alone(model):
    weight = tied_weight(model)
    weight.requires_grad_(False)
    with tied_grad_in_place(model) as engaged:
        assert engaged is False
    weight.requires_grad_(True)
    model.lm_head.weight = torch.nn.Parameter(weight.detach().clone())  # untie
    assert tied_weight(model) is None
    with tied_grad_in_place(model) as engaged:
        assert engaged is False
