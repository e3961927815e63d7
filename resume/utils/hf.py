"""Hugging Face models from a name or folder, or random-initialised from a config dict (tests).

Both models are built the same way: `model` (a hub name or a local folder, resolved to an
offline copy when one is installed, see `resume.assets`) goes to `from_pretrained`; `config`
(a dict with `model_type`) builds a random-initialised model of that shape with a seeded RNG,
so tiny test models are reproducible. Exactly one of the two must be given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from resume.assets import resolve_model

log = logging.getLogger(__name__)


def plain(node: Any) -> dict[str, Any]:
    """A Hydra DictConfig (or any mapping) as a plain dict; None -> {}."""
    if node is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def load_or_init(
    auto_class: Any,
    *,
    model: str | None,
    config: Mapping[str, Any] | None,
    tokenizer: str | None,
    tiny_tokenizer: Callable[[], Any],
    seed: int,
    what: str,
    default_type: str,
    load_kwargs: Mapping[str, Any] | None = None,
    config_from_tokenizer: Callable[[Any], Mapping[str, Any]] | None = None,
) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) from `model` (pretrained) or `config` (random init).

    `tokenizer` names a tokenizer (default: `model`'s own); a random model without one gets
    `tiny_tokenizer()`, built offline. `config_from_tokenizer(tok)` adds config entries taken
    from the tokenizer (e.g. special token ids). `what` names the config group in errors.
    """
    from transformers import AutoConfig, AutoTokenizer

    if (model is None) == (config is None):
        raise ValueError(f"set exactly one of {what}.model (name or folder) and {what}.config (random init)")
    if model is not None:
        path = resolve_model(model)
        log.info("%s: loading %s from %s", what, model, path)
        net = auto_class.from_pretrained(path, **dict(load_kwargs or {}))
        tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer) if tokenizer else path)
        return net, tok, model
    tok = (
        AutoTokenizer.from_pretrained(resolve_model(tokenizer)) if tokenizer is not None else tiny_tokenizer()
    )
    cfg = plain(config)
    model_type = cfg.pop("model_type", default_type)
    extra = dict(config_from_tokenizer(tok)) if config_from_tokenizer else {}
    hf_cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), **extra, **cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = auto_class.from_config(hf_cfg)
    return net, tok, f"random-{model_type}"
