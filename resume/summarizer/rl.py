"""GRPO training of the summarizer (step 1 of each ReSuMe iteration), as a Lightning module.

One training step is one GRPO rollout batch (METHOD.md, "GRPO"):

1. rollouts: `prompts_per_step` documents x `num_generations` completions sampled from the
   current policy (eval mode, no grad) with seed `config.seed + step`;
2. rewards: `reward.compute(texts, doc_ids)`, the frozen retriever's reward; its negative
   sampler is reseeded with `config.seed + step`;
3. group-relative advantages (`grpo.group_advantages`);
4. no-grad log-probs of the sampling policy (only when `num_iterations > 1`; otherwise the
   detached current ones, TRL's shortcut) and of the reference policy (only when `beta > 0`);
5. `num_iterations` optimisation passes; each accumulates gradients over mini-batches of
   `mini_batch_size` sequences, clips the gradient norm and steps the optimizer and the lr
   schedule once.

The maths are `resume.summarizer.grpo` (checked against TRL); this module only schedules
them. Everything random inside a step (sampling, negatives, dropout) is seeded by the step
number, so a run resumed from `<out_dir>/checkpoints/last.ckpt` replays exactly what an
uninterrupted run would have done. `run_grpo` is the entry point the loop calls.

The reward is anything with `compute(completions: list[str], doc_ids: list[str])` returning an
object with a `total` tensor `[B]` and `log_dict(prefix) -> dict[str, float]` (a
`resume.reward.RewardBatch`); an optional `reseed(seed)` makes its sampling reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from resume.summarizer.generate import Completion, GenerationParams
from resume.summarizer.grpo import ADVANTAGE_KINDS, LOSS_TYPES, group_advantages, grpo_loss, sequence_logps
from resume.summarizer.parsing import parse_completion
from resume.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "GRPOConfig",
    "GRPOModule",
    "RolloutBatches",
    "StepCheckpoint",
    "lr_schedule",
    "pack_completions",
    "plot_history",
    "run_grpo",
    "split_validation",
]

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # params -> optimizer
SchedulerFactory = Callable[
    ..., torch.optim.lr_scheduler.LRScheduler
]  # (optimizer, total_steps=) -> scheduler
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
VAL_SEED_OFFSET = (
    1_000_000_007  # the reward's negatives for validation: one fixed draw, apart from every step's
)
# Fields that may differ between a checkpoint and the run resuming it (they do not change the steps taken).
RESUMABLE_CHANGES = (
    "steps",
    "log_completions_every",
    "log_completions_rows",
    "val_every",
    "val_max_docs",
    "checkpoint_every",
)


# --------------------------------------------------------------------------- configuration
@dataclass
class GRPOConfig:
    """Hyper-parameters of one GRPO run (names follow TRL's `GRPOConfig` where one exists).

    Rollout sampling is the summarizer's `rollout_generation` with the non-null overrides
    below (`temperature`, `top_p`, `top_k`, `max_new_tokens`), `num_return_sequences =
    num_generations` and `seed = seed + step`.
    """

    steps: int = 20  # GRPO steps = rollout batches (each makes num_iterations optimizer steps)
    num_generations: int = 4  # k, completions per prompt (the group)
    prompts_per_step: int = 4  # documents per rollout batch; batch = prompts_per_step * k sequences
    num_iterations: int = 1  # mu, optimisation passes over each rollout batch (TRL num_iterations)
    mini_batch_size: int | None = None  # sequences per forward/backward (gradient accumulation); None = all
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo (TRL names; dapo is TRL 1.16's default)
    epsilon_low: float = 0.2  # clip range below 1
    epsilon_high: float = 0.2  # clip range above 1 (DAPO's clip-higher uses 0.28)
    delta: float | None = None  # optional cap on the unclipped ratio (TRL delta); None = off
    beta: float = 0.0  # KL coefficient to the frozen initial policy (k3); 0 = no reference model
    kl_ratio_correction: bool = True  # weight the KL by the ratio (TRL use_bias_correction_kl)
    advantage: str = "zscore"  # zscore (standard GRPO) | softmax (the paper's Eq. 1)
    advantage_temperature: float = 0.5  # softmax temperature (the paper's beta = 0.5)
    scale_rewards: bool = True  # zscore: divide by the group std (False = Dr. GRPO)
    max_grad_norm: float | None = 1.0  # gradient clipping; None = no clipping (the norm is still logged)
    temperature: float | None = None  # rollout sampling overrides; None = summarizer.rollout_generation's
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    gradient_checkpointing: bool = False  # recompute activations in backward (memory for compute)
    lora: dict[str, Any] | None = None  # None = full fine-tuning; else {r, alpha, dropout, target_modules}
    log_completions_every: int = 10  # write a table of sample completions every N steps; 0 = never
    log_completions_rows: int = 32  # rows per table (whole groups first)
    val_every: int = 10  # greedy validation every N steps (step 0 and the end included); 0 = never
    val_max_docs: int | None = 32  # cap on the held-out validation documents
    checkpoint_every: int = 10  # write checkpoints/last.ckpt every N steps (and at the end); 0 = never
    seed: int = 0  # rollout sampling, negatives, dropout and document order all derive from it

    def __post_init__(self) -> None:
        def fail(rule: str) -> None:
            raise ValueError(f"{rule}; fix grpo.config in the config (conf/grpo/*.yaml)")

        def at_least(name: str, low: int, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or value < low:
                fail(f"{name} ({value}) must be an integer >= {low}" + (" or null" if allow_none else ""))

        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            fail(
                f"num_generations ({self.num_generations}) must be >= 2 for group-relative advantages: "
                "set num_generations>=2"
            )
        for name in ("steps", "prompts_per_step", "num_iterations"):
            at_least(name, 1)
        at_least("mini_batch_size", 1, allow_none=True)
        for name in ("log_completions_every", "log_completions_rows", "val_every", "checkpoint_every"):
            at_least(name, 0)
        at_least("val_max_docs", 1, allow_none=True)
        at_least("max_new_tokens", 1, allow_none=True)
        at_least("top_k", 0, allow_none=True)
        if self.loss_type not in LOSS_TYPES:
            fail(f"loss_type={self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if self.advantage not in ADVANTAGE_KINDS:
            fail(f"advantage={self.advantage!r} is not one of {', '.join(ADVANTAGE_KINDS)}")
        if self.advantage_temperature <= 0:
            fail(f"advantage_temperature ({self.advantage_temperature}) must be > 0")
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            fail(f"epsilon_low ({self.epsilon_low}) and epsilon_high ({self.epsilon_high}) must be >= 0")
        if self.epsilon_low >= 1:
            fail(f"epsilon_low ({self.epsilon_low}) must be < 1: the lower clip bound is 1 - epsilon_low")
        if self.delta is not None and self.delta <= 1 + self.epsilon_high:
            fail(f"delta ({self.delta}) must be > 1 + epsilon_high ({1 + self.epsilon_high}), or null (off)")
        if self.beta < 0:
            fail(f"beta ({self.beta}) must be >= 0 (0 disables the KL term and the reference model)")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            fail(f"max_grad_norm ({self.max_grad_norm}) must be > 0, or null for no clipping")
        if self.temperature is not None and self.temperature <= 0:
            fail(f"temperature ({self.temperature}) must be > 0: GRPO samples its groups")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            fail(f"top_p ({self.top_p}) must be in (0, 1]")
        if self.lora is not None:
            self.lora = dict(self.lora)
            unknown = sorted(set(self.lora) - set(LORA_KEYS))
            if unknown:
                fail(f"lora has unknown keys {unknown}; allowed keys are {list(LORA_KEYS)}")
            if not isinstance(self.lora.get("r", 8), int) or self.lora.get("r", 8) < 1:
                fail(f"lora.r ({self.lora.get('r')}) must be an integer >= 1")
            if isinstance(self.lora.get("target_modules"), Sequence) and not isinstance(
                self.lora["target_modules"], str
            ):
                self.lora["target_modules"] = list(self.lora["target_modules"])

    @property
    def batch_size(self) -> int:
        """Sequences per rollout batch."""
        return self.prompts_per_step * self.num_generations


def lr_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, kind: str = "constant", warmup_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate multiplier per optimizer step: linear warmup over `warmup_ratio` of the steps,
    then `constant`, `linear` decay to 0 or `cosine` decay to 0 at `total_steps`."""
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr schedule kind={kind!r} must be constant, linear or cosine")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio ({warmup_ratio}) must be in [0, 1)")
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # never 0: the first step already learns
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- data
def split_validation(
    doc_ids: Sequence[str], fraction: float, max_docs: int | None, seed: int
) -> tuple[list[str], list[str]]:
    """(train, val): a seeded `fraction` of `doc_ids` (at most `max_docs`) is held out for validation."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction ({fraction}) must be in [0, 1)")
    ids = list(doc_ids)
    n_val = min(round(fraction * len(ids)), max_docs if max_docs is not None else len(ids))
    if fraction > 0 and len(ids) > 1:
        n_val = max(1, n_val)
    if n_val == 0:
        return ids, []
    held = set(np.random.default_rng([seed, 1]).permutation(len(ids))[:n_val].tolist())
    return [d for i, d in enumerate(ids) if i not in held], [d for i, d in enumerate(ids) if i in held]


class RolloutBatches:
    """The documents of every GRPO step: `steps` batches of `prompts_per_step` distinct doc ids.

    Epoch `e` is the permutation of `doc_ids` drawn from `numpy.random.default_rng([seed, e])`,
    cut into batches (an epoch's incomplete tail is dropped, so no batch holds a document
    twice). Iteration starts at step `start()` (the trainer's restored step when resuming), so
    the position lives in the checkpoint's global step; `state_dict`/`load_state_dict` only
    tell Lightning that this loader resumes correctly mid-epoch.
    """

    def __init__(
        self,
        doc_ids: Sequence[str],
        prompts_per_step: int,
        steps: int,
        seed: int = 0,
        start: Callable[[], int] = lambda: 0,
    ) -> None:
        if len(doc_ids) < prompts_per_step:
            raise ValueError(
                f"{len(doc_ids)} training documents cannot fill a batch of "
                f"prompts_per_step={prompts_per_step}; lower grpo.config.prompts_per_step or val_fraction, "
                "or use more documents"
            )
        self.doc_ids = list(doc_ids)
        self.prompts_per_step = prompts_per_step
        self.steps = steps
        self.seed = seed
        self.start = start
        self._per_epoch = len(self.doc_ids) // prompts_per_step
        self._epoch: tuple[int, list[str]] | None = None

    def batch(self, step: int) -> list[str]:
        epoch, index = divmod(step, self._per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.doc_ids))
            self._epoch = (epoch, [self.doc_ids[i] for i in order])
        return self._epoch[1][index * self.prompts_per_step : (index + 1) * self.prompts_per_step]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[str]]:
        for step in range(self.start(), self.steps):
            yield self.batch(step)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "prompts_per_step": self.prompts_per_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass  # the position is the trainer's global step, restored with the checkpoint


@dataclass
class PackedBatch:
    """Prompt + completion rows for one forward pass (TRL's layout).

    Prompts are LEFT-padded to the longest prompt and completions RIGHT-padded to the longest
    completion, so every row's completion sits in the last `width` columns, the ones
    `sequence_logps(..., logits_to_keep=width)` scores. (Right-padding whole prompt+completion
    rows would put a short row's prompt tokens in those columns.) Left padding shifts the
    positions of a short prompt, which rotary models (Llama, Qwen) do not see: attention depends
    on relative positions only.
    """

    input_ids: Tensor  # [B, P + C]
    attention_mask: Tensor  # [B, P + C]
    completion_mask: Tensor  # [B, C], 1 on completion tokens (EOS included when generated)
    rows: slice  # the rows of the rollout batch

    @property
    def width(self) -> int:
        return self.completion_mask.size(1)


def pack_completions(
    completions: Sequence[Completion], pad_id: int, rows: slice | None = None
) -> PackedBatch:
    """Pack `completions` into one batch (CPU tensors); see `PackedBatch`."""
    if not completions:
        raise ValueError("pack_completions got no completions")
    if any(c.num_tokens == 0 or c.prompt_length == 0 for c in completions):
        raise ValueError("every completion needs at least one prompt token and one generated token")
    prompt_width = max(c.prompt_length for c in completions)
    width = max(c.num_tokens for c in completions)
    ids = torch.full((len(completions), prompt_width + width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, c in enumerate(completions):
        start = prompt_width - c.prompt_length
        ids[row, start:prompt_width] = torch.tensor(c.prompt_ids, dtype=torch.long)
        ids[row, prompt_width : prompt_width + c.num_tokens] = torch.tensor(c.token_ids, dtype=torch.long)
        mask[row, start : prompt_width + c.num_tokens] = 1
    return PackedBatch(
        ids, mask, mask[:, prompt_width:], rows if rows is not None else slice(0, len(completions))
    )


def _doc_pair(doc: Any) -> tuple[str, str]:
    """A `Document` (or a (title, text) pair) as the summarizer's (title, text)."""
    if isinstance(doc, tuple):
        return doc
    return (getattr(doc, "title", "") or "", doc.text)


@contextlib.contextmanager
def _seeded_scope(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNGs inside the block and restore the caller's streams afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _merge_stats(parts: Sequence[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """Combine per-mini-batch stats: extremes by min/max, everything else token-weighted means."""
    merged: dict[str, float] = {}
    for key in dict.fromkeys(k for stats, _ in parts for k in stats):
        values = [(s[key], w) for s, w in parts if key in s and math.isfinite(s[key])]
        if not values:
            merged[key] = math.nan
        elif key.endswith("min"):
            merged[key] = min(v for v, _ in values)
        elif key.endswith("max"):
            merged[key] = max(v for v, _ in values)
        else:
            total = sum(w for _, w in values)
            merged[key] = sum(v * w for v, w in values) / total if total else math.nan
    return merged


# --------------------------------------------------------------------------- the module
class GRPOModule(pl.LightningModule):
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
            **overrides,
        )
        self.greedy = GenerationParams(do_sample=False, max_new_tokens=self.rollout.max_new_tokens)
        tok = summarizer.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

        policy = summarizer.model
        self._peft: Any = None
        self._requires_grad = {name: p.requires_grad for name, p in policy.named_parameters()}
        if config.lora is not None:  # kept unregistered: the weights are already under summarizer.model
            object.__setattr__(self, "_peft", self._add_lora(policy, config.lora))
        if config.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The reference (initial policy): with LoRA the base model itself (adapters disabled), else a
        # frozen copy, made only when the KL term needs it.
        self.reference: torch.nn.Module | None = None
        if config.beta > 0 and self._peft is None:
            given = getattr(summarizer, "reference_model", None)
            self.reference = given if given is not None else copy.deepcopy(policy)
            self.reference.requires_grad_(False).eval()
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
    @staticmethod
    def _add_lora(policy: torch.nn.Module, spec: Mapping[str, Any]) -> Any:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=int(spec.get("r", 8)),
            lora_alpha=int(spec.get("alpha", 16)),
            lora_dropout=float(spec.get("dropout", 0.0)),
            target_modules=spec.get("target_modules") or "all-linear",
            task_type="CAUSAL_LM",
        )
        # Adapters are injected into `policy`'s own modules, so the summarizer's model (and its generation
        # backend) runs the adapted policy with no change on their side.
        return get_peft_model(policy, lora)

    @property
    def policy(self) -> torch.nn.Module:
        return self.summarizer.model

    @property
    def completed_steps(self) -> int:
        """GRPO steps already taken (each took `num_iterations` optimizer steps)."""
        return self.trainer.global_step // self.config.num_iterations

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise ValueError(
                f"GRPOModule runs on one device (world size {self.trainer.world_size}): every rank would "
                "sample the same rollouts; set trainer_kwargs.devices=1"
            )

    def on_train_start(self) -> None:
        # from_pretrained returns models in eval mode and Lightning keeps modes as it finds them; the policy
        # trains in train mode (dropout as TRL, and HF gradient checkpointing is only active in training).
        self.policy.train()
        if self.reference is not None:
            self.reference.eval()

    def configure_optimizers(self) -> Any:
        params = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for _, p in params if p.ndim >= 2]},
            {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},  # norms, biases: no decay
        ]
        optimizer = self.optimizer_factory([g for g in groups if g["params"]])
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
        with _seeded_scope(cfg.seed + step, self.device):
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
        self.history.append({"step": step, **{k: _finite(v) for k, v in record.items()}})
        if final:
            self.history.append({"step": step + 1, **{k: _finite(v) for k, v in final.items()}})
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

    def _grpo_step(self, doc_ids: list[str], step: int) -> dict[str, float]:
        cfg = self.config
        k = cfg.num_generations
        t0 = time.perf_counter()
        completions = self.summarizer.summarize(
            [_doc_pair(self.docs[d]) for d in doc_ids], replace(self.rollout, seed=cfg.seed + step)
        )
        t1 = time.perf_counter()
        group_ids = [d for d in doc_ids for _ in range(k)]
        self._reseed_reward(cfg.seed + step)
        rewards = self.reward.compute([c.text for c in completions], group_ids)
        total = torch.as_tensor(rewards.total, dtype=torch.float32).flatten()
        advantages = group_advantages(
            total, k, kind=cfg.advantage, scale=cfg.scale_rewards, temperature=cfg.advantage_temperature
        )
        t2 = time.perf_counter()
        stats = self._update(completions, advantages)
        t3 = time.perf_counter()

        lengths = torch.tensor([c.num_tokens for c in completions], dtype=torch.float32)
        zero_std = torch.isclose(total.view(-1, k).std(dim=1), torch.zeros(len(doc_ids))).float().mean()
        stats.update(
            {
                **{k_: float(v) for k_, v in rewards.log_dict("train").items()},
                "train/zero_variance_fraction": float(zero_std),
                "train/advantage_abs_mean": float(advantages.abs().mean()),
                "train/completion_length": float(lengths.mean()),
                "train/completion_length_min": float(lengths.min()),
                "train/completion_length_max": float(lengths.max()),
                "train/truncated_fraction": float(np.mean([not c.finished for c in completions])),
                "train/tokens": float(lengths.sum()),
                "time/generate": t1 - t0,
                "time/reward": t2 - t1,
                "time/update": t3 - t2,
            }
        )
        if cfg.log_completions_every and step % cfg.log_completions_every == 0:
            self._log_samples(step, group_ids, completions, rewards, advantages)
        return stats

    def _logps(self, model: torch.nn.Module, packed: PackedBatch) -> tuple[Tensor, Tensor]:
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

    def _update(self, completions: Sequence[Completion], advantages: Tensor) -> dict[str, float]:
        """`num_iterations` optimizer steps on one rollout batch; returns the loss statistics."""
        cfg = self.config
        size = len(completions)
        per_pass = cfg.mini_batch_size or size
        chunks = [
            pack_completions(completions[i : i + per_pass], self.pad_id, slice(i, min(i + per_pass, size)))
            for i in range(0, size, per_pass)
        ]
        num_tokens = float(sum(c.num_tokens for c in completions))
        advantages = advantages.to(self.device)
        with torch.no_grad():
            old = [self._logps(self.policy, ch)[0] if cfg.num_iterations > 1 else None for ch in chunks]
        ref = [self._reference_logps(ch) if cfg.beta > 0 else None for ch in chunks]
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        parts: list[tuple[Mapping[str, float], float]] = []
        losses, norms, lrs = [], [], []
        for _ in range(cfg.num_iterations):
            optimizer.zero_grad()
            pass_loss = 0.0
            for chunk, old_logps, ref_logps in zip(chunks, old, ref):
                logps, entropies = self._logps(self.policy, chunk)
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
                    num_active_tokens=num_tokens if cfg.loss_type == "dapo" else None,
                    entropies=entropies,
                    prefix="train/",
                )
                # dapo already divides by the whole batch's token count; the other normalisations are
                # per mini-batch, so weight them by its share of the sequences (exact for grpo and dr_grpo).
                weight = 1.0 if cfg.loss_type == "dapo" else (chunk.rows.stop - chunk.rows.start) / size
                self.manual_backward(loss * weight)
                pass_loss += float(loss.detach()) * weight
                parts.append((stats, float(chunk.completion_mask.sum())))
            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
            lrs.append(optimizer.optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(pass_loss)
            norms.append(float(norm))
        stats = _merge_stats(parts)
        stats["train/loss"] = float(np.mean(losses))
        stats["train/grad_norm"] = float(np.mean(norms))
        stats["train/lr"] = float(lrs[0])
        return stats

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Sequence[str], batch_idx: int = 0) -> dict[str, float]:
        """Greedy summaries of `batch` (doc ids) scored by the reward: `val/*` statistics."""
        completions = self.summarizer.summarize([_doc_pair(self.docs[d]) for d in batch], self.greedy)
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
        components = [
            c
            for c in ("structure", "retrieval", "delta", "num_tokens", "has_separator")
            if isinstance(getattr(rewards, c, None), Tensor)
        ]
        rows = []
        for i in range(min(len(completions), self.config.log_completions_rows)):
            text = completions[i].text
            row: dict[str, Any] = {
                "step": step,
                "doc_id": doc_ids[i],
                "completion": text,
                "summary": parse_completion(text, self.summarizer.separator).summary,
                "reward": float(rewards.total[i]),
                "advantage": float(advantages[i]),
                "completion_tokens": completions[i].num_tokens,
            }
            for name in components:
                value = getattr(rewards, name)[i].item()
                row[name] = _finite(value) if isinstance(value, float) else value
            rows.append(row)
        if self.out_dir is not None:
            atomic_write_text(
                self.out_dir / "samples" / f"step_{step:04d}.jsonl",
                "".join(json.dumps(r) + "\n" for r in rows),
            )
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                columns = list(rows[0]) if rows else []
                logger.log_table(
                    key="summarizer/train/completions",
                    columns=columns,
                    data=[[r[c] for c in columns] for r in rows],
                    step=step,
                )

    def _write_history(self) -> None:
        if self.out_dir is not None:
            atomic_write_text(
                self.out_dir / "grpo_history.jsonl", "".join(json.dumps(h) + "\n" for h in self.history)
            )

    def finalize(self) -> None:
        """Hand the summarizer back as a plain model: LoRA merged, checkpointing off, grads as before."""
        policy = self.policy
        if self._peft is not None:
            merged = self._peft.merge_and_unload()
            assert merged is policy, "peft merged into a new model object; the summarizer would not see it"
            object.__setattr__(self, "_peft", None)
        if self.config.gradient_checkpointing:
            policy.gradient_checkpointing_disable()
        for name, p in policy.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))


