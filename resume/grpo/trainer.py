"""`run_grpo`: GRPO of the summarizer through a Lightning `Trainer`, the entry point the loop calls.

It holds out validation documents, builds the `GRPOModule` and the `Trainer` (resuming from
`<out_dir>/checkpoints/last.ckpt` when a previous call was killed), trains, hands the policy
back as a plain model (LoRA merged), exports it and writes the run's history, curves and stats.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from resume.grpo.callbacks import StepCheckpoint
from resume.grpo.config import GRPOConfig
from resume.grpo.history import history_stats, plot_history, write_history
from resume.grpo.module import GRPOModule, OptimizerFactory, SchedulerFactory
from resume.grpo.rollouts import RolloutBatches, split_validation
from resume.utils import distributed
from resume.utils.devices import dtype_name
from resume.utils.io import atomic_write_json
from resume.utils.lightning import check_trainer_kwargs, make_trainer, release_fit

log = logging.getLogger(__name__)

# Lightning warnings that describe this design, not a problem: validation runs inside training_step, and
# the frozen reference model stays in eval mode.
_EXPECTED_WARNINGS = (".*`validation_step` but have no `val_dataloader`.*", ".*module\\(s\\) in eval mode.*")
# Trainer arguments that make no sense under GRPO's manual optimisation (set through grpo.config instead).
_REFUSED_TRAINER_KEYS = ("gradient_clip_val", "accumulate_grad_batches")
_OWNED_TRAINER_KEYS = (
    "max_steps",
    "max_epochs",
    "logger",
    "enable_checkpointing",
    "limit_val_batches",
    "use_distributed_sampler",
)
_TRAINER_FIX = (
    "use grpo.config (steps, max_grad_norm, mini_batch_size, checkpoint_every) and the loggers "
    "argument instead"
)
ITERATION_SEED_STRIDE = 1000  # iteration t trains with seed config.seed + 1000 t: new documents and samples


def run_grpo(
    summarizer: Any,
    reward: Any,
    docs: Mapping[str, Any],
    doc_ids: Sequence[str] | None = None,
    *,
    out_dir: str | Path,
    config: GRPOConfig | None = None,
    optimizer: OptimizerFactory | None = None,
    scheduler: SchedulerFactory | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    loggers: Any = None,
    val_fraction: float = 0.1,
    iteration: int = 0,
) -> dict[str, Any]:
    """Train `summarizer` in place with GRPO against `reward`; export it; return the run's statistics.

    Args:
        summarizer: a `SummarizerModule`; trained in place and saved to `<out_dir>/summarizer`
            (`save_pretrained`, LoRA merged first).
        reward: `RetrievalReward`-like, its retriever frozen.
        docs: doc id -> `Document` (title, text).
        doc_ids: the documents to train on (default: `reward.rewardable_doc_ids()`); a seeded
            `val_fraction` of them (at most `config.val_max_docs`; none when `config.val_every` is 0) is
            held out for validation.
        out_dir: checkpoints (`checkpoints/last.ckpt`, every `config.checkpoint_every` steps: a rerun
            resumes from it; removed once the summarizer is exported), samples, history, curves and
            the exported summarizer.
        config: hyper-parameters (`GRPOConfig`).
        optimizer: factory `params -> Optimizer` (default AdamW, lr 1e-6, no weight decay).
        scheduler: factory `(optimizer, total_steps=) -> LRScheduler` (`lr_schedule`); None = constant.
        trainer_kwargs: more `pytorch_lightning.Trainer` arguments (accelerator, precision, callbacks,
            ...); the step count, loggers, checkpointing and validation batches are set here.
        loggers: Lightning logger(s) for the `summarizer/*` metrics.
        iteration: the loop's iteration (Algorithm 1's t); every random draw of the run is seeded
            with `config.seed + 1000 * iteration`, so each round sees other documents and samples.

    Returns:
        `steps`, `reward_mean` (mean over the last 25% of the steps), `reward_first/last`,
        `separator_rate_first/last`, `val_reward_first/last`, `val_separator_rate_first/last`,
        `completion_length_first/last`, `tokens_generated`, `train_seconds` (all steps), `seconds` (this
        call), `resumed`, `autocast` (what the update's forwards ran in: `off` or a dtype), and the paths
        `summarizer`, `history`, `curves`.
    """
    config = config or GRPOConfig()
    if iteration:
        config = replace(config, seed=config.seed + ITERATION_SEED_STRIDE * iteration)
    out_dir = Path(out_dir)
    if doc_ids is None:
        if not callable(getattr(reward, "rewardable_doc_ids", None)):
            raise ValueError("pass doc_ids: the reward has no rewardable_doc_ids() to take them from")
        doc_ids = reward.rewardable_doc_ids()
    missing = [d for d in doc_ids if d not in docs]
    if missing:
        raise KeyError(f"{len(missing)} doc ids are not in docs (e.g. {missing[:5]})")
    extra = check_trainer_kwargs(
        trainer_kwargs, [*_OWNED_TRAINER_KEYS, *_REFUSED_TRAINER_KEYS], owner="run_grpo", fix=_TRAINER_FIX
    )
    train_ids, val_ids = split_validation(
        doc_ids, val_fraction if config.val_every else 0.0, config.val_max_docs, config.seed
    )
    optimizer = optimizer or functools.partial(torch.optim.AdamW, lr=1e-6, weight_decay=0.0)
    module = GRPOModule(
        summarizer,
        reward,
        docs,
        optimizer,
        config=config,
        scheduler=scheduler,
        val_doc_ids=val_ids,
        out_dir=out_dir,
    )
    batches = RolloutBatches(
        train_ids, config.prompts_per_step, config.steps, config.seed, start=lambda: module.completed_steps
    )
    callbacks = list(extra.pop("callbacks", None) or [])
    checkpoint = StepCheckpoint(out_dir / "checkpoints", config.checkpoint_every * config.num_iterations)
    if config.checkpoint_every:
        callbacks.append(checkpoint)
    trainer = make_trainer(
        extra,
        defaults={
            "accelerator": "auto",
            "devices": 1,
            "precision": "32-true",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
        },
        owned={
            "callbacks": callbacks,
            "max_steps": config.steps * config.num_iterations,
            "max_epochs": 1,  # one pass over `batches`, which holds every step (several epochs of documents)
            "logger": loggers if loggers else False,
            "enable_checkpointing": False,  # StepCheckpoint writes last.ckpt
            "limit_val_batches": 0,  # validation runs inside training_step, at chosen steps
            "use_distributed_sampler": False,
        },
        owner="run_grpo",
        fix=_TRAINER_FIX,
    )
    resume = checkpoint.last if checkpoint.last.is_file() else None
    if resume is not None:
        log.info("GRPO: resuming from %s", resume)
    device = next(summarizer.model.parameters()).device
    modes = (summarizer.training, summarizer.model.training)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            for message in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            trainer.fit(module, train_dataloaders=batches, ckpt_path=str(resume) if resume else None)
    finally:
        module.finalize()
        completed = trainer.global_step // config.num_iterations  # module.completed_steps, before detaching
        autocast = module.autocast_dtype()
        # the trained summarizer would keep the trainer (and AdamW's two moments per weight) alive
        release_fit(trainer, module)
        module.reference = None
        summarizer.to(device)
        summarizer.train(modes[0])
        summarizer.model.train(modes[1])
    seconds = time.perf_counter() - t0
    export, history_path, curves = (
        out_dir / "summarizer",
        out_dir / "grpo_history.jsonl",
        out_dir / "grpo_curves.png",
    )
    if trainer.is_global_zero:  # every rank holds the same policy; one writes it
        summarizer.save_pretrained(export)
        write_history(module.history, history_path)
        plot_history(module.history, curves)
    stats = {
        "steps": completed,
        **history_stats(module.history),
        "seconds": round(seconds, 2),
        "resumed": resume is not None,
        "autocast": "off" if autocast is None else dtype_name(autocast),  # what the update's forwards ran in
        "train_docs": len(train_ids),
        "val_docs": len(val_ids),
        "summarizer": str(export),
        "history": str(history_path),
        "curves": str(curves),
    }
    if trainer.is_global_zero:
        atomic_write_json(out_dir / "grpo_stats.json", stats)
    distributed.barrier()  # the exported summarizer is on disk before any rank reads it
    if trainer.is_global_zero:  # the export supersedes the mid-round checkpoints
        shutil.rmtree(checkpoint.dirpath, ignore_errors=True)
    log.info("GRPO finished: %s", {k: v for k, v in stats.items() if not isinstance(v, str)})
    return stats
