"""`data=beir data.path=<folder>`: any local BEIR folder end to end through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf.errors import InterpolationResolutionError

from resume.data import register_data_resolvers
from resume.data.toy import write_toy
from resume.train import run
from tests.conftest import compose_cfg


@pytest.fixture(autouse=True)
def data_resolvers() -> None:
    # Idempotent; the entry points register it too once resume.utils.config calls it.
    register_data_resolvers()


def _test_only_folder(tmp_path: Path) -> Path:
    """A tiny BEIR folder with qrels/test.tsv only (no train, no dev), named unlike any config."""
    folder = write_toy(tmp_path / "my-beir-copy", seed=2)
    (folder / "qrels" / "train.tsv").unlink()
    return folder


def test_any_beir_folder_with_only_test_qrels_evaluates(tmp_path):
    folder = _test_only_folder(tmp_path)
    cfg = compose_cfg(
        [
            "experiment=baseline",
            "data=beir",
            f"data.path={folder}",
            "retriever=tiny",
            "logger=none",
            "eval.progress=false",
        ],
        tmp_path,
    )
    assert "my-beir-copy" in cfg.run_name
    results = run(cfg)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["data"]["name"] == results["data"]["name"] == "my-beir-copy"
    assert saved["data"]["splits"] == {"test": 8} and saved["data"]["source"] == str(folder)
    assert "dropped_qrels" not in saved["data"]  # data.unknown_qrels=error by default
    env = saved["environment"]  # what the numbers were measured on
    assert env["cpu"] and env["cpu_cores"] >= 1 and env["packages"]["torch"] == torch.__version__
    assert [(r["row"], r["split"]) for r in saved["rows"]] == [("baseline", "test")]
    m = saved["rows"][0]["metrics"]
    assert set(m) == {"mrr@10", "ndcg@10", "recall@100", "recall@1000"}
    assert all(0.0 <= v <= 1.0 for v in m.values())


def test_beir_folder_with_unknown_qrels_loads_with_drop_and_records_it(tmp_path):
    folder = _test_only_folder(tmp_path)
    with (folder / "qrels" / "test.tsv").open("a") as f:
        f.write("q0_0\tno-such-doc\t1\nno-such-query\td0_0\t1\n")
    overrides = [
        "experiment=baseline",
        "data=beir",
        f"data.path={folder}",
        "retriever=tiny",
        "logger=none",
        "eval.progress=false",
    ]
    # instantiate() wraps the loader's DataError; its message (file:line and the fix) is kept
    unknown_doc = r"test.tsv:\d+: qrels name document 'no-such-doc'.*data.unknown_qrels=drop"
    with pytest.raises(InstantiationException, match=unknown_doc):
        run(compose_cfg(overrides, tmp_path / "error"))
    results = run(compose_cfg([*overrides, "data.unknown_qrels=drop"], tmp_path / "drop"))
    assert results["data"]["dropped_qrels"] == {"test": {"unknown_docs": 1, "unknown_queries": 1}}
    assert any("data.unknown_qrels=drop" in n for n in results["data"]["notes"])
    saved = json.loads((tmp_path / "drop" / "out" / "results.json").read_text())
    assert saved["data"]["dropped_qrels"] == results["data"]["dropped_qrels"]


def test_beir_without_path_fails_naming_the_key(tmp_path):
    cfg = compose_cfg(["experiment=baseline", "data=beir", "retriever=tiny", "logger=none"], tmp_path)
    unset = r"data.path is not set: data=beir needs data.path="
    with pytest.raises(InterpolationResolutionError, match=unset):
        run(cfg)  # resolving run_name (and so data.name) is the first thing that needs the path
