"""GRPO learns: a tiny random summarizer raises a toy reward; every piece runs with the real reward."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math

import numpy as np
import pytest
import torch
from grpo_fixtures import AtTrainEnd, WordStartReward, group, retrieval_reward, toy_config
from hydra.utils import instantiate
from pytorch_lightning.loggers import CSVLogger

from resume.grpo import GRPOConfig, run_grpo
from resume.grpo.rollouts import pack_completions


def _adamw(lr: float) -> functools.partial:
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


# 30 steps: the slowest of the three seeds rose by 0.64 (0.21 -> 0.85) on a Xeon with AVX512-BF16, the
# others to 1.0; at 20 steps that seed rose only 0.28, here and on another machine, so a 0.3 bar at 20
# steps depended on the CPU. With the update broken (the loss's sign flipped) the reward falls to ~0.
# Under bf16 autocast (AMD EPYC, 2026-12-07): seeds 0, 1, 2 rose 0.17 -> 0.75, 0.12 -> 1.0, 0.23 -> 0.78
# (fp32 the same session: to 1.0, 0.99, 0.87); broken, both fell to <= 0.011.
STEPS, RISE = 30, 0.3


@pytest.mark.parametrize(("seed", "autocast"), [(0, "off"), (1, "off"), (2, "off"), (0, "bf16")])
def test_grpo_raises_a_toy_reward(compose_in_tmp, tmp_path, seed, autocast):
    """Three seeds in fp32, and one with the update's forwards under bf16 autocast (`autocast: auto` on
    a CPU where bf16 is fast, the default run's setting there)."""
    cfg = toy_config(compose_in_tmp, seed=seed)
    summarizer = instantiate(cfg.summarizer)
    data = instantiate(cfg.data)
    before = {n: p.detach().clone() for n, p in summarizer.model.named_parameters() if p.requires_grad}
    config = GRPOConfig(
        steps=STEPS,
        num_generations=4,
        prompts_per_step=4,
        max_new_tokens=8,
        val_every=0,
        log_completions_every=0,
        checkpoint_every=0,
        seed=seed,
        autocast=autocast,
    )
    stats = run_grpo(
        summarizer,
        WordStartReward(8),
        data.corpus,
        sorted(data.corpus),
        out_dir=tmp_path / "grpo",
        config=config,
        optimizer=_adamw(3e-2),
    )

    history = [
        json.loads(line) for line in (tmp_path / "grpo" / "grpo_history.jsonl").read_text().splitlines()
    ]
    rewards = [h["train/reward_mean"] for h in history]
    assert len(rewards) == STEPS and stats["steps"] == STEPS
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + RISE, (
        f"seed {seed}: reward {first:.3f} -> {last:.3f}: {np.round(rewards, 2).tolist()}"
    )
    assert stats["reward_mean"] == pytest.approx(np.mean(rewards[-math.ceil(STEPS / 4) :]))  # last 25%
    assert stats["autocast"] == {"off": "off", "bf16": "bfloat16"}[autocast]  # what the forwards ran in
    unchanged = [n for n, p in summarizer.model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters never updated: {unchanged}"
    assert (tmp_path / "grpo" / "summarizer" / "config.json").is_file()
    assert (tmp_path / "grpo" / "grpo_curves.png").stat().st_size > 0


# keys every step logs with the real reward (statistics over summaries, e.g. repetition_mean, are NaN and
# not logged while no completion has the separator, as with a random tiny model; the history keeps them)
TRAIN_KEYS = [
    "reward_mean",
    "reward_std",
    "structure_mean",
    "retrieval_mean",
    "separator_rate",
    "bucket_0",
    "bucket_7",
    "zero_variance_fraction",
    "kl",
    "loss",
    "clip_ratio/region_mean",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "entropy",
    "completion_length",
    "truncated_fraction",
    "grad_norm",
    "lr",
]


def test_every_piece_with_the_retrieval_reward(compose_in_tmp, tmp_path):
    """Real RetrievalReward + tiny retriever, KL to a reference (beta > 0), mu = 2, mini-batches, logging."""
    settings = {
        "steps": 3,
        "num_generations": 2,
        "prompts_per_step": 4,
        "num_iterations": 2,
        "mini_batch_size": 3,
        "beta": 0.1,
        "max_new_tokens": 8,
        "val_every": 2,
        "val_max_docs": 3,
        "log_completions_every": 2,
        "log_completions_rows": 5,
        "checkpoint_every": 2,
        "seed": 1,
    }
    cfg = toy_config(
        compose_in_tmp, extra=[group("grpo", "tiny"), *(f"grpo.config.{k}={v}" for k, v in settings.items())]
    )
    summarizer = instantiate(cfg.summarizer)
    data = instantiate(cfg.data)
    reward = retrieval_reward(cfg, data, instantiate(cfg.retriever))
    grpo = instantiate(cfg.grpo)  # conf/grpo/tiny.yaml: a run_grpo factory
    out = tmp_path / "grpo"
    end = AtTrainEnd(tmp_path / "final.ckpt", out / "checkpoints")
    stats = grpo(
        summarizer,
        reward,
        data.corpus,
        out_dir=out,
        loggers=[CSVLogger(tmp_path / "logs", name="grpo")],
        val_fraction=0.2,
        trainer_kwargs={**grpo.keywords["trainer_kwargs"], "callbacks": [end]},
    )

    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as f:
        logged = set(csv.DictReader(f).fieldnames or [])
    missing = [k for k in TRAIN_KEYS if f"summarizer/train/{k}" not in logged]
    missing += [k for k in ("summarizer/val/reward_mean", "summarizer/val/separator_rate") if k not in logged]
    assert not missing, f"not logged: {missing}"

    history = [json.loads(line) for line in (out / "grpo_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2, 3]  # three steps, then the trained policy's validation
    assert [("val/reward_mean" in h) for h in history] == [True, False, True, True]
    assert all(h["train/kl"] is not None for h in history[:3])
    assert {"train/repetition_mean", "train/query_overlap_mean", "train/delta_mean"} <= set(history[0])
    rows = [json.loads(line) for line in (out / "samples" / "step_0002.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {
        "doc_id",
        "completion",
        "summary",
        "reward",
        "structure",
        "retrieval",
        "delta",
        "advantage",
    } <= set(rows[0])
    assert not (out / "samples" / "step_0001.jsonl").exists()
    # mu optimizer steps per GRPO step: written at step 2 (global 4), not after the last (the export),
    # and deleted once the summarizer is exported
    assert end.last_checkpoint_step == 2 * 2 and not (out / "checkpoints").exists()
    assert (
        stats["steps"] == 3
        and stats["val_docs"] == 3
        and stats["train_docs"] == len(reward.rewardable_doc_ids()) - 3
    )
    for key in (
        "reward_mean",
        "reward_first",
        "separator_rate_first",
        "separator_rate_last",
        "val_reward_first",
        "val_reward_last",
        "tokens_generated",
        "seconds",
    ):
        assert stats[key] is not None, key
    assert stats["tokens_generated"] > 3 * 8  # rollouts and validations
    assert (out / "grpo_curves.png").is_file() and (out / "summarizer" / "summarizer.json").is_file()


def test_lora_trains_adapters_and_exports_merged_weights(compose_in_tmp, tmp_path):
    cfg = toy_config(compose_in_tmp)
    summarizer = instantiate(cfg.summarizer)
    data = instantiate(cfg.data)
    before = {n: p.detach().clone() for n, p in summarizer.model.named_parameters()}
    config = GRPOConfig(
        steps=2,
        num_generations=4,
        prompts_per_step=2,
        max_new_tokens=6,
        beta=0.1,
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        val_every=0,
        log_completions_every=0,
        checkpoint_every=1,
        gradient_checkpointing=True,
    )
    run_grpo(
        summarizer,
        WordStartReward(6),
        data.corpus,
        sorted(data.corpus),
        out_dir=tmp_path / "lora",
        config=config,
        optimizer=_adamw(1e-2),
        trainer_kwargs={"callbacks": [AtTrainEnd(tmp_path / "lora.ckpt")]},
    )
    after = dict(summarizer.model.named_parameters())
    assert after.keys() == before.keys()  # merged and unloaded: no adapter left
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed), changed
    assert all(p.requires_grad for p in after.values())  # handed back as it came
    ckpt = torch.load(tmp_path / "lora.ckpt", weights_only=False)
    assert all("lora_" in k for k in ckpt["state_dict"])  # only the adapters are stored


def _one_sgd_step(compose, out_dir, extra=(), **changes) -> tuple[dict, torch.nn.Module]:
    """The toy summarizer's weights before, and the model after, one GRPO step of 2 x 4 rollouts with
    SGD at lr 1 (no clipping): the step is the gradient itself. `changes` override the GRPOConfig
    (`steps=2` for two); `extra` are config overrides of the toy run."""
    cfg = toy_config(compose, extra=list(extra))
    summarizer = instantiate(cfg.summarizer)
    data = instantiate(cfg.data)
    before = {n: p.detach().clone() for n, p in summarizer.model.named_parameters()}
    settings = {
        "steps": 1,
        "num_generations": 4,
        "prompts_per_step": 2,
        "max_new_tokens": 8,
        "val_every": 0,
        "log_completions_every": 0,
        "checkpoint_every": 0,
        "max_grad_norm": None,
    }
    config = GRPOConfig(**{**settings, **changes})
    run_grpo(
        summarizer,
        WordStartReward(8),
        data.corpus,
        sorted(data.corpus),
        out_dir=out_dir,
        config=config,
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
    )
    return before, summarizer.model


def _assert_same_step(before: dict, a: torch.nn.Module, b: torch.nn.Module) -> dict[str, float]:
    """`b` took the step `a` took, relative to the step itself: two paths that sum the same terms in
    another order move a weight by ~1e-6 on some CPUs (seen: 2.6e-6 on an AMD EPYC, for steps of 0.3 to
    4.7, i.e. < 1e-6 of the step), while a wrong accumulation (e.g. mini-batches not rescaled) is off by a
    sizeable fraction of the update. Returns each weight's largest move."""
    updates = {n: (p.detach() - before[n]).abs().max().item() for n, p in a.named_parameters()}
    assert max(updates.values()) > 1e-3  # the step moved the weights: the comparison means something
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        tol = 1e-4 * max(updates[name], 1e-3)
        torch.testing.assert_close(q, p, rtol=0, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    return updates


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_mini_batches_accumulate_to_the_full_batch_gradient(compose_in_tmp, tmp_path, loss_type):
    """One optimizer step with mini_batch_size=3 (uneven: 3+3+2) equals one step on all 8 sequences."""
    before, whole = _one_sgd_step(compose_in_tmp, tmp_path / "all", loss_type=loss_type, mini_batch_size=None)
    _, mini = _one_sgd_step(compose_in_tmp, tmp_path / "mini", loss_type=loss_type, mini_batch_size=3)
    _assert_same_step(before, whole, mini)


def test_tied_gradient_in_place_takes_the_same_step(compose_in_tmp, tmp_path, monkeypatch):
    """`tied_grad_in_place` (the tied embedding's gradient written straight into .grad) is engaged by the
    module on one process and moves every weight as autograd's accumulation does (mini-batches 3+3+2)."""
    import resume.grpo.update as grpo_update

    engaged = []
    original = grpo_update.tied_grad_in_place

    @contextlib.contextmanager
    def spy(model):
        with original(model) as on:
            engaged.append(on)
            yield on

    monkeypatch.setattr(grpo_update, "tied_grad_in_place", spy)
    before, autograd = _one_sgd_step(
        compose_in_tmp, tmp_path / "off", mini_batch_size=3, tied_grad_in_place=False
    )
    assert engaged == []
    _, in_place = _one_sgd_step(compose_in_tmp, tmp_path / "on", mini_batch_size=3, tied_grad_in_place=True)
    assert engaged == [True] * 3  # at each mini-batch's training forward
    updates = _assert_same_step(before, autograd, in_place)
    assert updates["model.embed_tokens.weight"] > 1e-3  # the tied weight itself moved


def test_preallocated_gradients_and_heap_reuse_take_the_same_steps(compose_in_tmp, tmp_path):
    """`preallocate_grads` (zero gradients allocated before the first forward, autograd adding into
    them) and `reuse_heap` (the backward's blocks from the heap) move every weight exactly as autograd's
    own allocation does, over two steps of three mini-batches: the second step samples its rollouts
    from the first step's weights, so any difference would compound."""
    before, freed = _one_sgd_step(compose_in_tmp, tmp_path / "freed", steps=2, mini_batch_size=3)
    _, preallocated = _one_sgd_step(
        compose_in_tmp,
        tmp_path / "preallocated",
        steps=2,
        mini_batch_size=3,
        preallocate_grads=True,
        reuse_heap=True,
    )
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in freed.named_parameters())
    assert moved > 1e-3  # the steps moved the weights: the comparison means something
    for (name, p), (_, q) in zip(freed.named_parameters(), preallocated.named_parameters()):
        assert torch.equal(p, q), name  # 0 + g is g: the same floats, not merely close ones


def test_bf16_autocast_takes_the_fp32_step_to_bf16_resolution(compose_in_tmp, tmp_path, monkeypatch):
    """`autocast: bf16` (the default path's options on: checkpointing, tree attention, the chunked head,
    the tied gradient in place) runs the update's forwards in bf16 and takes fp32's step to within
    bf16's resolution, over two steps (the second samples from the first's weights), with fp32 master
    weights. Measured on a tiny model at a trained model's weight scale: the step 2.8e-3 relative to
    fp32's (worst weight 7.6e-3), cosine 1.0 to 5 digits."""
    import resume.grpo.update as grpo_update

    casts = []
    original = grpo_update.PolicyUpdate._autocast

    def spy(self):
        ctx = original(self)
        casts.append(type(ctx).__name__)
        return ctx

    monkeypatch.setattr(grpo_update.PolicyUpdate, "_autocast", spy)
    options = {
        "steps": 2,
        "mini_batch_size": 4,
        "gradient_checkpointing": True,
        "tree_attention": True,
        "chunked_head": True,
        "tied_grad_in_place": True,
    }
    trained = ["summarizer.config.initializer_range=0.02"]  # the tiny config's 1.0 saturates softmaxes
    before, fp32 = _one_sgd_step(compose_in_tmp, tmp_path / "fp32", trained, autocast="off", **options)
    assert set(casts) == {"nullcontext"}
    casts.clear()
    _, bf16 = _one_sgd_step(compose_in_tmp, tmp_path / "bf16", trained, autocast="bf16", **options)
    assert set(casts) == {"autocast"} and len(casts) == 4  # 2 steps x 2 micro-batches
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    a = torch.cat([(p.detach() - before[n]).flatten() for n, p in fp32.named_parameters()])
    b = torch.cat([(p.detach() - before[n]).flatten() for n, p in bf16.named_parameters()])
    rel = ((b - a).norm() / a.norm()).item()
    assert a.norm() > 1e-3 and 0 < rel < 5e-2, rel  # > 0: the forwards did run in bf16
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999


def test_autocast_auto_follows_the_hardware(monkeypatch):
    from resume.utils import devices

    monkeypatch.setattr(devices, "cpu_bf16_is_fast", lambda: True)
    assert devices.training_autocast_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(devices, "cpu_bf16_is_fast", lambda: False)
    assert devices.training_autocast_dtype("auto", "cpu") is None
    assert devices.training_autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert devices.training_autocast_dtype("off", "cpu") is None
    with pytest.raises(ValueError, match="autocast"):
        GRPOConfig(autocast="fp16")


def test_packing_puts_every_completion_in_the_last_columns():
    from resume.summarizer.generate import Completion

    completions = [Completion("", [7, 8, 9], [1, 2], True), Completion("", [5], [1, 2, 3, 4], False)]
    packed = pack_completions(completions, pad_id=0)
    assert packed.input_ids.tolist() == [[0, 0, 1, 2, 7, 8, 9], [1, 2, 3, 4, 5, 0, 0]]
    assert packed.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
    assert packed.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0]] and packed.width == 3


@pytest.mark.parametrize("name", ["default", "paper", "tiny"])
def test_grpo_configs_build_a_run_grpo_factory(compose_in_tmp, name):
    grpo = instantiate(toy_config(compose_in_tmp, extra=[group("grpo", name)]).grpo)
    assert grpo.func is run_grpo and isinstance(grpo.keywords["config"], GRPOConfig)
    optimizer = grpo.keywords["optimizer"]([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.AdamW)
    scheduler = grpo.keywords["scheduler"](optimizer, total_steps=4)
    optimizer.step()
    scheduler.step()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_generations": 1}, "num_generations>=2"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"advantage": "rank"}, "advantage"),
        ({"beta": -0.1}, "beta"),
        ({"lora": {"rank": 4}}, "unknown keys"),
        ({"delta": 1.1}, "delta"),
        ({"mini_batch_size": 0}, "mini_batch_size"),
    ],
)
def test_config_rejects_bad_values_with_the_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**changes)


