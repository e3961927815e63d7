"""OmegaConf resolvers and the repository's fixed paths, shared by the entry points and tests.

Nothing is registered at import time: the entry points (and the test fixtures) call
`register_resolvers()` themselves, before Hydra composes and resolves a config.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "conf"


def default_cache_dir() -> Path:
    """Where caches live (summaries, embeddings, converted models): $RESUME_CACHE, else `<repo>/.cache`.

    The one definition of that default: `paths.cache_dir` (`${resume_cache:}`) and the offline
    model conversion (`resume.assets`) both read it.
    """
    return Path(os.environ.get("RESUME_CACHE") or REPO_ROOT / ".cache")


def register_resolvers() -> None:
    """`${repo_root:}` -> the repository holding conf/; `${resume_cache:}` -> `default_cache_dir()`.
    Idempotent."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("resume_cache"):
        OmegaConf.register_new_resolver("resume_cache", lambda: str(default_cache_dir()))
