"""Real models on real data (slow: minutes on 2 cores; run with `pytest -m slow`)."""

from __future__ import annotations

import json
import os

import pytest

from resume.train import run

pytestmark = [pytest.mark.slow, pytest.mark.real]


def test_minilm_scifact_test_ndcg_matches_published(compose_in_tmp, tmp_path):
    """all-MiniLM-L6-v2 on SciFact test: nDCG@10 = 0.6451, its published MTEB figure (64.51)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    results = run(
        compose_in_tmp(
            ["experiment=baseline", "budget=full", "data=scifact", "retriever=minilm", "logger=none"]
        )
    )
    test = next(r for r in results["rows"] if r["split"] == "test")
    assert test["corpus"]["size"] == 5183 and test["num_queries"] == 300
    assert round(test["metrics"]["ndcg@10"], 4) == 0.6451
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"][-1]["metrics"] == test["metrics"]