def _random_groups(gen: torch.Generator, groups, lengths: tuple[int, int]) -> list:
    """GRPO groups of random token ids: per (prompt length, k), one prompt and k completions whose
    lengths are drawn from [lengths[0], lengths[1])."""
    from resume.summarizer.generate import Completion

    completions = []
    for prompt_len, k in groups:
        prompt = torch.randint(5, 400, (prompt_len,), generator=gen).tolist()
        for _ in range(k):
            n = int(torch.randint(*lengths, (1,), generator=gen))
            completions.append(
                Completion("", torch.randint(5, 400, (n,), generator=gen).tolist(), prompt, True)
            )
    return completions


def test_each_prompt_once_gives_the_packed_log_probs_and_gradient(compose_in_tmp):
    """`shared_prompt_logps` (each prompt run once, its KV cache shared by the group) and
    `prefix_tree_logps` (the prompt and its group's completions as one masked sequence, under gradient
    checkpointing), each also with `chunked_head`, equal packing prompt + completion per row: log-probs,
    entropies and the gradient of a GRPO loss, with groups of different prompt and completion lengths
    and a chunk that splits a group."""
    from resume.grpo.logps import prefix_tree_logps, sequence_logps, shared_prompt_logps
    from resume.grpo.loss import grpo_loss

    summarizer = instantiate(toy_config(compose_in_tmp).summarizer)
    model = summarizer.model.train()
    gen = torch.Generator().manual_seed(0)
    completions = _random_groups(gen, ((11, 4), (6, 3)), lengths=(1, 9))
    advantages = torch.randn(len(completions), generator=gen)
    for chunk in (completions, completions[2:5]):  # whole batch; rows 2-4 split the first group
        packed = pack_completions(chunk, pad_id=0)
        assert [s.stop - s.start for _, s in packed.prompt_segments] == (
            [4, 3] if chunk is completions else [2, 1]
        )
        results = []
        for path in ("packed", "shared", "tree", "shared+chunked", "tree+chunked"):
            model.zero_grad()
            chunked = path.endswith("+chunked")  # log-probs from hidden states, a few logit rows at a time
            if path == "packed":
                logps, ent = sequence_logps(model, packed.input_ids, packed.attention_mask, packed.width, 0.7)
            elif path.startswith("shared"):
                logps, ent = shared_prompt_logps(model, packed, 0.7, chunked_head=chunked)
            else:  # no KV cache, so it runs under gradient checkpointing
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                logps, ent = prefix_tree_logps(model, packed, 0.7, chunked_head=chunked)
                model.gradient_checkpointing_disable()
            adv = advantages[: len(chunk)]
            loss, _ = grpo_loss(logps, logps.detach() + 0.05, adv, packed.completion_mask, loss_type="dapo")
            loss.backward()
            results.append((logps.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (a, ea, ga), *others = results
        for b, eb, gb in others:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(eb, ea, rtol=1e-5, atol=1e-5)
            for name in ga:  # relative to the gradient norm (the tiny model's init 1.0 amplifies rounding)
                gap = ((gb[name] - ga[name]).norm() / ga[name].norm().clamp(min=1e-12)).item()
                assert gap < 1e-4, f"{name}: relative gradient difference {gap:.2e}"
            assert any(g.abs().sum() > 0 for g in gb.values())


def test_bf16_autocast_keeps_the_loss_and_gradient_close_to_fp32(compose_in_tmp):
    """`trainer_kwargs.precision: bf16-mixed` runs the forward under CPU/GPU autocast with fp32 master
    weights. On a tiny model at a trained model's weight scale, the GRPO loss and its gradient stay
    within bf16's resolution of fp32's on both each-prompt-once paths (measured: loss 4.2e-3 relative,
    gradient 3.6e-3 relative, cosine 0.999998; bounds 2e-2, 2e-2, 0.999)."""
    from resume.grpo.logps import prefix_tree_logps, shared_prompt_logps
    from resume.grpo.loss import grpo_loss

    # a trained model's scale of weights (the tiny config's init 1.0 saturates every softmax)
    cfg = toy_config(compose_in_tmp, extra=["summarizer.config.initializer_range=0.02"])
    model = instantiate(cfg.summarizer).model.train()
    gen = torch.Generator().manual_seed(1)
    completions = _random_groups(gen, ((40, 4), (25, 4)), lengths=(4, 16))
    packed = pack_completions(completions, pad_id=0)
    advantages = torch.randn(len(completions), generator=gen)
    for path in (shared_prompt_logps, prefix_tree_logps):
        results = []
        for bf16 in (False, True):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logps, _ = path(model, packed, 1.0)
                mask = packed.completion_mask
                loss, _ = grpo_loss(logps, logps.detach(), advantages, mask, loss_type="dapo")
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results.append((float(loss), grad))
        (loss32, g32), (loss16, g16) = results
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
        rel_grad = ((g16 - g32).norm() / g32.norm()).item()
        assert abs(loss16 - loss32) <= 2e-2 * abs(loss32), (path.__name__, loss16, loss32)
        assert 0 < rel_grad < 2e-2, (path.__name__, rel_grad)  # > 0: the forward did run in bf16
        assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.999, path.__name__
