"""Shared fixtures: Hydra composition against the real conf/, tiny corpora in tmp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from resume.data import register_data_resolvers
from resume.utils.config import CONFIG_DIR, REPO_ROOT, register_resolvers

register_resolvers()  # what the entry points do before composing
register_data_resolvers()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED_DATA = Path(os.environ.get("RESUME_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def compose_cfg(overrides: list[str], tmp_path: Path) -> DictConfig:
    """The root config with overrides; outputs and caches go under tmp_path."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts single-threaded and restores the count after: tiny test models gain nothing
    from a second thread, and on a busy 2-core machine two threads made small matmuls 10-100x
    slower (measured). Real-model tests raise it themselves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose_in_tmp(tmp_path: Path):
    return lambda overrides: compose_cfg(overrides, tmp_path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_real = pytest.mark.skip(
        reason=f"needs ../shared/data ({SHARED_DATA}) and the offline model packages"
    )
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "real" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_real)
