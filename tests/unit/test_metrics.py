"""`resume.evaluation.metrics` against hand-computed values and against pytrec_eval itself."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from resume.evaluation.metrics import METRICS, evaluate, parse_metric, rank_run, read_trec_run, write_trec_run

# our name -> pytrec_eval measure (as requested, as returned)
MEASURES = {
    "ndcg@10": ("ndcg_cut.10", "ndcg_cut_10"),
    "ndcg@3": ("ndcg_cut.3", "ndcg_cut_3"),
    "recall@5": ("recall.5", "recall_5"),
    "recall@100": ("recall.100", "recall_100"),
    "recall@1000": ("recall.1000", "recall_1000"),
    "precision@5": ("P.5", "P_5"),
    "map@10": ("map_cut.10", "map_cut_10"),
}
ALL = ("mrr@10", "mrr@1", *MEASURES)


def mrr_reference(qrels, run, k):
    """pytrec_eval `recip_rank` on the run cut to its top k in trec_eval order."""
    cut = {q: dict(rank_run(docs, k)) for q, docs in run.items()}
    return pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)


def reference(qrels, run):
    """pytrec_eval values for every query of `qrels`, adding empty runs for missing ones."""
    full_run = {q: dict(run.get(q, {})) for q in qrels if qrels[q]}
    raw = pytrec_eval.RelevanceEvaluator(qrels, {m for m, _ in MEASURES.values()}).evaluate(full_run)
    mrr10, mrr1 = mrr_reference(qrels, full_run, 10), mrr_reference(qrels, full_run, 1)
    out = {}
    for q, vals in raw.items():
        out[q] = {name: vals[key] for name, (_, key) in MEASURES.items()}
        out[q]["mrr@10"], out[q]["mrr@1"] = mrr10[q]["recip_rank"], mrr1[q]["recip_rank"]
    return out


def assert_matches_reference(qrels, run):
    result = evaluate(qrels, run, ALL)
    ref = reference(qrels, run)
    assert set(result.per_query) == set(ref)
    assert result.num_queries == len(ref)
    for q in ref:
        for name in ALL:
            assert result.per_query[q][name] == pytest.approx(ref[q][name], abs=1e-9), (q, name)
    for name in ALL:
        mean = sum(ref[q][name] for q in ref) / len(ref)
        assert result.aggregate[name] == pytest.approx(mean, abs=1e-9), name
    return result


# -- hand-computed values ---------------------------------------------------------------


def test_mrr_relevant_at_rank_3():
    run = {"q": {"a": 0.9, "b": 0.8, "rel": 0.7, "c": 0.1}}
    result = evaluate({"q": {"rel": 1}}, run, ["mrr@10", "mrr@2", "recall@2", "recall@3"])
    assert result.per_query["q"] == {"mrr@10": 1 / 3, "mrr@2": 0.0, "recall@2": 0.0, "recall@3": 1.0}


def test_ndcg_graded_by_hand():
    # ranking: x(0), a(2), y(unjudged), b(1); ideal: a(2), b(1), c(1)
    qrels = {"q": {"a": 2, "b": 1, "c": 1, "x": 0}}
    run = {"q": {"x": 4.0, "a": 3.0, "y": 2.0, "b": 1.0}}
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    result = evaluate(qrels, run, ["ndcg@10", "ndcg@1", "recall@10"])
    assert result.per_query["q"]["ndcg@10"] == pytest.approx(dcg / idcg, abs=1e-12)
    assert result.per_query["q"]["ndcg@1"] == 0.0
    assert result.per_query["q"]["recall@10"] == pytest.approx(2 / 3)


def test_ties_broken_by_doc_id_descending():
    # equal scores: "b" ranks before "a", "d9" before "d10" (string order, not numeric)
    assert evaluate({"q": {"a": 1}}, {"q": {"a": 1.0, "b": 1.0}}, ["mrr@10"]).per_query["q"]["mrr@10"] == 0.5
    assert evaluate({"q": {"b": 1}}, {"q": {"a": 1.0, "b": 1.0}}, ["mrr@10"]).per_query["q"]["mrr@10"] == 1.0
    assert (
        evaluate({"q": {"d9": 1}}, {"q": {"d10": 1.0, "d9": 1.0}}, ["mrr@1"]).per_query["q"]["mrr@1"] == 1.0
    )
    assert [d for d, _ in rank_run({"a": 1.0, "c": 2.0, "b": 1.0})] == ["c", "b", "a"]
    # byte order of UTF-8 (= code-point order): "é" > "z" > "Z", as pytrec_eval ranks them
    assert [d for d, _ in rank_run({"Z": 1.0, "é": 1.0, "z": 1.0})] == ["é", "z", "Z"]


@pytest.mark.parametrize("levels", [None, 5])  # continuous scores (fast path) / heavy ties
def test_rank_run_is_score_then_doc_id_descending(levels):
    rng = np.random.default_rng(3)
    scores = rng.random(300) if levels is None else rng.integers(0, levels, 300) / levels
    run = {f"d{i}": float(s) for i, s in enumerate(scores)}
    expected = sorted(run.items(), key=lambda item: (item[1], item[0]), reverse=True)
    assert rank_run(run) == expected
    assert rank_run(run, depth=7) == expected[:7]


def test_no_relevant_doc_query_counts_as_zero_and_missing_query_too():
    qrels = {"ok": {"d": 1}, "all_zero": {"d": 0}, "missing": {"d": 1}, "no_judgments": {}}
    run = {"ok": {"d": 1.0}, "all_zero": {"d": 1.0}, "not_judged": {"d": 1.0}}
    result = evaluate(qrels, run)
    assert set(result.per_query) == {"ok", "all_zero", "missing"}  # empty judgments skipped
    assert result.num_queries == 3 and result.num_missing == 1
    assert result.per_query["all_zero"] == dict.fromkeys(METRICS, 0.0)
    assert result.per_query["missing"] == dict.fromkeys(METRICS, 0.0)
    assert result.aggregate == dict.fromkeys(METRICS, pytest.approx(1 / 3))


# -- against pytrec_eval ----------------------------------------------------------------


def test_edge_cases_match_pytrec_eval():
    qrels = {
        "tied_cut": {"d03": 1, "d11": 2, "d12": 1, "n1": 0},  # ties straddle rank 10
        "tied_first_rel": {"a": 1, "z": 0},  # relevant doc inside a tie at the top
        "graded": {"g0": 0, "g1": 1, "g2": 2, "g3": 2, "neg": -1},
        "all_zero": {"a": 0, "b": 0},
        "none_retrieved": {"r1": 1, "r2": 2},
        "empty_run": {"r1": 1},
        "missing_from_run": {"r1": 1},
    }
    tied = {f"d{i:02d}": 1.0 for i in range(5, 16)}  # ranks 5-15 share one score
    tied |= {f"d{i:02d}": 2.0 - i / 10 for i in range(5)} | {"n1": 1.0, "x": 0.5}
    run = {
        "tied_cut": tied,
        "tied_first_rel": {"a": 3.0, "b": 3.0, "z": 3.0, "c": 1.0},
        "graded": {"neg": 5.0, "g0": 4.0, "g2": 3.0, "u": 3.0, "g1": 2.0, "g3": -1.0},
        "all_zero": {"a": 1.0, "b": 0.5, "c": 0.2},
        "none_retrieved": {f"u{i}": float(i) for i in range(20)},
        "empty_run": {},
        "not_in_qrels": {"a": 1.0},
    }
    result = assert_matches_reference(qrels, run)
    assert result.num_missing == 1
    assert result.per_query["tied_first_rel"]["mrr@10"] == 1 / 3  # order z, b, a, c


def test_random_runs_match_pytrec_eval():
    rng = np.random.default_rng(0)
    qrels, run = {}, {}
    for i in range(50):
        q = f"q{i}"
        docs = [f"d{j}" for j in rng.choice(400, size=int(rng.integers(1, 150)), replace=False)]
        # coarse scores -> many ties, across cutoffs
        run[q] = {d: float(rng.integers(0, 12)) / 4 for d in docs}
        judged = rng.choice(400, size=int(rng.integers(1, 30)), replace=False)
        qrels[q] = {f"d{j}": int(rng.choice([-1, 0, 0, 1, 1, 2, 3])) for j in judged}
    run.pop("q7")  # one judged query missing from the run
    assert_matches_reference(qrels, run)


def test_float32_scores_and_long_runs():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal(1500).astype(np.float32)
    run = {"q": {f"d{i}": s for i, s in enumerate(scores)}}  # numpy float32 values
    qrels = {"q": {f"d{i}": 1 for i in rng.choice(1500, size=5, replace=False)}}
    ours = evaluate(qrels, run, ALL).per_query["q"]
    ref = reference(qrels, {"q": {d: float(s) for d, s in run["q"].items()}})["q"]
    assert ours == pytest.approx(ref, abs=1e-9)


def test_beir_mrr_agrees_without_ties():
    from beir.retrieval.evaluation import EvaluateRetrieval

    rng = np.random.default_rng(2)
    qrels = {f"q{i}": {f"d{j}": 1 for j in rng.choice(100, size=3, replace=False)} for i in range(20)}
    run = {q: {f"d{j}": float(s) for j, s in enumerate(rng.random(100))} for q in qrels}  # no ties
    beir = EvaluateRetrieval.evaluate_custom(qrels, run, [10], metric="mrr")
    assert evaluate(qrels, run, ["mrr@10"]).aggregate["mrr@10"] == pytest.approx(beir["MRR@10"], abs=1e-5)


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["ndcg", "NDCG@10", "mrr@0", "ndcg_cut_10", "recall@-1", "f1@10"])
def test_bad_metric_name_raises(bad):
    with pytest.raises(ValueError, match="accepted forms"):
        evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, ["mrr@10", bad])
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_metric(bad)


def test_parse_metric_and_other_validation():
    assert parse_metric("recall@1000") == ("recall", 1000)
    with pytest.raises(TypeError, match="string"):
        evaluate({"q": {"d": 1}}, {}, "mrr@10")
    with pytest.raises(ValueError, match="no judged query"):
        evaluate({}, {"q": {"d": 1.0}})
    with pytest.raises(ValueError, match="NaN"):
        evaluate({"q": {"d": 1}}, {"q": {"d": float("nan")}})


# -- TREC run files -----------------------------------------------------------------------


def test_trec_run_round_trip(tmp_path: Path):
    run = {"q1": {"a": 0.1 + 0.2, "b": 1.0, "c": 1.0, "d": -3e-12}, "q2": {"x": 7.0}}
    path = tmp_path / "sub" / "run.trec"
    write_trec_run(path, run, tag="test")
    lines = path.read_text().splitlines()
    assert lines[:3] == ["q1 Q0 c 1 1.0 test", "q1 Q0 b 2 1.0 test", "q1 Q0 a 3 0.30000000000000004 test"]
    assert read_trec_run(path) == run  # exact floats, ties preserved
    assert os.listdir(path.parent) == ["run.trec"]  # no temp file left behind
    write_trec_run(path, run, depth=2)
    assert {q: len(d) for q, d in read_trec_run(path).items()} == {"q1": 2, "q2": 1}


def test_write_failure_keeps_old_file(tmp_path: Path):
    path = tmp_path / "run.trec"
    write_trec_run(path, {"q": {"a": 1.0}})
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run(path, {"q": {"a": 1.0}, "bad q": {"b": 1.0}})
    assert read_trec_run(path) == {"q": {"a": 1.0}}
    assert os.listdir(tmp_path) == ["run.trec"]


@pytest.mark.parametrize(
    "bad_line",
    ["q1 Q0 b 2 0.5", "q1 Q0 b two 0.5 tag", "q1 Q0 b 2 high tag", "q1 Q0 a 3 0.1 tag"],  # last: duplicate
)
def test_read_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str):
    path = tmp_path / "bad.trec"
    path.write_text(f"q1 Q0 a 1 0.9 tag\n\n{bad_line}\n")
    with pytest.raises(ValueError) as err:
        read_trec_run(path)
    assert f"{path}:3" in str(err.value)
