"""The policy update of one GRPO step: log-probs, the off-policy weights, the loss and the optimizer.

`PolicyUpdate` is the half of `resume.grpo.module.GRPOModule` that turns one rollout batch (its
completions and group-relative advantages) into `num_iterations` optimizer steps: each pass packs the
batch into `mini_batch_size` chunks (each prompt run once for its rows: `logps.shared_prompt_logps`,
or `logps.prefix_tree_logps` under gradient checkpointing), computes `loss.grpo_loss` with the
reference's log-probs when `beta > 0` and the truncated importance weights when the engine samples
in another dtype than the policy trains in, accumulates the gradients chunk by chunk, clips their
norm and steps the optimizer and the lr schedule once. The module's other half schedules the step
(rollouts, rewards, advantages, weight sync), validation and checkpoints.

A mixin of the Lightning module: it reads the module's `config` (`GRPOConfig`), `policy`,
`reference`, `_peft`, `rollout`, `summarizer`, `pad_id`, `world` and `device`, and calls Lightning's
`optimizers()`, `lr_schedulers()` and `manual_backward`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from resume.grpo.head_logps import plain_head
from resume.grpo.history import merge_stats
from resume.grpo.logps import prefix_tree_logps, sequence_logps, shared_prompt_logps
from resume.grpo.loss import grpo_loss, importance_weights, microbatch_weight
from resume.grpo.rollouts import PackedBatch, pack_completions
from resume.grpo.tied_grad import tied_grad_in_place
from resume.summarizer.generate import Completion
from resume.utils import distributed
from resume.utils.devices import dtype_name, training_autocast_dtype
from resume.utils.memory import PhaseMeter, heap_reuse


class PolicyUpdate:
    """`num_iterations` optimizer steps on one rollout batch (`_update`), mixed into `GRPOModule`."""

    def _logps(self, model: torch.nn.Module, packed: PackedBatch) -> tuple[Tensor, Tensor]:
        with self._autocast():
            return self._logps_of(model, packed)

    def _logps_of(self, model: torch.nn.Module, packed: PackedBatch) -> tuple[Tensor, Tensor]:
        # Each prompt once per group (exact, ~3x fewer tokens at k=4): through a shared KV cache, or,
        # under gradient checkpointing (where HF turns the cache off), as one prefix-tree sequence.
        if self.config.shared_prompt:
            tree = self.config.gradient_checkpointing and model.training
            path = prefix_tree_logps if tree else shared_prompt_logps
            chunked = self.config.chunked_head and plain_head(model)
            if tree:  # padded to a few shapes where the forward autocasts (see autocast_bucket)
                bucket = self.config.autocast_bucket if self.autocast_dtype() is not None else 0
                return path(model, packed, self.rollout.temperature, chunked_head=chunked, bucket=bucket)
            return path(model, packed, self.rollout.temperature, chunked_head=chunked)
        return sequence_logps(
            model,
            packed.input_ids.to(self.device),
            packed.attention_mask.to(self.device),
            packed.width,
            self.rollout.temperature,
        )

    @torch.no_grad()
    def _reference_logps(self, packed: PackedBatch) -> Tensor:
        if self._peft is not None:
            with self._peft.disable_adapter():
                return self._logps(self.policy, packed)[0]
        assert self.reference is not None
        self.reference.eval()  # Lightning's train() reaches every submodule
        return self._logps(self.reference, packed)[0]

    def importance_sampling_mode(self, completions: Sequence[Completion]) -> str | None:
        """The off-policy correction this batch gets (`config.importance_sampling`), or None.

        `auto` corrects when the engine reported log-probs and generates in another dtype than the
        policy trains in (a bf16 vLLM engine, an fp32 policy), or the training forward runs under
        autocast (`config.autocast`): its samples come from slightly other probabilities than the
        training forward's. With fp32 on both sides and synced weights the rollouts are on-policy.
        """
        setting = self.config.importance_sampling
        has_logps = all(c.logprobs is not None for c in completions)
        if setting == "off":
            return None
        if setting != "auto":
            if not has_logps:
                raise ValueError(
                    f"grpo.config.importance_sampling={setting} needs the engine's log-probs, and the "
                    f"{self.summarizer.backend_info().get('engine')} backend reports none; use "
                    "summarizer/backend=vllm (logprobs: true) or importance_sampling=off"
                )
            return setting
        engine_dtype = self.summarizer.backend_info().get("dtype")
        policy_dtype = dtype_name(next(self.policy.parameters()).dtype)
        same = engine_dtype == policy_dtype and self.autocast_dtype() is None
        return "token_truncate" if has_logps and not same else None

    def _update(self, completions: Sequence[Completion], advantages: Tensor) -> dict[str, float]:
        """`num_iterations` optimizer steps on one rollout batch (this rank's rows of it); returns the
        loss statistics of the whole batch."""
        cfg = self.config
        rank, world = self.world
        size = len(completions)  # the global batch: normalisations count every rank's rows
        own = size // world
        first, last = rank * own, (rank + 1) * own
        per_pass = cfg.mini_batch_size or own
        chunks = [
            pack_completions(
                completions[i : min(i + per_pass, last)], self.pad_id, slice(i, min(i + per_pass, last))
            )
            for i in range(first, last, per_pass)
        ]
        num_tokens = float(sum(c.num_tokens for c in completions))
        advantages = advantages.to(self.device)
        is_mode = self.importance_sampling_mode(completions)
        meter = PhaseMeter()
        meter.mark("start")
        # The log-probs of the policy before this batch's update: a pass of their own only when mu > 1.
        # At mu = 1 the training forward runs on those same weights, so its detached log-probs are them
        # (TRL's on-policy shortcut), and the off-policy weights of another engine are taken from it.
        with torch.no_grad(), meter("old_logps"):
            need_old = cfg.num_iterations > 1
            old = [self._logps(self.policy, ch)[0] if need_old else None for ch in chunks]
        with meter("ref_logps"):
            ref = [self._reference_logps(ch) if cfg.beta > 0 else None for ch in chunks]
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        parts: list[tuple[Mapping[str, float], float]] = []
        losses, norms, lrs = [], [], []
        for _ in range(cfg.num_iterations):
            optimizer.zero_grad()
            if cfg.preallocate_grads and self._single_process():
                # zeros before the first forward, so no backward allocates them among its heap blocks
                # (reuse_heap); autograd then adds into them: the same values (0 + g is g)
                for p in trainable:
                    p.grad = torch.zeros_like(p)
            pass_loss = 0.0
            for i, (chunk, old_logps, ref_logps) in enumerate(zip(chunks, old, ref)):
                with meter("forward"), self._tied_grad():
                    logps, entropies = self._logps(self.policy, chunk)
                    is_w, is_stats = None, {}
                    if is_mode is not None:  # against the policy before the update (mu = 1: this forward)
                        before = logps.detach() if old_logps is None else old_logps
                        is_w, is_stats = self._is_weights(chunk, before, is_mode)
                    loss, stats = grpo_loss(
                        logps,
                        old_logps,
                        advantages[chunk.rows],
                        chunk.completion_mask.to(self.device),
                        loss_type=cfg.loss_type,
                        epsilon_low=cfg.epsilon_low,
                        epsilon_high=cfg.epsilon_high,
                        beta=cfg.beta,
                        ref_logps=ref_logps,
                        delta=cfg.delta,
                        kl_ratio_correction=cfg.kl_ratio_correction,
                        max_completion_length=self.rollout.max_new_tokens,
                        num_active_tokens=num_tokens,
                        entropies=entropies,
                        is_weights=is_w,
                        prefix="train/",
                    )
                stats = {**stats, **is_stats}
                weight = microbatch_weight(cfg.loss_type, chunk.rows.stop - chunk.rows.start, size)
                # DDP averages the ranks' gradients: x world makes it their sum, the whole batch's
                # gradient. Only the pass's last backward all-reduces; the others accumulate locally.
                # With reuse_heap the backward's blocks (recomputed activations, their gradients) come
                # from the heap, its free pages returned at the end (memory.heap_reuse); the forward's
                # saved tensors stay in their own mappings, so they do not pin heap pages.
                reuse = heap_reuse() if cfg.reuse_heap else contextlib.nullcontext()
                with reuse, self._no_sync(i < len(chunks) - 1), meter("backward"):
                    self.manual_backward(loss * (weight * world))
                pass_loss += float(loss.detach()) * weight
                parts.append((stats, float(chunk.completion_mask.sum())))
            with meter("optimizer"):
                norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
                lrs.append(optimizer.optimizer.param_groups[0]["lr"])
                optimizer.step()
                optimizer.zero_grad()  # set to None: the next rollouts and weight sync run without them
                if scheduler is not None:
                    scheduler.step()
            losses.append(pass_loss)
            norms.append(float(norm))
        if world > 1:  # every rank logs the whole batch's statistics
            gathered = distributed.all_gather((parts, losses))
            parts = [p for ranks_parts, _ in gathered for p in ranks_parts]
            losses = [float(sum(pass_losses)) for pass_losses in zip(*(ls for _, ls in gathered))]
        stats = merge_stats(parts)
        stats["train/loss"] = float(np.mean(losses))
        stats["train/grad_norm"] = float(np.mean(norms))
        stats["train/lr"] = float(lrs[0])
        stats.update(meter.record("update_"))  # this rank's: time/update_forward, mem/update_forward_mb, ...
        return stats

    def _is_weights(
        self, chunk: PackedBatch, policy_logps: Tensor, mode: str
    ) -> tuple[Tensor, dict[str, float]]:
        """Truncated importance weights of `chunk`'s tokens: the policy's log-probs before the update
        against the engine's sampling log-probs (`loss.importance_weights`), and their statistics."""
        assert chunk.sampling_logps is not None
        cfg = self.config
        w, w_stats = importance_weights(
            policy_logps,
            chunk.sampling_logps.to(self.device),
            chunk.completion_mask.to(self.device),
            mode=mode,
            cap=cfg.importance_sampling_cap,
            floor=cfg.importance_sampling_floor,
        )
        return w, {f"train/{k}": v for k, v in w_stats.items()}

    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the log-prob forwards autocast to (`config.autocast` on this device), or None."""
        return training_autocast_dtype(self.config.autocast, self.device)

    def _autocast(self) -> Any:
        """`torch.autocast` to `autocast_dtype()` around a log-prob forward, or nothing. Under gradient
        checkpointing without the weight-cast cache: each layer casts its weights as it runs (and again in
        its recompute), so no bf16 copy of the model outlives its layer; without checkpointing the
        backward keeps every cast anyway, and the cache casts each weight once."""
        dtype = self.autocast_dtype()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(
            self.device.type, dtype=dtype, cache_enabled=not self.config.gradient_checkpointing
        )

    def _tied_grad(self) -> Any:
        """`tied_grad_in_place` around a training forward: one process holding whole weights only (its
        `.grad` writes bypass DDP's, FSDP's and DeepSpeed's gradient hooks)."""
        if self.config.tied_grad_in_place and self._single_process():
            return tied_grad_in_place(self.policy)
        return contextlib.nullcontext()

    def _single_process(self) -> bool:
        """Whether one process holds the whole weights (no DDP, FSDP or DeepSpeed hooks on `.grad`)."""
        from pytorch_lightning.strategies import SingleDeviceStrategy

        trainer = self._trainer
        return trainer is None or isinstance(trainer.strategy, SingleDeviceStrategy)

    def _no_sync(self, skip: bool) -> Any:
        """DDP's `no_sync` (gradients accumulate locally, no all-reduce) when `skip`; else nothing."""
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.nn.parallel import DistributedDataParallel

        wrapped = self._trainer.model if self._trainer is not None else None
        # DeepSpeed's engine refuses no_sync under ZeRO-2/3 and reduces partitioned gradients itself.
        if skip and isinstance(wrapped, (DistributedDataParallel, FullyShardedDataParallel)):
            return wrapped.no_sync()
        return contextlib.nullcontext()
