"""Text generation behind one small interface, so the engine can change without touching callers.

`GenerationBackend.generate(prompts, params)` takes rendered prompt strings (chat template
already applied, see `prompts.py`) and returns, for each prompt in input order, a list of
`params.num_return_sequences` `Completion`s. Everything the rest of the code needs is in a
`Completion`: the decoded text (for parsing and the reward), the exact prompt and completion
token ids (for a GRPO trainer to recompute log-probabilities under the policy and the reference
model) and, when the engine reports them, the sampled tokens' log-probabilities under the
engine's own numerics (for the off-policy correction of `resume.grpo.loss.importance_weights`).

Two engines implement it: `hf_backend.HFBackend` (`model.generate` from transformers, reading the
live model) and `vllm_backend.VLLMBackend` (vLLM, CPU or GPU; trained weights are synced into it).
Config picks one (`summarizer/backend=hf|vllm|auto`, conf/summarizer/backend/).
A backend that keeps its own copy of the weights re-reads them when they changed
(`weights_version`), so no caller has to remember to sync.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings. Greedy (`do_sample=False`) ignores temperature, top-p, top-k and seed.

    `top_k=0` and `top_p=1.0` switch those filters off (transformers' own default would
    silently apply top_k=50). `seed` makes sampling reproducible for the same prompts and
    batch size; a trainer should vary it per step (e.g. `replace(params, seed=base + step)`),
    or pass None to draw from the global RNG. `seed_per_prompt` gives each prompt's samples a seed of
    their own (`prompt_seed`: the seed and the prompt's tokens), so they do not depend on the other
    prompts of the call: what a run whose ranks each generate a share of the prompts needs to sample
    exactly what one process generating them all does (HF then generates one prompt per call).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    num_return_sequences: int = 1
    seed: int | None = 0
    seed_per_prompt: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be >= 1")
        if not self.do_sample and self.num_return_sequences > 1:
            raise ValueError(
                f"greedy decoding returns {self.num_return_sequences} identical copies; "
                "set do_sample: true for several completions per prompt, or num_return_sequences: 1"
            )
        if self.do_sample:
            if self.temperature <= 0:
                raise ValueError(
                    f"temperature ({self.temperature}) must be > 0 when sampling; "
                    "use do_sample: false for greedy"
                )
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]; 1.0 switches it off")
            if self.top_k < 0:
                raise ValueError(f"top_k ({self.top_k}) must be >= 0; 0 switches it off")

    def key(self) -> str:
        """A stable, readable string naming what changes the output (used in cache keys).

        Greedy keys leave out the sampling settings and the seed: they do not change a
        greedy completion, so changing them must not invalidate a cache.
        """
        if not self.do_sample:
            return f"greedy-max{self.max_new_tokens}"
        return (
            f"sample-t{self.temperature:g}-p{self.top_p:g}-k{self.top_k}-max{self.max_new_tokens}"
            f"-n{self.num_return_sequences}-s{self.seed}{'pp' if self.seed_per_prompt else ''}"
        )

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (every decoding knob explicit, none from the model)."""
        kw: dict[str, Any] = {
            "do_sample": self.do_sample,
            "max_new_tokens": self.max_new_tokens,
            "num_return_sequences": self.num_return_sequences,
            "num_beams": 1,
        }
        if self.do_sample:  # explicit, so a model's generation_config (e.g. top_k 20) cannot leak in
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def prompt_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """A sampling seed for one prompt: `seed` and the prompt's tokens, nothing else (`seed_per_prompt`)."""
    crc = zlib.crc32(np.asarray(prompt_ids, dtype=np.int64).tobytes())
    return (seed * 1_000_003 + crc) % 2**63


ENGINES = ("hf", "vllm")  # the backends' names in config: `summarizer/backend=hf|vllm|auto`


