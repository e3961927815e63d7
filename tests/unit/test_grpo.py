"""GRPO maths: hand-computed values, and equality with TRL 1.16's `GRPOTrainer` on identical inputs.

The TRL comparison builds real trainers around a tiny random Qwen2 saved to a temporary folder
(TRL reloads the reference model from `config._name_or_path` when beta > 0) and a word-level
tokenizer built in memory: no network, no hub.
- Loss: `GRPOTrainer._compute_loss` normally runs the policy forward; we replace the instance's
  `_get_per_token_logps_and_entropies` so it returns the log-probs we feed (a leaf tensor), then
  compare the loss, its gradient with respect to those log-probs, and the logged metrics.
- Advantages: TRL has no public function for them (they are inline in
  `_generate_and_score_completions`), so we run that method for real (the tiny model generates)
  with a reward function that returns preset rewards, and compare its `advantages` output.
- Log-probs: `sequence_logps` against TRL's own fused-LM-head path on the same model.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig, GRPOTrainer

from resume.grpo.advantages import group_advantages, zero_variance_fraction
from resume.grpo.logps import sequence_logps
from resume.grpo.loss import LOSS_TYPES, grpo_loss, masked_mean, per_token_loss, reduce_loss

VOCAB = 64
MAX_COMPLETION = 7  # TRL's dr_grpo normaliser; deliberately != T below so the constant is exercised
EPS = 1e-4


# --------------------------------------------------------------------------- hand-computed values
def test_zscore_advantages_by_hand():
    rewards = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0])  # group 2 has zero variance
    adv = group_advantages(rewards, 3)
    # group 1: mean 1, unbiased std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1
    expected = torch.tensor([-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)

    adv_k2 = group_advantages(torch.tensor([1.0, 0.0]), 2)
    std = math.sqrt(0.5)  # unbiased: ((0.5)^2 + (0.5)^2) / (2 - 1)
    torch.testing.assert_close(adv_k2, torch.tensor([0.5, -0.5]) / (std + EPS), rtol=0, atol=1e-7)


def test_zscore_unscaled_is_mean_centering():
    rewards = torch.tensor([0.0, 1.0, 5.0, -1.0, 3.0, 4.0])
    adv = group_advantages(rewards, 3, scale=False)
    torch.testing.assert_close(adv, torch.tensor([-2.0, -1.0, 3.0, -3.0, 1.0, 2.0]), rtol=0, atol=1e-7)


def test_softmax_advantages_by_hand():
    rewards = torch.tensor([0.0, 1.0, 2.0])
    adv = group_advantages(rewards, 3, kind="softmax", temperature=0.5)
    exps = [math.exp(0.0), math.exp(2.0), math.exp(4.0)]  # r / 0.5
    expected = torch.tensor([e / sum(exps) - 1 / 3 for e in exps])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)
    assert abs(adv.sum().item()) < 1e-6  # zero-sum within the group
    # scale is a zscore option: it does not change the softmax reading
    torch.testing.assert_close(group_advantages(rewards, 3, kind="softmax", scale=False), adv)


@pytest.mark.parametrize("kind", ["zscore", "softmax"])
@pytest.mark.parametrize("scale", [True, False])
def test_all_equal_group_gives_zero_advantage(kind, scale):
    adv = group_advantages(torch.full((8,), 1.3), 4, kind=kind, scale=scale)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv, torch.zeros(8), rtol=0, atol=1e-7)


def test_advantage_validation():
    with pytest.raises(ValueError, match=r"must be >= 2 .*grpo.config.num_generations>=2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="zscore, softmax"):
        group_advantages(torch.zeros(4), 2, kind="rank")
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="temperature"):
        group_advantages(torch.zeros(4), 2, kind="softmax", temperature=0.0)


def test_zero_variance_fraction():
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0])
    assert zero_variance_fraction(rewards, 2) == pytest.approx(2 / 3)
    assert zero_variance_fraction(torch.tensor([0.0, 1.0]), 2) == 0.0


def _one_token(ratio: float, advantage: float, **kwargs):
    """A single-token batch with the given probability ratio; returns (loss, d loss / d logp, stats)."""
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, stats = per_token_loss(
        logps, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), **kwargs
    )
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    return loss.item(), grad.item(), stats


def test_clipping_by_hand():
    # ratio 1.5 > 1 + 0.2 with A > 0: clipped to 1.2, no gradient
    loss, grad, stats = _one_token(1.5, 1.0)
    assert loss == pytest.approx(-1.2) and grad == 0.0
    assert stats["clip_ratio/high_mean"] == 1.0 and stats["clip_ratio/region_mean"] == 1.0
    # same ratio with A < 0: the unclipped term is the min, so it is not clipped (pessimistic bound)
    loss, grad, stats = _one_token(1.5, -1.0)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5)  # d(-r*A)/dlogp = -A * r
    assert stats["clip_ratio/region_mean"] == 0.0
    # ratio 0.5 < 1 - 0.2 with A < 0: clipped at 0.8, no gradient; with A > 0: not clipped
    loss, grad, stats = _one_token(0.5, -1.0)
    assert loss == pytest.approx(0.8) and grad == 0.0 and stats["clip_ratio/low_mean"] == 1.0
    loss, grad, _ = _one_token(0.5, 1.0)
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5)
    # clip-higher: epsilon_high = 0.6 leaves ratio 1.5 inside the region
    loss, _, _ = _one_token(1.5, 1.0, epsilon_high=0.6)
    assert loss == pytest.approx(-1.5)
    # delta caps the unclipped ratio (INTELLECT-2): A < 0 at ratio 3 -> -(min(3, 2) * -1) = 2
    loss, _, _ = _one_token(3.0, -1.0, delta=2.0)
    assert loss == pytest.approx(2.0)


def test_k3_kl_by_hand():
    logps = torch.tensor([[-1.0, -0.5]])
    ref = torch.tensor([[-2.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0]])
    # zero advantage isolates the KL term; token 1: ref - logp = -1 -> e^-1 + 1 - 1 = e^-1; token 2: 0
    loss, stats = per_token_loss(logps, logps, torch.zeros(1), mask, beta=0.1, ref_logps=ref)
    torch.testing.assert_close(loss, torch.tensor([[0.1 * math.exp(-1.0), 0.0]]))
    assert stats["kl"] == pytest.approx(math.exp(-1.0) / 2)
    # beta = 0 with ref_logps: the KL is reported, not added
    loss0, stats0 = per_token_loss(logps, logps, torch.zeros(1), mask, ref_logps=ref)
    assert loss0.abs().max().item() == 0.0 and stats0["kl"] == pytest.approx(stats["kl"])
    with pytest.raises(ValueError, match="ref_logps"):
        per_token_loss(logps, logps, torch.zeros(1), mask, beta=0.1)


def test_kl_ratio_correction_by_hand():
    logps, ref = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    old = logps - math.log(2.0)  # ratio 2
    kwargs = {"beta": 1.0, "ref_logps": ref}
    weighted, stats = per_token_loss(logps, old, torch.zeros(1), torch.ones(1, 1), **kwargs)
    plain, plain_stats = per_token_loss(
        logps, old, torch.zeros(1), torch.ones(1, 1), kl_ratio_correction=False, **kwargs
    )
    k3 = math.exp(-1.0)  # ref - logp = -1
    assert weighted.item() == pytest.approx(2 * k3) and stats["kl"] == pytest.approx(2 * k3)
    assert plain.item() == pytest.approx(k3) and plain_stats["kl"] == pytest.approx(k3)


def test_reduce_loss_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert reduce_loss(per_token, mask, "grpo").item() == pytest.approx((1.5 + 4.0) / 2)
    assert reduce_loss(per_token, mask, "bnpo").item() == pytest.approx(7 / 3)
    assert reduce_loss(per_token, mask, "dr_grpo", max_completion_length=4).item() == pytest.approx(7 / 8)
    assert reduce_loss(per_token, mask, "dapo").item() == pytest.approx(7 / 3)
    assert reduce_loss(per_token, mask, "dapo", num_active_tokens=14).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        reduce_loss(per_token, mask, "cispo")
    with pytest.raises(ValueError, match="max_completion_length"):
        reduce_loss(per_token, mask, "dr_grpo")
    empty = torch.zeros(2, 3)  # an all-padding batch is a zero loss, not NaN
    assert (
        reduce_loss(per_token, empty, "grpo").item() == 0.0
        and reduce_loss(per_token, empty, "dapo").item() == 0.0
    )


def test_grpo_loss_prefixes_stats():
    logps = torch.full((2, 3), -1.0)
    _, stats = grpo_loss(logps, None, torch.tensor([1.0, -1.0]), torch.ones(2, 3), prefix="summarizer/train/")
    assert stats and all(key.startswith("summarizer/train/") for key in stats)
    assert (
        stats["summarizer/train/ratio/mean"] == 1.0
        and stats["summarizer/train/clip_ratio/region_mean"] == 0.0
    )


# --------------------------------------------------------------------------- TRL fixtures
@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A random 2-layer Qwen2 and a word-level tokenizer, saved where TRL can reload them."""
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _trainer(path, tmp_path, reward_fn=None, **config) -> GRPOTrainer:
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        bf16=False,  # GRPOConfig defaults to bf16=True
        use_cpu=True,
        report_to=[],
        gradient_checkpointing=False,
        save_strategy="no",
        max_completion_length=MAX_COMPLETION,
        **{"num_generations": 2, "per_device_train_batch_size": 6, **config},
    )
    trainer = GRPOTrainer(
        model=str(path),
        reward_funcs=reward_fn or (lambda completions, **kwargs: [0.0] * len(completions)),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["w1 w2", "w3 w4 w5", "w6"]}),
        processing_class=PreTrainedTokenizerFast.from_pretrained(path),
    )
    trainer.model.train()
    # normally set by Trainer's loop; 1 = one micro-batch per optimizer step, what our functions compute
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _loss_inputs(seed: int = 0):
    """Six completions (3 prompts x k=2) of up to 5 tokens, off-policy enough that both clip bounds bind."""
    gen = torch.Generator().manual_seed(seed)
    batch, prompt_len, length = 6, 3, 5
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    logps = -0.2 - torch.rand(batch, length, generator=gen) * 3
    return {
        "prompt_ids": torch.randint(2, VOCAB, (batch, prompt_len), generator=gen),
        "prompt_mask": torch.ones(batch, prompt_len, dtype=torch.long),
        "completion_ids": torch.randint(2, VOCAB, (batch, length), generator=gen) * mask,
        "completion_mask": mask,
        "logps": logps,
        "old_logps": logps + 0.5 * torch.randn(batch, length, generator=gen),  # ratios ~ e^{+-0.5}
        "ref_logps": logps + 0.3 * torch.randn(batch, length, generator=gen),
        "entropies": torch.rand(batch, length, generator=gen),
        "advantages": torch.randn(batch, generator=gen),
    }


