"""A GRPO run killed after step n and resumed from last.ckpt ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from grpo_fixtures import AtTrainEnd, ShapedReward, retrieval_reward, toy_config
from hydra.utils import instantiate

from resume.grpo import GRPOConfig, run_grpo
from resume.utils.optim import lr_schedule

N = 2  # killed after N GRPO steps, resumed to 2N


class Crash(RuntimeError):
    pass


class CrashAt(pl.Callback):
    """Kill the run as it starts optimizer step `global_step` (after last.ckpt of the step before)."""

    def __init__(self, global_step: int) -> None:
        self.global_step = global_step

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.global_step:
            raise Crash(f"killed at global step {trainer.global_step}")


@pytest.fixture
def retriever(compose_in_tmp):
    # Built once and shared: the tiny WordPiece tokenizer is not reproducible between builds (see
    # resume/utils/tiny.py), and the reward's retriever is frozen, so a restart would reload the same one.
    return instantiate(toy_config(compose_in_tmp).retriever)


def _run(compose, retriever, out_dir: Path, config: GRPOConfig, callbacks=()) -> tuple[dict, torch.nn.Module]:
    """A fresh process's worth of objects (same seeds, same frozen retriever), then run_grpo."""
    cfg = toy_config(compose, seed=0)
    summarizer = instantiate(cfg.summarizer)
    data = instantiate(cfg.data)
    reward = ShapedReward(retrieval_reward(cfg, data, retriever), config.max_new_tokens)
    stats = run_grpo(
        summarizer,
        reward,
        data.corpus,
        out_dir=out_dir,
        config=config,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.01),
        scheduler=functools.partial(lr_schedule, kind="linear", warmup_ratio=0.25),
        trainer_kwargs={"callbacks": list(callbacks)},
        val_fraction=0.2,
    )
    return stats, summarizer.model


def _config(**changes) -> GRPOConfig:
    # Every piece with state: mu = 2 (old log-probs), beta > 0 (reference copy), mini-batches,
    # validation, the reward's negatives, a decaying lr schedule; one checkpoint per GRPO step.
    base = GRPOConfig(
        steps=2 * N,
        num_generations=3,
        prompts_per_step=3,
        num_iterations=2,
        mini_batch_size=4,
        beta=0.05,
        max_new_tokens=6,
        val_every=2,
        val_max_docs=3,
        log_completions_every=1,
        checkpoint_every=1,
        seed=5,
    )
    return replace(base, **changes)


