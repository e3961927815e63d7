"""GRPO training of the summarizer (step 1 of each ReSuMe iteration): the Lightning module of one step.

One training step is one GRPO rollout batch (METHOD.md, "GRPO"):

1. rollouts: `prompts_per_step` documents x `num_generations` completions sampled from the
   current policy (eval mode, no grad) with seed `config.seed + step`;
2. rewards: `reward.compute(texts, doc_ids)`, the frozen retriever's reward; its negative
   sampler is reseeded with `config.seed + step`;
3. group-relative advantages (`advantages.group_advantages`);
4. no-grad log-probs of the sampling policy (only when `num_iterations > 1` or when the
   off-policy correction is on; otherwise the detached current ones, TRL's shortcut) and of the
   reference policy (only when `beta > 0`); with the correction, the truncated importance
   weights from the engine's log-probs (`loss.importance_weights`);
5. `num_iterations` optimisation passes; each accumulates gradients over mini-batches of
   `mini_batch_size` sequences (each prompt run once for its rows: `logps.shared_prompt_logps`),
   clips the gradient norm and steps the optimizer and the lr schedule once;
6. the new weights are synced into the generation engine (`summarizer.sync_weights()`).

On N ranks (Lightning's `ddp` strategy, e.g. under torchrun: `trainer=ddp`) `prompts_per_step` is
the global batch: rank r generates the rollouts of its contiguous 1/N of the step's documents
(whole groups: a group never spans ranks), the completions are all-gathered so that every rank
computes the rewards and advantages of the whole batch (exactly the single-process numbers), and
each rank backpropagates its own rows with the loss normalised by the GLOBAL batch (tokens for
`dapo`, sequences otherwise) and multiplied by N, since DDP averages the all-reduced gradients.
Only a step's last backward all-reduces (`no_sync` before it). N ranks x P/N prompts then take the
step one process takes on P prompts (with `seed_per_prompt`, the same rollouts too). Under sharding
strategies (FSDP, DeepSpeed ZeRO-3) rollouts and the weight sync run inside
`distributed.full_parameters`, which gathers the whole policy.

The maths are `resume.grpo.advantages`, `loss` and `logps` (checked against TRL); steps 4-5, the
update on one rollout batch, are `resume.grpo.update.PolicyUpdate`, mixed in; this module schedules.
Everything random inside a step (sampling, negatives, dropout) is seeded by the step number,
so a run resumed from a checkpoint replays exactly what an uninterrupted run would have done.
`resume.grpo.trainer.run_grpo` builds it and runs the Lightning `Trainer`.

The reward is anything with `compute(completions: list[str], doc_ids: list[str])` returning an
object with a `total` tensor `[B]` and `log_dict(prefix) -> dict[str, float]` (a
`resume.rewards.RewardBatch`); an optional `reseed(seed)` makes its sampling reproducible.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from resume.grpo.advantages import group_advantages, zero_variance_fraction
from resume.grpo.config import RESUMABLE_CHANGES, GRPOConfig
from resume.grpo.history import finite, sample_rows, write_history, write_samples
from resume.grpo.lora import add_lora
from resume.grpo.rollouts import doc_pair
from resume.grpo.tree_attention import use_tree_attention
from resume.grpo.update import PolicyUpdate
from resume.summarizer.generate import Completion, GenerationParams, mark_weights_written
from resume.utils import distributed
from resume.utils.devices import dtype_name, seeded
from resume.utils.memory import PhaseMeter
from resume.utils.optim import decay_groups

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # params -> optimizer
# (optimizer, total_steps=) -> scheduler
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
# The reward's negatives for validation: one fixed draw, apart from every step's.
VAL_SEED_OFFSET = 1_000_000_007
# Without seed_per_prompt, rank r samples with seed + step + r * RANK_SEED_STRIDE: its own stream.
RANK_SEED_STRIDE = 7_919


class GRPOModule(PolicyUpdate, pl.LightningModule):
    """GRPO on a `SummarizerModule`'s causal LM (manual optimisation, one rollout batch per step).

    Args:
        summarizer: its `.model` is the policy, trained in place; `summarize` makes rollouts.
        reward: `compute(texts, doc_ids) -> RewardBatch`-like (see the module docstring).
        docs: doc id -> `Document` (or `(title, text)`) for every id a batch may name.
        optimizer: factory `params -> Optimizer`, e.g. `functools.partial(torch.optim.AdamW, lr=1e-6)`;
            1-D parameters (norms, biases) get no weight decay.
        config: the hyper-parameters.
        scheduler: factory `(optimizer, total_steps=) -> LRScheduler` stepped once per optimizer
            step (`lr_schedule`); None = constant learning rate.
        val_doc_ids: held-out documents for greedy validation (empty = no validation).
        out_dir: where sample tables (`samples/`) and `grpo_history.jsonl` go.
    """

    def __init__(
        self,
        summarizer: Any,
        reward: Any,
        docs: Mapping[str, Any],
        optimizer: OptimizerFactory,
        config: GRPOConfig | None = None,
        scheduler: SchedulerFactory | None = None,
        val_doc_ids: Sequence[str] = (),
        out_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.config = config = config or GRPOConfig()
        self.summarizer = summarizer
        self.reward = reward
        self.docs = docs
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_doc_ids = list(val_doc_ids)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        missing = [d for d in self.val_doc_ids if d not in docs]
        if missing:
            raise KeyError(f"validation doc ids {missing[:5]} are not in docs")

        overrides = {
            name: getattr(config, name)
            for name in ("temperature", "top_p", "top_k", "max_new_tokens")
            if getattr(config, name) is not None
        }
        self.rollout: GenerationParams = replace(
            summarizer.rollout_generation,
            do_sample=True,
            num_return_sequences=config.num_generations,
            seed=config.seed,
            seed_per_prompt=config.seed_per_prompt,
            **overrides,
        )
        self.greedy = GenerationParams(do_sample=False, max_new_tokens=self.rollout.max_new_tokens)
        tok = summarizer.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

        policy = summarizer.model
        self._peft: Any = None
        self._requires_grad = {name: p.requires_grad for name, p in policy.named_parameters()}
        if config.lora is not None:  # kept unregistered: the weights are already under summarizer.model
            object.__setattr__(self, "_peft", add_lora(policy, config.lora))
        if config.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # switched back in finalize; None when off or the model is not on SDPA
        self._restore_attention: Callable[[], None] | None = None
        if config.tree_attention and config.shared_prompt and config.gradient_checkpointing:
            self._restore_attention = use_tree_attention(policy)
        # The reference (initial policy): with LoRA the base model itself (adapters disabled), else a
        # frozen copy, made only when the KL term needs it.
        self.reference: torch.nn.Module | None = None
        if config.beta > 0 and self._peft is None:
            self.reference = copy.deepcopy(policy).requires_grad_(False).eval()
        trainable = [p for p in policy.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the summarizer has no trainable parameter")
        low = sorted({str(p.dtype) for p in trainable if p.dtype != torch.float32})
        if low:
            log.warning(
                "GRPO trains %s master weights: updates below their resolution vanish at small learning "
                "rates; build the summarizer with dtype fp32 and set trainer_kwargs.precision=bf16-mixed",
                low,
            )
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup
    @property
    def policy(self) -> torch.nn.Module:
        return self.summarizer.model

    @property
    def completed_steps(self) -> int:
        """GRPO steps already taken (each took `num_iterations` optimizer steps)."""
        return self.trainer.global_step // self.config.num_iterations

    @property
    def world(self) -> tuple[int, int]:
        """(this rank, the number of ranks) of the trainer; (0, 1) outside one."""
        trainer = self._trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str) -> None:
        world = self.world[1]
        if self.config.prompts_per_step % world:
            raise ValueError(
                f"grpo.config.prompts_per_step={self.config.prompts_per_step} is the global batch, so a "
                f"multiple of the world size {world} (each rank takes an equal share of whole groups)"
            )

    def on_train_start(self) -> None:
        # from_pretrained returns models in eval mode and Lightning keeps modes as it finds them; the policy
        # trains in train mode (dropout as TRL, and HF gradient checkpointing is only active in training).
        self.policy.train()
        if self.reference is not None:
            self.reference.eval()
        amp = self.autocast_dtype()
        log.info(
            "GRPO update: log-prob forwards in %s (grpo.config.autocast=%s on %s)",
            "fp32" if amp is None else f"{dtype_name(amp)} autocast",
            self.config.autocast,
            self.device,
        )

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(decay_groups(self.policy.named_parameters()))
        if self.scheduler_factory is None:
            return optimizer
        total = self.config.steps * self.config.num_iterations
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def _unsaved_keys(self) -> set[str]:
        """State-dict keys a checkpoint leaves out: frozen weights (the reference, LoRA's base model).
        GRPO never changes them, and a resumed run rebuilds them from the same initial model."""
        keys = {n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return keys | {k for k in self.state_dict() if k.startswith("reference.")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        unsaved = self._unsaved_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in unsaved}
        checkpoint["grpo"] = {"config": asdict(self.config), "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("grpo", {})
        current = asdict(self.config)
        changed = {
            k: (v, current.get(k))
            for k, v in saved.get("config", {}).items()
            if k not in RESUMABLE_CHANGES and current.get(k) != v
        }
        if changed:
            raise ValueError(
                f"the checkpoint was written by a GRPO run with other settings {changed} (checkpoint, now); "
                "resume with the same grpo.config, or delete <out_dir>/checkpoints to start over"
            )
        self.history = list(saved.get("history", []))
        own = self.state_dict()
        for key in self._unsaved_keys():
            checkpoint["state_dict"].setdefault(key, own[key])

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: Sequence[str], batch_idx: int) -> None:
        cfg = self.config
        step = self.completed_steps
        record: dict[str, float] = {}
        final: dict[str, float] = {}
        t0 = time.perf_counter()
        with seeded(cfg.seed + step, self.device):
            if self.val_doc_ids and cfg.val_every and step % cfg.val_every == 0:
                record.update(self._validate())
            record.update(self._grpo_step(list(batch), step))
            if self.val_doc_ids and cfg.val_every and step + 1 == cfg.steps:
                final = self._validate()  # the trained policy, after the last update
        record["time/step"] = time.perf_counter() - t0
        self.log_dict(
            {f"summarizer/{k}": v for k, v in record.items() if math.isfinite(v)},
            on_step=True,
            on_epoch=False,
            batch_size=cfg.batch_size,
        )
        self.history.append({"step": step, **{k: finite(v) for k, v in record.items()}})
        if final:
            self.history.append({"step": step + 1, **{k: finite(v) for k, v in final.items()}})
            for logger in self.loggers:  # logged at step `steps`: self.log would file it under this step
                logger.log_metrics(
                    {f"summarizer/{k}": v for k, v in final.items() if math.isfinite(v)}, step + 1
                )
        self._write_history()
        log.info(
            "grpo step %d/%d: reward %.3f, separator %.2f, length %.1f, kl %.4f, %.1fs",
            step + 1,
            cfg.steps,
            record.get("train/reward_mean", math.nan),
            record.get("train/separator_rate", math.nan),
            record.get("train/completion_length", math.nan),
            record.get("train/kl", math.nan),
            record["time/step"],
        )

    def _reseed_reward(self, seed: int) -> None:
        reseed = getattr(self.reward, "reseed", None)
        if callable(reseed):
            reseed(seed)

    def _generate(self, doc_ids: list[str], params: GenerationParams) -> list[Completion]:
        """Completions of `doc_ids` (group-major), each rank generating a contiguous share, gathered in
        order on every rank (shares may be uneven: validation batches need not divide by N)."""
        rank, world = self.world
        share = [list(part) for part in np.array_split(np.asarray(doc_ids, dtype=object), world)][rank]
        with distributed.full_parameters(self._trainer):
            mine = self.summarizer.summarize([doc_pair(self.docs[d]) for d in share], params) if share else []
        return [c for part in distributed.all_gather(mine) for c in part] if world > 1 else mine

    def _grpo_step(self, doc_ids: list[str], step: int) -> dict[str, float]:
        cfg = self.config
        k = cfg.num_generations
        rank = self.world[0]
        seed = cfg.seed + step + (0 if cfg.seed_per_prompt else RANK_SEED_STRIDE * rank)
        meter = PhaseMeter()  # time/generate, time/reward, time/update and the RSS as each ends
        meter.mark("step_start")
        with meter("generate"):
            completions = self._generate(doc_ids, replace(self.rollout, seed=seed))
        group_ids = [d for d in doc_ids for _ in range(k)]
        with meter("reward"):
            self._reseed_reward(cfg.seed + step)
            rewards = self.reward.compute([c.text for c in completions], group_ids)
            total = torch.as_tensor(rewards.total, dtype=torch.float32).flatten()
            advantages = group_advantages(
                total, k, kind=cfg.advantage, scale=cfg.scale_rewards, temperature=cfg.advantage_temperature
            )
        if cfg.release_engine_in_update:  # the sync below loads the new weights into the engine again
            self.summarizer.release_engine_weights()
        with meter("update"):
            stats = self._update(completions, advantages)
            mark_weights_written(self.policy.parameters())  # however the optimizer wrote them
        with distributed.full_parameters(self._trainer):  # the next rollouts come from the new weights
            sync = self.summarizer.sync_weights()

        lengths = torch.tensor([c.num_tokens for c in completions], dtype=torch.float32)
        stats.update(
            {
                **{k_: float(v) for k_, v in rewards.log_dict("train").items()},
                "train/zero_variance_fraction": zero_variance_fraction(total, k),
                "train/advantage_abs_mean": float(advantages.abs().mean()),
                "train/completion_length": float(lengths.mean()),
                "train/completion_length_min": float(lengths.min()),
                "train/completion_length_max": float(lengths.max()),
                "train/truncated_fraction": float(np.mean([not c.finished for c in completions])),
                "train/tokens": float(lengths.sum()),
                **meter.record(),
                "time/sync": sync,
            }
        )
        if cfg.log_completions_every and step % cfg.log_completions_every == 0 and rank == 0:
            self._log_samples(step, group_ids, completions, rewards, advantages)
        return stats

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Sequence[str], batch_idx: int = 0) -> dict[str, float]:
        """Greedy summaries of `batch` (doc ids) scored by the reward: `val/*` statistics."""
        completions = self._generate(list(batch), self.greedy)
        rewards = self.reward.compute([c.text for c in completions], list(batch))
        stats = {k: float(v) for k, v in rewards.log_dict("val").items()}
        stats["val/tokens"] = float(sum(c.num_tokens for c in completions))
        stats["val/completion_length"] = stats["val/tokens"] / max(1, len(completions))
        if self.trainer.validating:  # run by trainer.validate(); inside fit, training_step logs it
            self.log_dict(
                {f"summarizer/{k}": v for k, v in stats.items() if math.isfinite(v)}, batch_size=len(batch)
            )
        return stats

    def _validate(self) -> dict[str, float]:
        """The current policy on the held-out documents (one fixed draw of the reward's negatives)."""
        t0 = time.perf_counter()
        self._reseed_reward(self.config.seed + VAL_SEED_OFFSET)
        stats = self.validation_step(self.val_doc_ids)
        stats["time/validate"] = time.perf_counter() - t0
        return stats

    # ------------------------------------------------------------------ outputs
    def _log_samples(
        self,
        step: int,
        doc_ids: Sequence[str],
        completions: Sequence[Completion],
        rewards: Any,
        advantages: Tensor,
    ) -> None:
        rows = sample_rows(
            step,
            doc_ids,
            completions,
            rewards,
            advantages,
            self.summarizer.separator,
            self.config.log_completions_rows,
        )
        write_samples(rows, step, self.out_dir, self.loggers)

    def _write_history(self) -> None:
        if self.out_dir is not None and self.world[0] == 0:
            write_history(self.history, self.out_dir / "grpo_history.jsonl")

    def finalize(self) -> None:
        """Hand the summarizer back as a plain model: LoRA merged, checkpointing off, grads as before."""
        policy = self.policy
        if self._peft is not None:
            merged = self._peft.merge_and_unload()
            assert merged is policy, "peft merged into a new model object; the summarizer would not see it"
            object.__setattr__(self, "_peft", None)
        if self._restore_attention is not None:
            self._restore_attention()
            self._restore_attention = None
        if self.config.gradient_checkpointing:
            policy.gradient_checkpointing_disable()
        for name, p in policy.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
            p.grad = None  # the last step's gradients: a model's worth of memory the next phases never use
