"""OmegaConf resolvers and config helpers shared by the entry points and tests."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "conf"


def register_resolvers() -> None:
    """`${repo_root:}` -> the repository holding conf/ (idempotent)."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))


register_resolvers()
