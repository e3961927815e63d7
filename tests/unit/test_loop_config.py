"""The loop's configuration: evaluation points and early stopping read from config, checked early."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from resume.grpo.loss import microbatch_weight
from resume.loop.config import EvalPoint, LoopConfig
from resume.train import get_metric_value

REPO = Path(__file__).resolve().parents[2]


def test_eval_points_from_config_and_their_errors():
    cfg = LoopConfig(eval_points=[{"row": "x", "iteration": 1, "stage": "adapted", "splits": ["test"]}])
    assert cfg.eval_points == (EvalPoint("x", 1, "adapted", "summaries", ("test",)),)
    with pytest.raises(ValueError, match="unknown keys \\['when'\\]"):
        LoopConfig(eval_points=[{"row": "x", "when": 1}])
    with pytest.raises(ValueError, match="stage=.*must be one of"):
        EvalPoint("x", 1, stage="later")
    with pytest.raises(ValueError, match="iteration 0 is the initial state"):
        EvalPoint("x", 0, stage="adapted")
    with pytest.raises(ValueError, match="view="):
        EvalPoint("x", view="titles")
    assert EvalPoint("x", view="lead").view == "lead"
    with pytest.raises(ValueError, match="loop.lead_words=0 must be >= 1"):
        LoopConfig(lead_words=0)


def test_lead_texts_are_each_documents_first_words():
    from resume.data.beir import Document, RetrievalData

    data = RetrievalData("d", {"a": Document("A title", "one two  three\nfour"), "b": Document("", "x")}, {})
    assert data.lead_texts(3) == {"a": "A title one", "b": "x"}
    assert data.lead_texts(100) == {"a": "A title one two three four", "b": "x"}


def test_stop_on_names_the_selection_split():
    assert LoopConfig(stop_on="dev/mrr@10").stop_metric == "mrr@10"
    assert LoopConfig(stop_on="val/ndcg@10", select_split="val").stop_metric == "ndcg@10"
    assert LoopConfig().stop_metric is None
    with pytest.raises(ValueError, match="select_split='dev'"):
        LoopConfig(stop_on="test/ndcg@10")


def test_get_metric_value_reads_the_runs_own_row():
    results = {
        "experiment": "iterative",
        "rows": [
            {"row": "baseline", "split": "test", "metrics": {"ndcg@10": 0.9}},
            {"row": "iterative", "split": "dev", "metrics": {"ndcg@10": 0.5}},
            {"row": "iterative", "split": "test", "metrics": {"ndcg@10": 0.7}},
        ],
    }
    assert get_metric_value(results, "test/ndcg@10") == 0.7
    assert get_metric_value(results, "dev/ndcg@10") == 0.5
    with pytest.raises(ValueError, match="not among this run's results"):
        get_metric_value(results, "test/mrr@10")


def test_microbatch_weight_sums_to_the_whole_batch():
    assert microbatch_weight("dapo", 2, 8) == 1.0  # dapo divides by the whole batch's tokens itself
    assert sum(microbatch_weight("grpo", n, 8) for n in (3, 3, 2)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown loss_type"):
        microbatch_weight("ppo", 1, 1)


def test_report_tables_follow_the_configs():
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import report
    finally:
        sys.path.pop(0)
    assert report.table1_rows() == ["baseline", "fixed_summary", "non_iterative", "iterative"]
    assert report.ablation_names()[0] == "none"
    assert set(report.ablation_names()) == {p.stem for p in (REPO / "conf" / "ablation").glob("*.yaml")}