def _trl_loss(trainer: GRPOTrainer, data: dict, beta: float, on_policy: bool = False):
    """TRL's loss, its gradient w.r.t. the fed log-probs, and the metrics it logged."""
    logps = data["logps"].clone().requires_grad_(True)

    def fake_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == logps.size(1)
        return logps, data["entropies"], None

    trainer._get_per_token_logps_and_entropies = fake_logps  # the only patch: TRL scores our log-probs
    inputs = {key: data[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    inputs["advantages"] = data["advantages"]
    inputs["num_items_in_batch"] = data["completion_mask"].sum()  # single process: the batch's token count
    if not on_policy:
        inputs["old_per_token_logps"] = data["old_logps"]
    if beta > 0:
        inputs["ref_per_token_logps"] = data["ref_logps"]
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    (grad,) = torch.autograd.grad(loss, logps)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grad, metrics


def _our_loss(data: dict, loss_type: str, beta: float, on_policy: bool = False, **kwargs):
    logps = data["logps"].clone().requires_grad_(True)
    loss, stats = grpo_loss(
        logps,
        None if on_policy else data["old_logps"],
        data["advantages"],
        data["completion_mask"],
        loss_type=loss_type,
        beta=beta,
        ref_logps=data["ref_logps"] if beta > 0 else None,
        max_completion_length=MAX_COMPLETION,
        entropies=data["entropies"],
        **kwargs,
    )
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.detach(), grad, stats


# our keyword -> TRL's GRPOConfig field
TRL_NAMES = {
    "epsilon_low": "epsilon",
    "epsilon_high": "epsilon_high",
    "delta": "delta",
    "kl_ratio_correction": "use_bias_correction_kl",
}
CASES = [(loss_type, beta, {}) for loss_type in LOSS_TYPES for beta in (0.0, 0.04)] + [
    ("grpo", 0.04, {"kl_ratio_correction": False}),
    ("dapo", 0.04, {"kl_ratio_correction": False}),
    ("dapo", 0.04, {"epsilon_high": 0.28, "delta": 1.3}),  # clip-higher and INTELLECT-2's delta
    ("grpo", 0.0, {"epsilon_low": 0.1, "epsilon_high": 0.3}),
]


@pytest.mark.parametrize(("loss_type", "beta", "options"), CASES)
def test_loss_matches_trl(tiny_lm_dir, tmp_path, loss_type, beta, options):
    data = _loss_inputs()
    trl_options = {TRL_NAMES[key]: value for key, value in options.items()}
    trainer = _trainer(tiny_lm_dir, tmp_path, loss_type=loss_type, beta=beta, **trl_options)
    trl_value, trl_grad, trl_metrics = _trl_loss(trainer, data, beta)
    ours, our_grad, stats = _our_loss(data, loss_type, beta, **options)

    clipped = stats["clip_ratio/low_mean"], stats["clip_ratio/high_mean"]
    assert min(clipped) > 0, f"both clip bounds must bind in this test, got {clipped}"
    torch.testing.assert_close(ours, trl_value, rtol=0, atol=1e-6)
    torch.testing.assert_close(our_grad, trl_grad, rtol=0, atol=1e-6)
    shared = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    shared += ["clip_ratio/low_min", "clip_ratio/high_max"] + (["kl"] if beta > 0 else [])
    for key in shared:
        assert stats[key] == pytest.approx(trl_metrics[key], abs=1e-6), key


def test_on_policy_loss_matches_trl(tiny_lm_dir, tmp_path):
    """old_logps=None is TRL's on-policy shortcut (old = logps.detach()): ratio 1, no clipping."""
    data = _loss_inputs(seed=1)
    trainer = _trainer(tiny_lm_dir, tmp_path, loss_type="grpo", beta=0.04)
    trl_value, trl_grad, _ = _trl_loss(trainer, data, beta=0.04, on_policy=True)
    ours, our_grad, stats = _our_loss(data, "grpo", 0.04, on_policy=True)
    torch.testing.assert_close(ours, trl_value, rtol=0, atol=1e-6)
    torch.testing.assert_close(our_grad, trl_grad, rtol=0, atol=1e-6)
    assert stats["clip_ratio/region_mean"] == 0.0 and stats["ratio/max"] == 1.0


@pytest.mark.parametrize("scale", [True, False])
def test_advantages_match_trl(tiny_lm_dir, tmp_path, scale):
    """Runs TRL's `_generate_and_score_completions` (real generation) with preset rewards."""
    rewards = [0.3, 1.8, -1.0, 1.3, 1.3, 1.3, 2.0, -0.3, 0.6]  # 3 groups of k=3, one with zero variance
    trainer = _trainer(
        tiny_lm_dir,
        tmp_path,
        reward_fn=lambda completions, **kwargs: list(rewards),
        num_generations=3,
        per_device_train_batch_size=9,
        scale_rewards="group" if scale else "none",
    )
    prompts = [prompt for prompt in ["w1 w2", "w3 w4 w5", "w6"] for _ in range(3)]  # group by group
    trainer._metrics["train"].clear()
    output = trainer._generate_and_score_completions([{"prompt": prompt} for prompt in prompts])

    ours = group_advantages(torch.tensor(rewards), 3, scale=scale)
    torch.testing.assert_close(ours, output["advantages"], rtol=0, atol=1e-6)
    frac = trainer._metrics["train"]["frac_reward_zero_std"][-1]
    assert zero_variance_fraction(torch.tensor(rewards), 3) == pytest.approx(frac) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- log-probs
def _logps_batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (4, 9), generator=gen)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left-padded prompt
    attn[1, -2:] = 0  # right-padded completions
    attn[2, -4:] = 0
    return ids * attn, attn


def test_sequence_logps_matches_manual_log_softmax(tiny_lm_dir):
    model = Qwen2ForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ids, attn = _logps_batch()
    keep, temperature = 5, 0.7
    logps, entropies = sequence_logps(model, ids, attn, keep, temperature)
    assert logps.shape == entropies.shape == (4, keep) and logps.requires_grad

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, -keep - 1 : -1] / temperature
    log_probs = logits.log_softmax(-1)
    valid = attn[:, -keep:].bool()
    expected = log_probs.gather(-1, ids[:, -keep:].unsqueeze(-1)).squeeze(-1) * valid
    expected_entropy = -(log_probs.exp() * log_probs).sum(-1) * valid
    torch.testing.assert_close(logps.detach(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropies, expected_entropy, rtol=0, atol=1e-5)

    chunked, _ = sequence_logps(model, ids, attn, keep, temperature, batch_size=3)  # chunks of 3 + 1 rows
    torch.testing.assert_close(chunked, logps, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        sequence_logps(model, ids, attn, ids.size(1), temperature)


def test_sequence_logps_matches_trl(tiny_lm_dir, tmp_path):
    """Same numbers as TRL's fused LM head (which the trainer patches into its model), temperature
    included."""
    trainer = _trainer(tiny_lm_dir, tmp_path, temperature=0.7)
    model = trainer.model.eval()
    ids, attn = _logps_batch()
    with torch.no_grad():
        trl_logps, trl_entropies, _ = trainer._get_per_token_logps_and_entropies(
            model, ids, attn, 5, compute_entropy=True
        )
        logps, entropies = sequence_logps(model, ids, attn, 5, temperature=0.7)
    torch.testing.assert_close(logps, trl_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropies, trl_entropies, rtol=0, atol=1e-5)


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    assert masked_mean(x, torch.tensor([[1, 1], [1, 0]])).item() == pytest.approx(2.0)
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0


# --------------------------------------------------------------------------- off-policy correction
def test_importance_weights_by_hand():
    from resume.grpo.loss import importance_weights

    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    engine = torch.tensor([[-1.5, -1.0, float("nan")], [-1.0, -3.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # token differences old - engine: [[0.5, -1.0, nan -> 0], [0.0, 2.0, (masked) 0]]
    w, stats = importance_weights(old, engine, mask, mode="token_truncate", cap=3.0)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, 3.0, 1.0]])  # e^2 = 7.39 -> 3
    assert torch.allclose(w, expected)
    assert stats["is_ratio_max"] == pytest.approx(3.0) and stats["is_ratio_min"] == pytest.approx(
        math.exp(-1)
    )
    assert stats["logp_difference_max"] == pytest.approx(2.0)
    assert stats["logp_difference_mean"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.0 + 2.0) / 5)
    w, stats = importance_weights(old, engine, mask, mode="token_mask", cap=3.0, floor=0.5)
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), 0.0, 1.0], [1.0, 0.0, 1.0]]))  # e^-1 < 0.5 dropped
    assert stats["is_masked_fraction"] == pytest.approx(2 / 5)
    w, _ = importance_weights(old, engine, mask, mode="sequence_truncate", cap=3.0)
    assert torch.allclose(w, torch.tensor([[math.exp(-0.5)], [3.0]]))  # sums -0.5 and 2.0
    w, _ = importance_weights(old, engine, mask, mode="sequence_mask", cap=3.0)
    assert torch.allclose(w, torch.tensor([[math.exp(-0.5)], [0.0]]))
    with pytest.raises(ValueError, match="token_truncate"):
        importance_weights(old, engine, mask, mode="tokens")