def engine_settings(engine: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `engine`'s backend from its config node.

    `summarizer.backend.<engine>.<key>` (what a budget writes, e.g. `backend.vllm.max_num_seqs: 48`)
    applies when `<engine>` is the backend being built, and the other engines' sections are dropped, so
    one budget serves `summarizer/backend=hf`, `=vllm` and `=auto` alike (with `auto` the sections are the
    two backends' own nodes).
    """
    out = {k: v for k, v in settings.items() if k not in ENGINES}
    own = settings.get(engine)
    if own is not None and not isinstance(own, Mapping):
        raise TypeError(f"summarizer.backend.{engine} must be a mapping of {engine} settings, got {own!r}")
    out.update(own or {})
    return out


@dataclass(frozen=True)
class GenerationShape:
    """The largest generation a summarizer asks of its backend, known before the first call.

    - `prefix_tokens`: prompt tokens every prompt shares (system turn, few-shot turns), which an engine
      with prefix caching stores once for all sequences;
    - `max_prompt_tokens`: the longest prompt (the document cut at `max_doc_tokens`, a long title);
    - `max_new_tokens`: the most tokens one completion may add (corpus or rollout settings).

    A backend that sizes memory up front (vLLM's KV cache) plans with it; `SummarizerModule` computes it
    from its prompt template and passes it to `backend.plan(shape)` when the backend has that method.
    """

    prefix_tokens: int
    max_prompt_tokens: int
    max_new_tokens: int

    def __post_init__(self) -> None:
        if not 0 <= self.prefix_tokens <= self.max_prompt_tokens or self.max_new_tokens < 1:
            raise ValueError(f"inconsistent generation shape {self}")


@dataclass
class Completion:
    """One generated continuation of one prompt.

    `token_ids` are the generated ids without padding; they END WITH the EOS token when
    the model stopped by itself (`finished=True`): the probability of stopping is part of
    the policy a GRPO trainer optimises, as in TRL. `finished=False` means the completion
    was cut at `max_new_tokens`. `text` is the decoding of `token_ids` with special tokens
    skipped (so no EOS in it).
    """

    text: str
    token_ids: list[int]
    prompt_ids: list[int] = field(repr=False)
    finished: bool
    # log p(token) of each generated token under the engine that sampled it (after temperature), or None
    # when the engine does not report them (HFBackend).
    logprobs: list[float] | None = field(default=None, repr=False)

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Number of generated tokens (EOS included when produced)."""
        return len(self.token_ids)


@runtime_checkable
class GenerationBackend(Protocol):
    """Anything that turns rendered prompts into completions (`HFBackend`, `VLLMBackend`).

    Optional methods a caller looks up with `getattr`: `sync_weights() -> float` (push the model's
    current weights into the engine now; seconds taken), `describe() -> dict` (what changes the output:
    engine and dtype, part of the summary cache key), `release()` (free the engine's memory) and
    `plan(shape: GenerationShape)` (size memory for the largest call before the first one).
    """

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        """One inner list of `params.num_return_sequences` completions per prompt, in input order."""
        ...


_STEPS = "_resume_optimizer_steps"  # a parameter's count of optimizer steps that wrote it


def mark_weights_written(params: Iterable[torch.Tensor]) -> None:
    """Move `weights_version` of every model holding `params`, for writes no version counter sees (a
    fused optimizer kernel, a copy through `.data`). Every torch optimizer's step does it for the
    parameters it steps; a trainer whose optimizer steps other tensors (DeepSpeed's ZeRO optimizers
    step their own fp32 partitions, then copy into the model) does it for the model's: GRPO does,
    after each update."""
    for p in params:
        setattr(p, _STEPS, getattr(p, _STEPS, 0) + 1)


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    mark_weights_written(p for group in optimizer.param_groups for p in group["params"])


# Fused optimizer kernels (torch.optim.AdamW(fused=True), conf/grpo/default.yaml's) write the parameters
# without bumping their version counters, so `weights_version` also counts the steps of every optimizer
# (a global post-step hook of torch.optim: a few microseconds a step).
register_optimizer_step_post_hook(_count_optimizer_step)


def weights_version(model: torch.nn.Module) -> tuple[Any, ...]:
    """A cheap key that changes whenever a parameter of `model` is written to or replaced.

    Every in-place write (`load_state_dict`, `copy_`, an unfused optimizer step) bumps a tensor's
    version counter, moving or re-creating a parameter changes its storage, and every optimizer step
    is counted on the parameters it updates (a fused kernel bumps no version counter); reading the key
    touches no weight, so it costs microseconds even for a 4B model.
    """
    return (id(model),) + tuple(
        (n, p.data_ptr(), p._version, getattr(p, _STEPS, 0)) for n, p in model.named_parameters()
    )
