"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from resume.utils.distributed import check_writer


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    check_writer(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    path = Path(path)
    check_writer(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_pretrained(folder: str | Path, model: Any, tokenizer: Any, meta_name: str, meta: Any) -> Path:
    """Write an HF model + tokenizer + a JSON sidecar to `folder`, complete or not at all.

    Written into a temporary folder beside it, then renamed: a crash never leaves a folder that
    loads half the weights.
    """
    import shutil

    folder = Path(folder)
    check_writer(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / meta_name, meta)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_pretrained_into(module: Any, folder: str | Path, auto_class: Any, what: str) -> None:
    """Load a `save_pretrained` folder's weights into `module` in place (its device and dtype kept)."""
    first = next(module.parameters())
    loaded = auto_class.from_pretrained(Path(folder), dtype=first.dtype)
    try:
        module.load_state_dict(loaded.state_dict())
    except RuntimeError as e:
        raise ValueError(f"{folder} does not hold weights of this {what}'s architecture: {e}") from e
