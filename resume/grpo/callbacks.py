"""Lightning callbacks of the GRPO trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class StepCheckpoint(pl.Callback):
    """Write `<dirpath>/last.ckpt` every `every` optimizer steps, but not after the last one.

    After the last step `run_grpo` exports the trained summarizer, which supersedes a checkpoint
    (weights and AdamW's moments: three times the model's size, ~1.6 GB for SmolLM2-135M, ~48 GB for
    a 4B model) that nothing would read; a run killed before the export resumes from the last one
    written. The file is written beside its final name and renamed, so a crash while saving never
    leaves a checkpoint that cannot be loaded. Saved at `on_train_batch_end`, as Lightning's own
    ModelCheckpoint does, so the trainer resumes with the next batch. On several ranks rank 0 writes it.
    """

    def __init__(self, dirpath: str | Path, every: int) -> None:
        self.dirpath = Path(dirpath)
        self.every = every

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every or step >= trainer.max_steps:
            return
        tmp = self.dirpath / ".last.ckpt.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)  # every rank calls it (sharded strategies gather); rank 0 writes
        if trainer.is_global_zero:
            tmp.replace(self.last)
        trainer.strategy.barrier("grpo-checkpoint")