# --------------------------------------------------------------------------- checkpoints
class StepCheckpoint(pl.Callback):
    """Write `<dirpath>/last.ckpt` every `every` optimizer steps and after the last one.

    The file is written beside its final name and renamed, so a crash while saving never leaves a
    checkpoint that cannot be loaded. Saved at `on_train_batch_end`, as Lightning's own
    ModelCheckpoint does, so the trainer resumes with the next batch.
    """

    def __init__(self, dirpath: str | Path, every: int) -> None:
        self.dirpath = Path(dirpath)
        self.every = every

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every and step < trainer.max_steps:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        tmp = self.dirpath / ".last.ckpt.tmp"
        trainer.save_checkpoint(tmp)
        tmp.replace(self.last)


# --------------------------------------------------------------------------- plots and stats
def plot_history(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Reward mean (train +- std, greedy validation), separator rate and completion length per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    ax = axes[0, 0]
    steps, mean = series("train/reward_mean")
    std = dict(zip(*series("train/reward_std")))
    ax.plot(steps, mean, label="train (sampled)")
    if std:
        ax.fill_between(
            steps,
            [m - std.get(s, 0) for s, m in zip(steps, mean)],
            [m + std.get(s, 0) for s, m in zip(steps, mean)],
            alpha=0.2,
        )
    ax.plot(*series("val/reward_mean"), "o-", label="val (greedy)")
    ax.set_title("reward mean")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(*series("val/reward_mean"), "o-", color="C1")
    ax.set_title("validation reward (greedy, held-out docs)")
    ax = axes[1, 0]
    ax.plot(*series("train/separator_rate"), label="train")
    ax.plot(*series("val/separator_rate"), "o-", label="val")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("separator rate")
    ax.legend()
    ax = axes[1, 1]
    ax.plot(*series("train/completion_length"), label="train")
    ax.plot(*series("val/completion_length"), "o-", label="val")
    ax.set_title("completion length (LLM tokens)")
    ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("GRPO step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def history_stats(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The run's summary: `reward_mean` is the mean over the last 25% of the steps (the loop's stopping
    criterion); `*_first` / `*_last` are the first and last measured values."""

    def values(key: str) -> list[float]:
        return [h[key] for h in history if h.get(key) is not None]

    reward = values("train/reward_mean")
    tail = reward[-max(1, math.ceil(len(reward) / 4)) :] if reward else []
    out: dict[str, Any] = {"reward_mean": float(np.mean(tail)) if tail else None}
    for name, key in (
        ("reward", "train/reward_mean"),
        ("separator_rate", "train/separator_rate"),
        ("val_reward", "val/reward_mean"),
        ("val_separator_rate", "val/separator_rate"),
        ("completion_length", "train/completion_length"),
    ):
        seen = values(key)
        out[f"{name}_first"] = seen[0] if seen else None
        out[f"{name}_last"] = seen[-1] if seen else None
    out["tokens_generated"] = int(sum(values("train/tokens")) + sum(values("val/tokens")))
    out["train_seconds"] = round(float(sum(values("time/step"))), 2)  # every step, resumed runs included
    return out


# --------------------------------------------------------------------------- entry point
# Lightning warnings that describe this design, not a problem: validation runs inside training_step, and
# the frozen reference model stays in eval mode.
_EXPECTED_WARNINGS = (".*`validation_step` but have no `val_dataloader`.*", ".*module\\(s\\) in eval mode.*")
# Trainer arguments run_grpo owns (set through config / loggers instead).
_OWNED_TRAINER_KEYS = (
    "max_steps",
    "max_epochs",
    "logger",
    "enable_checkpointing",
    "limit_val_batches",
    "use_distributed_sampler",
    "gradient_clip_val",
    "accumulate_grad_batches",
)


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
        out_dir: checkpoints (`checkpoints/last.ckpt`: a rerun resumes from it), samples, history,
            curves and the exported summarizer.
        config: hyper-parameters (`GRPOConfig`).
        optimizer: factory `params -> Optimizer` (default AdamW, lr 1e-6, no weight decay).
        scheduler: factory `(optimizer, total_steps=) -> LRScheduler` (`lr_schedule`); None = constant.
        trainer_kwargs: more `pytorch_lightning.Trainer` arguments (accelerator, precision, callbacks,
            ...); the keys in `_OWNED_TRAINER_KEYS` are set here.
        loggers: Lightning logger(s) for the `summarizer/*` metrics.

    Returns:
        `steps`, `reward_mean` (mean over the last 25% of the steps), `reward_first/last`,
        `separator_rate_first/last`, `val_reward_first/last`, `val_separator_rate_first/last`,
        `completion_length_first/last`, `tokens_generated`, `train_seconds` (all steps), `seconds` (this
        call), `resumed`,
        and the paths `summarizer`, `history`, `curves`.
    """
    config = config or GRPOConfig()
    out_dir = Path(out_dir)
    if doc_ids is None:
        if not callable(getattr(reward, "rewardable_doc_ids", None)):
            raise ValueError("pass doc_ids: the reward has no rewardable_doc_ids() to take them from")
        doc_ids = reward.rewardable_doc_ids()
    missing = [d for d in doc_ids if d not in docs]
    if missing:
        raise KeyError(f"{len(missing)} doc ids are not in docs (e.g. {missing[:5]})")
    extra = dict(trainer_kwargs or {})
    owned = sorted(k for k in extra if k in _OWNED_TRAINER_KEYS)
    if owned:
        raise ValueError(
            f"trainer_kwargs sets {owned}, which run_grpo controls; use grpo.config (steps, max_grad_norm, "
            "mini_batch_size, checkpoint_every) and the loggers argument instead"
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
    kwargs: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "precision": "32-true",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        **extra,
        "callbacks": callbacks,
        "max_steps": config.steps * config.num_iterations,
        "max_epochs": 1,  # one pass over `batches`, which holds every step (several epochs of documents)
        "logger": loggers if loggers else False,
        "enable_checkpointing": False,  # StepCheckpoint writes last.ckpt
        "limit_val_batches": 0,  # validation runs inside training_step, at chosen steps
        "use_distributed_sampler": False,
    }
    trainer = pl.Trainer(**kwargs)
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
        summarizer.to(device)
        summarizer.train(modes[0])
        summarizer.model.train(modes[1])
    seconds = time.perf_counter() - t0
    export = summarizer.save_pretrained(out_dir / "summarizer")
    history_path = out_dir / "grpo_history.jsonl"
    atomic_write_text(history_path, "".join(json.dumps(h) + "\n" for h in module.history))
    curves = plot_history(module.history, out_dir / "grpo_curves.png")
    stats = {
        "steps": module.completed_steps,
        **history_stats(module.history),
        "seconds": round(seconds, 2),
        "resumed": resume is not None,
        "train_docs": len(train_ids),
        "val_docs": len(val_ids),
        "summarizer": str(export),
        "history": str(history_path),
        "curves": str(curves),
    }
    atomic_write_json(out_dir / "grpo_stats.json", stats)
    log.info("GRPO finished: %s", {k: v for k, v in stats.items() if not isinstance(v, str)})
    return stats