def test_resume_matches_uninterrupted_run(compose_in_tmp, retriever, tmp_path):
    config = _config()
    ends = {run: AtTrainEnd(tmp_path / f"{run}.ckpt") for run in ("full", "resumed")}
    full_stats, full_model = _run(compose_in_tmp, retriever, tmp_path / "full", config, [ends["full"]])
    initial = instantiate(toy_config(compose_in_tmp).summarizer).model
    assert all(not torch.equal(p, q) for p, q in zip(full_model.parameters(), initial.parameters()))

    with pytest.raises(Crash):
        _run(compose_in_tmp, retriever, tmp_path / "resumed", config, [CrashAt(N * config.num_iterations)])
    partial = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert partial["global_step"] == N * config.num_iterations
    resumed_stats, resumed_model = _run(
        compose_in_tmp, retriever, tmp_path / "resumed", config, [ends["resumed"]]
    )

    assert resumed_stats["resumed"] and not full_stats["resumed"]
    # the exported summarizer supersedes the mid-round checkpoints
    assert (
        not (tmp_path / "full" / "checkpoints").exists()
        and not (tmp_path / "resumed" / "checkpoints").exists()
    )
    full = torch.load(tmp_path / "full.ckpt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.ckpt", weights_only=False)
    assert full["global_step"] == resumed["global_step"] == 2 * N * config.num_iterations
    assert resumed_stats["steps"] == full_stats["steps"] == 2 * N

    # AdamW moments and step counts, parameter by parameter
    full_state = full["optimizer_states"][0]["state"]
    resumed_state = resumed["optimizer_states"][0]["state"]
    assert full_state.keys() == resumed_state.keys() and full_state
    for index in full_state:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(resumed_state[index][name], full_state[index][name], rtol=0, atol=1e-7)
    assert full["lr_schedulers"][0]["last_epoch"] == resumed["lr_schedulers"][0]["last_epoch"]

    # final weights, in memory and in the final states
    for (name, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    assert not any(k.startswith("reference.") for k in full["state_dict"])  # rebuilt, never stored

    # the same rollouts, rewards and validation curve, step by step
    a, b = _without_times(full["grpo"]["history"]), _without_times(resumed["grpo"]["history"])
    assert len(a) == len(b) == 2 * N + 1  # steps 0..2N-1 and the final validation
    assert all(h["train/grad_norm"] > 0 and h["train/reward_std"] > 0 for h in a[:-1])  # not a vacuous update
    for x, y in zip(a, b):
        assert x == y, {k: (x.get(k), y.get(k)) for k in x.keys() | y.keys() if x.get(k) != y.get(k)}
    for key in ("reward_mean", "reward_first", "val_reward_first", "val_reward_last", "tokens_generated"):
        assert resumed_stats[key] == pytest.approx(full_stats[key], abs=1e-6), key


def _without_times(history: list[dict]) -> list[dict]:
    """The records without what a machine measures (seconds, resident memory)."""
    return [{k: v for k, v in h.items() if not k.startswith(("time/", "mem/"))} for h in history]


def test_resume_refuses_a_checkpoint_of_other_settings(compose_in_tmp, retriever, tmp_path):
    config = _config(steps=2, num_iterations=1, beta=0.0, val_every=0, log_completions_every=0)
    with pytest.raises(Crash):  # killed after step 1's checkpoint
        _run(compose_in_tmp, retriever, tmp_path / "run", config, [CrashAt(1)])
    with pytest.raises(ValueError, match="other settings"):
        _run(
            compose_in_tmp,
            retriever,
            tmp_path / "run",
            _config(
                steps=2, num_iterations=1, beta=0.0, val_every=0, log_completions_every=0, num_generations=2
            ),
        )


def test_reward_reseed_replays_negatives(compose_in_tmp, retriever):
    cfg = toy_config(compose_in_tmp)
    reward = retrieval_reward(cfg, instantiate(cfg.data), retriever)
    doc = reward.rewardable_doc_ids()[0]
    reward.reseed(11)
    first = [reward.sample_negatives(doc) for _ in range(3)]
    reward.sample_negatives(doc)
    reward.reseed(11)
    assert [reward.sample_negatives(doc) for _ in range(3)] == first


class Watch(pl.Callback):
    """Keeps weak references to the memory a GRPO round allocates: AdamW's moments and the reference
    copy's weights."""

    def __init__(self) -> None:
        self.refs: list = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import weakref

        tensors = [t for o in trainer.optimizers for st in o.state.values() for t in st.values()]
        tensors += list(pl_module.reference.parameters()) if pl_module.reference is not None else []
        self.refs = [weakref.ref(t) for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 1]


def test_a_finished_round_frees_its_gradients_optimizer_and_reference(compose_in_tmp, retriever, tmp_path):
    """The loop's next phases must not carry a GRPO round's memory: after run_grpo returns, the
    summarizer's weights hold no gradients, and AdamW's state and the reference copy are freed."""
    import gc

    watch = Watch()
    _, model = _run(compose_in_tmp, retriever, tmp_path / "run", _config(steps=1), callbacks=[watch])
    gc.collect()
    assert all(p.grad is None for p in model.parameters())
    n_params = sum(1 for _ in model.parameters())
    assert len(watch.refs) >= 3 * n_params  # exp_avg, exp_avg_sq and the reference's copy, per weight
    alive = [r for r in watch.refs if r() is not None]
    assert not alive, f"{len(alive)} of {len(watch.refs)} tensors of the round still alive"
