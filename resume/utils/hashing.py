"""Content fingerprints for caches: model weights, texts, settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch


def fingerprint_state(module: torch.nn.Module, extra: Any = None, length: int = 16) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, bytes) plus `extra` settings."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:length]


def fingerprint_texts(items: Iterable[tuple[str, str]], length: int = 16) -> str:
    """Hash of (id, text) pairs in order."""
    h = hashlib.blake2b(digest_size=16)
    for key, text in items:
        h.update(key.encode())
        h.update(b"\x00")
        h.update(text.encode())
        h.update(b"\x01")
    return h.hexdigest()[:length]
