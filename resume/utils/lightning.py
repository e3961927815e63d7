"""Lightning plumbing in one place: Trainers built from config with the keys a caller owns, loggers
built from the `logger` group and always closed, and the W&B-only features behind one test."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from pytorch_lightning.loggers import WandbLogger

log = logging.getLogger(__name__)


def check_trainer_kwargs(
    trainer_kwargs: Mapping[str, Any] | None, controlled: Collection[str], *, owner: str, fix: str
) -> dict[str, Any]:
    """The user's Trainer arguments as a dict, refusing the keys `owner` controls itself.

    The error names the keys, the owner and `fix` (where the setting lives instead)."""
    extra = dict(trainer_kwargs or {})
    clash = sorted(k for k in extra if k in controlled)
    if clash:
        raise ValueError(f"trainer_kwargs sets {clash}, which {owner} controls; {fix}")
    return extra


def make_trainer(
    trainer_kwargs: Mapping[str, Any] | None,
    *,
    defaults: Mapping[str, Any],
    owned: Mapping[str, Any],
    refused: Collection[str] = (),
    owner: str,
    fix: str,
) -> pl.Trainer:
    """`pl.Trainer(**defaults, **trainer_kwargs, **owned)`, refusing user keys the caller controls.

    `owned` are the arguments the caller sets itself (a user's value would be overwritten
    silently); `refused` are further keys that make no sense for the caller (e.g. gradient
    accumulation under manual optimisation).
    """
    extra = check_trainer_kwargs(trainer_kwargs, [*owned, *refused], owner=owner, fix=fix)
    return pl.Trainer(**{**defaults, **extra, **owned})


def build_loggers(cfg: Mapping[str, Any] | None) -> list[Any]:
    """Lightning loggers from the `logger` group (a dict of named loggers; empty for none)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node is not None and "_target_" in node]


def is_wandb(logger: Any) -> bool:
    """Whether `logger` is a W&B logger (tables, `wandb.finish`)."""
    return isinstance(logger, WandbLogger)


def close_loggers(loggers: Iterable[Any], status: str) -> None:
    """Always called, so a crashed job in a multirun never leaves an open W&B run behind."""
    for lg in loggers:
        try:
            lg.finalize(status)
        except Exception as e:  # noqa: BLE001 -- a logger failing to close must not hide the real error
            log.warning("closing logger %s failed: %s", type(lg).__name__, e)
        if is_wandb(lg):
            import wandb  # only where a W&B logger exists

            wandb.finish(exit_code=0 if status == "success" else 1)
