"""OmegaConf resolvers and the repository's fixed paths, shared by the entry points and tests.

Nothing is registered at import time: the entry points (and the test fixtures) call
`register_resolvers()` themselves, before Hydra composes and resolves a config.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "conf"


def default_cache_dir() -> Path:
    """Where caches live (summaries, embeddings, converted models): $RESUME_CACHE, else `<repo>/.cache`.

    The one definition of that default: `paths.cache_dir` (`${resume_cache:}`) and the offline
    model conversion (`resume.assets`) both read it.
    """
    return Path(os.environ.get("RESUME_CACHE") or REPO_ROOT / ".cache")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def torchrun_value(what: str) -> int:
    """What torchrun's environment says: `world_size`, `local_world_size` (processes on this node),
    `num_nodes`, `rank`; a single process (no torchrun) is a world of one."""
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_WORLD_SIZE", world)
    values = {
        "world_size": world,
        "local_world_size": local,
        "num_nodes": max(1, world // max(1, local)),
        "rank": _env_int("RANK", 0),
    }
    if what not in values:
        raise ValueError(f"${{torchrun:{what}}}: must be one of {sorted(values)}")
    return values[what]


def register_resolvers() -> None:
    """`${repo_root:}` -> the repository holding conf/; `${resume_cache:}` -> `default_cache_dir()`;
    `${torchrun:local_world_size}` and the like (`torchrun_value`); `${rank_zero_only:x}` -> x on rank 0,
    None elsewhere; `${rank_suffix:}` -> "" on rank 0, ".rank<r>" elsewhere. Idempotent."""
    if not OmegaConf.has_resolver("torchrun"):
        OmegaConf.register_new_resolver("torchrun", torchrun_value)
    if not OmegaConf.has_resolver("rank_zero_only"):
        OmegaConf.register_new_resolver(
            "rank_zero_only", lambda x: x if torchrun_value("rank") == 0 else None
        )
    if not OmegaConf.has_resolver("rank_suffix"):
        OmegaConf.register_new_resolver(
            "rank_suffix", lambda: "" if torchrun_value("rank") == 0 else f".rank{torchrun_value('rank')}"
        )
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("resume_cache"):
        OmegaConf.register_new_resolver("resume_cache", lambda: str(default_cache_dir()))


def compose_node(key: str, overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The `key` node of `conf/<config_name>.yaml` composed with `overrides`, interpolations unresolved.

    E.g. `compose_node("summarizer", ["summarizer=tiny", "summarizer/backend=vllm"])`: a config group
    with its own defaults list (a summarizer and its backend) for scripts and tests that build one
    piece without a run. Interpolations such as `${seed}` resolve against the root they are put in.
    """
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return cfg[key]
