"""`weights_version`, the key every generation engine re-reads the trained weights on: it must change
after any optimizer step, fused kernels included (they bump no version counter), and after nothing
else."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from resume.summarizer.generate import mark_weights_written, weights_version
from resume.summarizer.hf_backend import HFBackend


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("fused", [False, True])
def test_every_optimizer_step_changes_the_version_and_nothing_else_does(fused):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    v0 = weights_version(model)
    assert weights_version(model) == v0  # reading it changes nothing
    model(torch.randn(2, 4)).sum()  # a forward writes no weight
    assert weights_version(model) == v0
    step(model, optimizer)
    v1 = weights_version(model)
    assert v1 != v0
    step(model, optimizer)
    v2 = weights_version(model)
    assert v2 not in (v0, v1)
    other = torch.nn.Linear(4, 3)
    step(other, torch.optim.AdamW(other.parameters(), fused=fused))  # another model's step
    assert weights_version(model) == v2


def test_a_write_through_data_is_seen_once_marked():
    model = torch.nn.Linear(4, 3)
    v0 = weights_version(model)
    model.weight.data.copy_(torch.zeros(3, 4))  # .data has a version counter of its own
    assert weights_version(model) == v0
    mark_weights_written(model.parameters())
    assert weights_version(model) != v0


def test_fused_adamw_writes_bump_no_version_counter():
    """Why the optimizer steps are counted: if torch ever bumps them, the count is redundant, not wrong."""
    p = torch.nn.Parameter(torch.randn(3))
    before = p.detach().clone()
    p.grad = torch.ones(3)
    torch.optim.AdamW([p], fused=True).step()
    assert not torch.equal(p.detach(), before)
    assert p._version == 0


def test_hf_generation_copy_follows_a_fused_step():
    """HFBackend generating in bf16 from an fp32 model refreshes its copy after a fused AdamW step."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    backend = HFBackend(model, tokenizer=None, dtype="bf16")
    copy = backend._generation_model()
    assert copy is not model and next(copy.parameters()).dtype == torch.bfloat16
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    step(model, optimizer)
    refreshed = backend._generation_model()
    weight = model.model.embed_tokens.weight.detach().to(torch.bfloat16)
    assert torch.equal(refreshed.model.embed_tokens.weight, weight)
