"""resume.grpo.tree_attention: the prefix tree's prompt queries attend causally without the mask, in
the forward and in the checkpointed recompute, for the same log-probs and gradients as SDPA's."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from resume.grpo import tree_attention
from resume.grpo.logps import prefix_tree_logps
from resume.grpo.rollouts import pack_completions
from resume.grpo.tree_attention import TREE_SDPA, use_tree_attention
from resume.summarizer.generate import Completion

LAYERS = 2


def _model(attn: str = "sdpa", arch: str = "llama") -> torch.nn.Module:
    """A tiny random Llama (SmolLM2's architecture) or Qwen3 (the paper's summarizer's)."""
    torch.manual_seed(0)
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    )
    config = config_cls(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        initializer_range=0.2,
    )
    return model_cls._from_config(config, attn_implementation=attn).train()


def _groups() -> list[Completion]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for prompt_len, k in ((23, 3), (9, 2)):
        prompt = torch.randint(3, 96, (prompt_len,), generator=gen).tolist()
        for _ in range(k):
            n = int(torch.randint(2, 8, (1,), generator=gen))
            out.append(Completion("", torch.randint(3, 96, (n,), generator=gen).tolist(), prompt, True))
    return out


def _logps_and_grads(model: torch.nn.Module, packed) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logps, _ = prefix_tree_logps(model, packed, 0.7)
    weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)
    (logps * weights * packed.completion_mask).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("arch", "checkpointing"), [("llama", False), ("llama", True), ("qwen3", True)])
def test_tree_attention_gives_sdpas_log_probs_and_gradients(arch, checkpointing, monkeypatch):
    model = _model(arch=arch)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    completions = _groups()
    for chunk in (completions, completions[1:4]):  # whole batch; a chunk that splits the first group
        packed = pack_completions(chunk, pad_id=0)
        reference = _logps_and_grads(model, packed)
        restore = use_tree_attention(model)
        assert restore is not None and model.config._attn_implementation == TREE_SDPA
        calls: list[tuple[int, bool]] = []  # (query length, causal without a mask) of each SDPA call
        real = tree_attention.sdpa_attention_forward

        def spy(module, query, key, value, mask, *args, calls=calls, real=real, **kwargs):
            calls.append((query.shape[2], mask is None and kwargs.get("is_causal") is True))
            return real(module, query, key, value, mask, *args, **kwargs)

        monkeypatch.setattr(tree_attention, "sdpa_attention_forward", spy)
        try:
            split = _logps_and_grads(model, packed)
        finally:
            monkeypatch.setattr(tree_attention, "sdpa_attention_forward", real)
            restore()
        assert model.config._attn_implementation == "sdpa"
        # every segment's prompt ran causally and unmasked in each layer: in the forward, and again in
        # the recompute under checkpointing
        prompts = [len(p) for p, _ in packed.prompt_segments]
        passes = 2 if checkpointing else 1
        assert sorted(q for q, causal in calls if causal) == sorted(prompts * LAYERS * passes)
        assert len(calls) == 2 * len(prompts) * LAYERS * passes
        torch.testing.assert_close(split[0], reference[0], rtol=1e-5, atol=1e-5)
        for name, grad in reference[1].items():
            torch.testing.assert_close(split[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
        assert any(g.abs().sum() > 0 for g in split[1].values())


def test_only_sdpa_models_switch_and_calls_without_a_prompt_length_are_sdpas():
    assert use_tree_attention(_model("eager")) is None
    model = _model().eval()
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        restore = use_tree_attention(model)
        during = model(ids).logits  # no tree_prompt_length: SDPA's own call
        restore()
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("attn", "tree", "bucket"), [("sdpa", True, 8), ("sdpa", False, 16), ("eager", False, 8)]
)
def test_a_padded_tree_gives_the_same_log_probs_and_gradients(attn, tree, bucket):
    """`bucket` pads the prompt block and the whole tree with tokens no real token attends to: the same
    log-probs and gradients as the unpadded tree (SDPA split by tree attention, SDPA, eager), under
    checkpointing, and the model does see the padded lengths."""
    model = _model(attn)
    if tree:
        assert use_tree_attention(model) is not None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = pack_completions(_groups(), pad_id=0)
    lengths = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[-1]))
    plain, plain_grads = _logps_and_grads(model, packed)
    width = packed.width - 1
    assert lengths == [23 + 3 * width, 9 + 2 * width]
    lengths.clear()
    model.zero_grad()
    logps, _ = prefix_tree_logps(model, packed, 0.7, bucket=bucket)
    weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)
    (logps * weights * packed.completion_mask).sum().backward()
    hook.remove()
    assert lengths and all(n % bucket == 0 for n in lengths)  # every tree padded to the bucket
    torch.testing.assert_close(logps, plain, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        gap = ((p.grad - plain_grads[name]).norm() / plain_grads[name].norm()).item()
        assert gap < 1e-5, f"{name}: relative gradient difference {gap:.1e}"  # measured <= 1.3e-6
