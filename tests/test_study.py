"""experiments/study.py: the job list composes, and a finished run's small files are kept."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import study


def test_every_study_job_composes(compose_in_tmp):
    names = [j.name for j in study.JOBS]
    assert len(names) == len(set(names))  # one result folder per job
    for job in study.JOBS:
        overrides = [o for o in job.overrides("cpu_study") if not o.startswith("transfer.run=")]
        if job.source is not None:
            assert job.source in names
            overrides.append("transfer.run=/some/finished/run")
        cfg = compose_in_tmp(overrides)
        assert cfg.budget.name == "cpu_study" and cfg.seed == job.seed
        if study.LATER[0] in job.extra:  # the seed- and ablation-free rows are left to the first seeds
            points = [dict(p) for p in cfg.loop.eval_points]
            assert points == [
                {"row": "non_iterative", "iteration": 1, "stage": "summarized", "view": "summaries"}
                | {"splits": [cfg.data.eval_split]}
            ]
    # every row a later job skips is evaluated by jobs that keep it, at two seeds
    full = [j for j in study.JOBS if j.experiment == "iterative" and j.data == "scifact" and not j.extra]
    assert {j.seed for j in full} == {0, 1} and all(j.ablation == "none" for j in full)
    # the paper's claims and the controls: the full model and adapted_baseline at three seeds
    for row in ("iterative", "adapted_baseline"):
        assert {j.seed for j in study.JOBS if j.experiment == row and j.ablation == "none"} >= {0, 1, 2}


def test_collect_keeps_the_small_files_and_lands_atomically(tmp_path):
    run = tmp_path / "run"
    (run / "runs").mkdir(parents=True)
    (run / "iter1" / "summarizer").mkdir(parents=True)
    (run / "summaries").mkdir()
    (run / "results.json").write_text(json.dumps({"rows": []}))
    (run / "runs" / "test-x.per_query.json").write_text("{}")
    (run / "runs" / "test-x.trec").write_text("big run file")
    (run / "iter1" / "grpo_history.jsonl").write_text("{}\n")
    (run / "iter1" / "summarizer" / "model.safetensors").write_text("weights")
    (run / "summaries" / "iter0.jsonl").write_text('{"doc_id": "d"}\n')
    dest = tmp_path / "results" / "job"
    study.collect(run, dest)
    kept = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert kept == [
        "iter1/grpo_history.jsonl",
        "results.json",
        "runs/test-x.per_query.json",
        "summaries/iter0.jsonl.gz",
    ]
    with gzip.open(dest / "summaries" / "iter0.jsonl.gz", "rt") as f:
        assert f.read() == '{"doc_id": "d"}\n'
    (run / "results.json").unlink()
    with pytest.raises(SystemExit, match="did not finish"):
        study.collect(run, tmp_path / "results" / "unfinished")
    assert not (tmp_path / "results" / "unfinished").exists()
