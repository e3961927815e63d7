"""`HFBackend`: the `GenerationBackend` on transformers' `model.generate` (`summarizer/backend=hf`).

It reads the live model at every call (no weights to sync unless it generates in another dtype than
the model's), shares the prompts' common prefix through one KV cache, and is the reference the vLLM
backend's fp32 greedy completions are tested against token for token.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

import torch

from resume.summarizer.generate import (
    Completion,
    GenerationParams,
    engine_settings,
    prompt_seed,
    weights_version,
)
from resume.utils.devices import dtype_name, generation_dtype, seeded

# `generate` arguments a backend or GenerationParams sets; generate_kwargs may not.
_OWNED_GENERATE_KEYS = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "num_return_sequences",
    "num_beams",
    "pad_token_id",
    "eos_token_id",
    "use_cache",
    "past_key_values",
    "input_ids",
    "attention_mask",
)


class HFBackend:
    """`model.generate` from transformers, batched, with left padding and length sorting.

    - `batch_size` counts SEQUENCES per `generate` call (what fills memory): a call with
      `num_return_sequences=k` puts `max(1, batch_size // k)` prompts in each batch.
    - Prompts are sorted longest first (less padding; an out-of-memory error shows in
      the first batch, not the last) and results come back in input order.
    - Padding is built here, on the left, so the tokenizer's own `padding_side` is never
      touched (the same tokenizer may serve training with right padding).
    - The model reads from `self.model` at call time, so moving the module to a GPU or
      updating its weights is seen by the next call. It runs in eval mode (no dropout)
      under `torch.no_grad`; the previous train/eval mode is restored.
    - Shared-prefix KV cache (`prefix_cache`, on by default): the token prefix that every
      prompt of a call shares (system message and few-shot turns, ~550 of SmolLM2's ~760
      prompt tokens) is run through the model once per call; each batch starts from a copy
      of its keys and values and prefills only its own suffixes. The rows are laid out as
      `[prefix][padding][suffix]`: positions come from the attention mask, so every
      suffix sits at the positions it has in the plain layout and the completions are the
      same (up to float rounding: the shared prefix is computed at batch size 1). On 2 CPU
      cores it cut SmolLM2's prefill of 8 SciFact prompts from 15.4 s to 4.1 s + 1.4 s
      once. It engages when the common prefix has at least `min_prefix_tokens` tokens.
    - `dtype`: generate in another dtype than the model's (`auto`: bf16 on a GPU and on a CPU where
      bf16 is fast, `cpu_bf16_is_fast`: AMX, or AVX512-BF16 and a measured speed-up; fp32
      elsewhere; None: the model's own). The backend then keeps a copy of the
      model in that dtype, refreshed whenever the model's weights changed (`weights_version`), so an
      fp32 policy can train while generation runs at bf16 speed (3x on this kind of CPU).
    - `generate_kwargs` go to every `model.generate` call, e.g. `{cache_implementation: static}`
      (a preallocated KV cache, what `torch.compile`d decoding on a GPU needs). A cache
      implementation replaces the shared-prefix cache for that backend (they cannot be combined:
      the prefix cache is a dynamic cache handed to `generate`). Decoding settings are not
      accepted here: they belong to `GenerationParams`.
    """

    @classmethod
    def from_config(cls, model: Any, tokenizer: Any, **settings: Any) -> HFBackend:
        """Built from `summarizer.backend` (`conf/summarizer/backend/hf.yaml`): see `engine_settings`."""
        return cls(model, tokenizer, **engine_settings("hf", settings))

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 8,
        prefix_cache: bool = True,
        min_prefix_tokens: int = 32,
        generate_kwargs: dict[str, Any] | None = None,
        dtype: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"summarizer.batch_size ({batch_size}) must be >= 1")
        if min_prefix_tokens < 1:
            raise ValueError(f"min_prefix_tokens ({min_prefix_tokens}) must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.generate_kwargs = dict(generate_kwargs or {})
        owned = sorted(set(self.generate_kwargs) & set(_OWNED_GENERATE_KEYS))
        if owned:
            raise ValueError(
                f"summarizer.generate_kwargs sets {owned}: decoding settings belong in corpus_generation / "
                "rollout_generation, ids and caches are set by the backend"
            )
        self.prefix_cache = prefix_cache and "cache_implementation" not in self.generate_kwargs
        self.min_prefix_tokens = min_prefix_tokens
        self.last_prefix_length = 0  # tokens served from the shared-prefix cache in the last call
        self.dtype_setting = dtype
        self._copy: torch.nn.Module | None = None  # the model in the generation dtype, when it differs
        self._copy_version: tuple[Any, ...] | None = None

    @property
    def dtype(self) -> torch.dtype:
        first = next(self.model.parameters())
        if self.dtype_setting is None:
            return first.dtype
        return generation_dtype(self.dtype_setting, first.device)

    def describe(self) -> dict[str, Any]:
        return {"engine": "hf", "dtype": dtype_name(self.dtype)}

    def sync_weights(self) -> float:
        """Refresh the generation-dtype copy now (otherwise done at the next `generate`); seconds."""
        t0 = time.perf_counter()
        self._generation_model()
        return time.perf_counter() - t0

    def release(self) -> None:
        self._copy, self._copy_version = None, None

    def _generation_model(self) -> torch.nn.Module:
        """The model itself, or its copy in the generation dtype with the model's current weights."""
        dtype = self.dtype
        if dtype == next(self.model.parameters()).dtype:
            self._copy = None
            return self.model
        version = weights_version(self.model)
        if self._copy is not None and self._copy_version == version:
            return self._copy
        names = [n for n, _ in self.model.named_parameters()]
        if self._copy is None or [n for n, _ in self._copy.named_parameters()] != names:
            grads = {n: p.grad for n, p in self.model.named_parameters()}
            for p in self.model.parameters():
                p.grad = None  # not copied: a copy only generates
            try:
                self._copy = copy.deepcopy(self.model).to(dtype).requires_grad_(False).eval()
            finally:
                for n, p in self.model.named_parameters():
                    p.grad = grads[n]
        else:
            with torch.no_grad():
                for mine, theirs in zip(self._copy.parameters(), self.model.parameters()):
                    mine.copy_(theirs)
        self._copy_version = version
        return self._copy

    def eos_ids(self) -> list[int]:
        """Every token id that ends a completion: the generation config's and the tokenizer's EOS."""
        ids: list[int] = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for x in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [
            self.tokenizer.eos_token_id
        ]:
            if x is not None and x not in ids:
                ids.append(int(x))
        if not ids:
            raise ValueError("neither the model's generation_config nor the tokenizer defines an EOS token")
        return ids

    def pad_id(self, eos_ids: list[int]) -> int:
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        gen_pad = getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
        return int(gen_pad) if gen_pad is not None else eos_ids[0]

    def encode(self, prompts: list[str]) -> list[list[int]]:
        # The chat template already wrote any BOS: no second one.
        return [list(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]

    @staticmethod
    def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            if s:
                ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[row, width - len(s) :] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def _completion(self, row: list[int], prompt_ids: list[int], eos: set[int]) -> Completion:
        # HF pads a sequence only after it emitted EOS, so everything after the first EOS is padding.
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        token_ids = row if cut is None else row[: cut + 1]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Completion(text=text, token_ids=token_ids, prompt_ids=prompt_ids, finished=cut is not None)

    @staticmethod
    def shared_prefix_length(seqs: list[list[int]]) -> int:
        """Length of the token prefix common to every sequence, leaving each at least one own token
        (the first new token's logits need a forward pass over something)."""
        first, n = seqs[0], min(len(s) for s in seqs) - 1
        p = 0
        while p < n and all(s[p] == first[p] for s in seqs):
            p += 1
        return p

    def _prefix_layout(
        self, prefix: list[int], suffixes: list[list[int]], pad_id: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Rows `[prefix][left padding][suffix]` with the matching attention mask."""
        tail = self._left_pad(suffixes, pad_id, torch.device("cpu"))
        ids = torch.cat([torch.tensor([prefix] * len(suffixes), dtype=torch.long), tail["input_ids"]], 1)
        mask = torch.cat(
            [torch.ones((len(suffixes), len(prefix)), dtype=torch.long), tail["attention_mask"]], 1
        )
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    @staticmethod
    def _prefix_kv(model: Any, prefix: list[int], device: torch.device) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prefix], device=device), past_key_values=cache, use_cache=True)
        return cache

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        if not prompts:
            return []
        k = params.num_return_sequences
        encoded = self.encode(prompts)
        if any(len(e) == 0 for e in encoded):
            raise ValueError("an empty prompt cannot be generated from; render prompts with a chat template")
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        per_prompt = params.do_sample and params.seed is not None and params.seed_per_prompt
        per_batch = 1 if per_prompt else max(1, self.batch_size // k)
        eos = self.eos_ids()
        pad = self.pad_id(eos)
        device = next(self.model.parameters()).device
        p = self.shared_prefix_length(encoded) if self.prefix_cache else 0
        p = p if p >= self.min_prefix_tokens else 0
        self.last_prefix_length = p
        results: list[list[Completion] | None] = [None] * len(prompts)
        model = self._generation_model()
        was_training = model.training
        model.eval()
        try:
            with (
                torch.no_grad(),
                seeded(params.seed if params.do_sample and not per_prompt else None, device),
            ):
                prefix_kv = self._prefix_kv(model, encoded[0][:p], device) if p else None
                for start in range(0, len(order), per_batch):
                    idx = order[start : start + per_batch]
                    # seed_per_prompt: this prompt's own RNG stream (one prompt per call)
                    own = seeded(prompt_seed(params.seed, encoded[idx[0]]), device) if per_prompt else None
                    with own or contextlib.nullcontext():
                        new = self._generate_rows(model, encoded, idx, p, prefix_kv, params, pad, eos, device)
                    for j, i in enumerate(idx):  # rows grouped per prompt, k each
                        results[i] = [
                            self._completion(new[j * k + r], encoded[i], set(eos)) for r in range(k)
                        ]
        finally:
            model.train(was_training)
        missing = [i for i, r in enumerate(results) if r is None]
        assert not missing, f"prompts {missing[:5]} got no completions"
        return results  # type: ignore[return-value]

    def _generate_rows(
        self,
        model: Any,
        encoded: list[list[int]],
        idx: list[int],
        p: int,
        prefix_kv: Any,
        params: GenerationParams,
        pad: int,
        eos: list[int],
        device: torch.device,
    ) -> list[list[int]]:
        """The new tokens of prompts `idx` (k rows each, grouped per prompt), in one `generate` call."""
        k = params.num_return_sequences
        kwargs = {
            **self.generate_kwargs,
            **params.hf_kwargs(),
            "pad_token_id": pad,
            "eos_token_id": eos,
            "use_cache": True,
        }
        if prefix_kv is None:
            batch = self._left_pad([encoded[i] for i in idx], pad, device)
        else:
            # Rows repeated here (num_return_sequences would not expand the cache), in the same
            # interleaved order, so sampling draws the same tokens.
            batch = self._prefix_layout(encoded[0][:p], [encoded[i][p:] for i in idx], pad, device)
            batch = {n: t.repeat_interleave(k, dim=0) for n, t in batch.items()}
            cache = copy.deepcopy(prefix_kv)
            cache.batch_repeat_interleave(len(idx) * k)
            kwargs.update(num_return_sequences=1, past_key_values=cache)
        out = model.generate(**batch, **kwargs)
        return out[:, batch["input_ids"].shape[1] :].tolist()