def test_importance_weights_multiply_the_per_token_loss():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    w = torch.tensor([[2.0, 0.5], [1.0, 0.0]])
    plain, _ = per_token_loss(logps, None, adv, mask)
    weighted, _ = per_token_loss(logps, None, adv, mask, is_weights=w)
    assert torch.allclose(weighted, plain * w)
    loss, _ = grpo_loss(logps, None, adv, mask, is_weights=w)
    assert loss.item() == pytest.approx(float((plain * w).sum() / 4))  # dapo: sum over the 4 tokens
    seq, _ = per_token_loss(logps, None, adv, mask, is_weights=torch.tensor([[2.0], [0.5]]))
    assert torch.allclose(seq, plain * torch.tensor([[2.0], [0.5]]))


def test_importance_sampling_settings_are_validated():
    from resume.grpo.config import GRPOConfig as Config  # ours (GRPOConfig here is TRL's)

    assert Config(importance_sampling="sequence_mask").importance_sampling == "sequence_mask"
    with pytest.raises(ValueError, match="importance_sampling='tokens' is not one of auto, off"):
        Config(importance_sampling="tokens")
    with pytest.raises(ValueError, match="importance_sampling_floor"):
        Config(importance_sampling_floor=4.0, importance_sampling_cap=3.0)
