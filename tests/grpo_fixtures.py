"""Shared pieces of the GRPO tests: the toy world built from the real conf/, and a learnable reward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig

from resume.utils.config import CONFIG_DIR


def group(name: str, option: str) -> str:
    """`name=option`, or `+name=option` while the root defaults list has no `name` slot."""
    defaults = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())["defaults"]
    has_slot = any(isinstance(d, dict) and name in d for d in defaults)
    return f"{name}={option}" if has_slot else f"+{name}={option}"


def toy_config(
    compose: Callable[[list[str]], DictConfig], seed: int = 0, extra: Sequence[str] = ()
) -> DictConfig:
    """The real configs: tiny summarizer and retriever, toy data, the paper's reward, no budget caps."""
    budget = ["budget=smoke"] if (CONFIG_DIR / "budget" / "smoke.yaml").is_file() else []
    return compose(
        [
            group("summarizer", "tiny"),
            "retriever=tiny",
            "data=toy",
            group("reward", "resume"),
            *budget,
            f"seed={seed}",
            *extra,
        ]
    )


def retrieval_reward(cfg: DictConfig, data: Any, retriever: Any) -> Any:
    """`RetrievalReward` from conf/reward/resume.yaml over the toy training split."""
    train = data.split("train")
    factory = instantiate(cfg.reward)
    return factory(
        retriever=retriever,
        doc_texts={d: doc.full_text for d, doc in data.corpus.items()},
        queries=train.queries,
        qrels=train.qrels,
    )


@dataclass
class ScoreBatch:
    """The part of `RewardBatch` the trainer reads: totals and logged statistics."""

    total: torch.Tensor

    def log_dict(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/reward_mean": float(self.total.mean()),
            f"{prefix}/reward_std": float(self.total.std()),
        }


class WordStartReward:
    """Deterministic toy reward: spaces per completion / `max_new_tokens` (capped at 1).

    A space begins a byte-level BPE word token, so the reward is the fraction of generated tokens
    that start a word: dense (every group varies) and learnable by a 2-layer model in ~20 steps.
    """

    def __init__(self, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens

    def compute(self, completions: Sequence[str], doc_ids: Sequence[str]) -> ScoreBatch:
        return ScoreBatch(torch.tensor([min(1.0, t.count(" ") / self.max_new_tokens) for t in completions]))


class ShapedReward:
    """A `RetrievalReward` plus the word-start bonus: the real reward's terms, negatives and reseeding,
    with a signal a random tiny model can already vary (it never writes the separator)."""

    def __init__(self, base: Any, max_new_tokens: int) -> None:
        self.base = base
        self.bonus = WordStartReward(max_new_tokens)

    def reseed(self, seed: int) -> None:
        self.base.reseed(seed)

    def rewardable_doc_ids(self) -> list[str]:
        return self.base.rewardable_doc_ids()

    def compute(self, completions: Sequence[str], doc_ids: Sequence[str]) -> Any:
        batch = self.base.compute(completions, doc_ids)
        return replace(batch, total=batch.total + self.bonus.compute(completions, doc_ids).total)


class AtTrainEnd(pl.Callback):
    """Test-only: when training ends, save the final state to `save_to` (`run_grpo` writes no checkpoint
    of the last step, the export supersedes it) and note the step of the mid-round `last.ckpt` in
    `checkpoints`, which `run_grpo` deletes after the export."""

    def __init__(self, save_to: Path, checkpoints: Path | None = None) -> None:
        self.save_to, self.checkpoints = Path(save_to), checkpoints
        self.last_checkpoint_step: int | None = None

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        trainer.save_checkpoint(self.save_to)
        last = self.checkpoints / "last.ckpt" if self.checkpoints is not None else None
        if last is not None and last.is_file():
            self.last_checkpoint_step = torch.load(last, weights_only=False)["global_step"]
