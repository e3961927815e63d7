"""`GRPOConfig`: the hyper-parameters of one GRPO run, validated before any model work.

Names follow TRL's `GRPOConfig` where one exists; `__post_init__` rejects bad values and
combinations with the fix in the message, as TRL's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from resume.grpo.advantages import ADVANTAGE_KINDS
from resume.grpo.loss import IMPORTANCE_SAMPLING_MODES, LOSS_TYPES
from resume.utils.devices import AUTOCAST_SETTINGS

IMPORTANCE_SAMPLING_SETTINGS = ("auto", "off", *IMPORTANCE_SAMPLING_MODES)

LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
# Fields that may differ between a checkpoint and the run resuming it (they do not change the steps taken).
RESUMABLE_CHANGES = (
    "steps",
    "log_completions_every",
    "log_completions_rows",
    "val_every",
    "val_max_docs",
    "checkpoint_every",
    "tied_grad_in_place",
    "chunked_head",
    "reuse_heap",
    "preallocate_grads",
    "tree_attention",
    "autocast_bucket",
    "release_engine_in_update",
)


@dataclass
class GRPOConfig:
    """Hyper-parameters of one GRPO run (names follow TRL's `GRPOConfig` where one exists).

    Rollout sampling is the summarizer's `rollout_generation` with the non-null overrides
    below (`temperature`, `top_p`, `top_k`, `max_new_tokens`), `num_return_sequences =
    num_generations` and `seed = seed + step`.
    """

    steps: int = 20  # GRPO steps = rollout batches (each makes num_iterations optimizer steps)
    num_generations: int = 4  # k, completions per prompt (the group)
    # documents per rollout batch, over all ranks (each of N takes prompts_per_step / N); k per group
    prompts_per_step: int = 4
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
    # Off-policy correction of rollouts from another engine (TRL's vllm_importance_sampling_*): auto =
    # token_truncate when the engine reports log-probs and generates in another dtype than the policy
    # trains in, else off. Also: off | token_truncate | token_mask | sequence_truncate | sequence_mask.
    importance_sampling: str = "auto"
    importance_sampling_cap: float | None = 3.0  # upper bound of the weight (TRL's clip_max)
    importance_sampling_floor: float | None = None  # lower bound; None = none (TRL's clip_min)
    # Run each prompt once for its group's k completions (KV cache shared, gradients through it): the same
    # log-probs and gradient as packing prompt + completion per row, for far fewer tokens. False = packed.
    shared_prompt: bool = True
    gradient_checkpointing: bool = False  # recompute activations in backward (conf/grpo/default.yaml: on)
    # A tied embedding's two gradients go straight into .grad (resume/grpo/tied_grad.py): no 2 x [V, D]
    # temporaries at the end of each backward. One process with whole weights only (else ignored).
    tied_grad_in_place: bool = False
    # Log-probs from the hidden states a few rows of logits at a time (resume/grpo/head_logps.py): no
    # [tokens, V] logits kept for the backward. Needs shared_prompt, and a model whose logits are
    # lm_head(hidden) (checked once; else HF's logits are used).
    chunked_head: bool = False
    # Each micro-batch's backward takes its blocks (recomputed activations, their gradients) from the
    # heap, whose free pages go back to the system when it ends (resume/utils/memory.heap_reuse): under
    # train.yaml's 1 MB mmap threshold, no fresh pages to fault in and zero for each of them. Same values.
    reuse_heap: bool = False
    # Each update's gradients allocated (zeros) before its first forward, as their own mappings under
    # train.yaml's 1 MB mmap threshold, rather than by the first backward: with reuse_heap, a
    # gradient allocated inside the backward would pin the heap's pages. Same values. One process only.
    preallocate_grads: bool = False
    # Under gradient checkpointing (the prefix-tree path), each prompt's own queries attend causally
    # without the tree's mask, so SDPA skips the blocks above the diagonal (resume/grpo/tree_attention.py):
    # ~half the attention work at P ~ 755, k C = 252. Same values up to float rounding. SDPA models only.
    tree_attention: bool = False
    # The policy's log-prob forwards (and their checkpointed recompute) under torch.autocast: matmuls and
    # attention in bf16, the master weights, gradients and AdamW state in fp32. off | bf16 | auto (bf16 on
    # a GPU that has it and on a CPU where bf16 matmuls are fast: AMX, or AVX512-BF16 measured 1.5x fp32).
    # Under gradient checkpointing without autocast's weight-cast cache, so no bf16 copy of the model is
    # held; Lightning's trainer_kwargs.precision=bf16-mixed keeps one through each step instead.
    autocast: str = "off"
    # Under autocast, each prefix tree (the checkpointed path) padded to a multiple of this many tokens
    # with tokens nothing real attends to (logps.prefix_tree_logps): a CPU's bf16 kernels (oneDNN) are
    # built and cached per shape, ~11 MB of heap for good per new sequence length with SmolLM2. 0 = off.
    autocast_bucket: int = 64
    # The generation engine's copy of the weights freed while the update runs (a CPU vLLM engine's packed
    # linear layers: ~0.3 GB for SmolLM2 in bf16) and loaded again by the weight sync that follows every
    # update anyway: the update's memory peak without them, the same rollouts. Nothing happens with an
    # engine that has no such copy (HF generate, a GPU engine).
    release_engine_in_update: bool = False
    lora: dict[str, Any] | None = None  # None = full fine-tuning; else {r, alpha, dropout, target_modules}
    log_completions_every: int = 10  # write a table of sample completions every N steps; 0 = never
    log_completions_rows: int = 32  # rows per table (whole groups first)
    val_every: int = 10  # greedy validation every N steps (step 0 and the end included); 0 = never
    val_max_docs: int | None = 32  # cap on the held-out validation documents
    checkpoint_every: int = 10  # checkpoints/last.ckpt every N steps (not the last: the export); 0 = never
    seed: int = 0  # rollout sampling, negatives, dropout and document order all derive from it
    # Sampling seeds per prompt (the step's seed and the prompt's tokens) rather than per generate call: a
    # prompt's samples then do not depend on which rank, or which batch, generates it, so N ranks equal
    # one process exactly (HF generate then runs one prompt per call). Off: one stream per call.
    seed_per_prompt: bool = False

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
        at_least("autocast_bucket", 0)
        if self.loss_type not in LOSS_TYPES:
            fail(f"loss_type={self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if self.advantage not in ADVANTAGE_KINDS:
            fail(f"advantage={self.advantage!r} is not one of {', '.join(ADVANTAGE_KINDS)}")
        if self.importance_sampling not in IMPORTANCE_SAMPLING_SETTINGS:
            fail(
                f"importance_sampling={self.importance_sampling!r} is not one of "
                f"{', '.join(IMPORTANCE_SAMPLING_SETTINGS)}"
            )
        cap, floor = self.importance_sampling_cap, self.importance_sampling_floor
        if cap is not None and cap <= 0 or floor is not None and floor < 0:
            fail(f"importance_sampling_cap ({cap}) must be > 0 and importance_sampling_floor ({floor}) >= 0")
        if cap is not None and floor is not None and floor >= cap:
            fail(f"importance_sampling_floor ({floor}) must be below importance_sampling_cap ({cap})")
        if self.autocast not in AUTOCAST_SETTINGS:
            fail(f"autocast={self.autocast!r} is not one of {', '.join(AUTOCAST_SETTINGS)}")
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
