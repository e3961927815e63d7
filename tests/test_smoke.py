"""End-to-end runs through the real entry point on toy data with tiny random models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra.utils import instantiate

from resume.evaluation.metrics import read_trec_run
from resume.train import run


def test_baseline_smoke_run_writes_everything(compose_in_tmp, tmp_path):
    cfg = compose_in_tmp(["debug=smoke", "experiment=baseline"])
    results = run(cfg)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"][-1]["metrics"] == results["rows"][-1]["metrics"]
    m = saved["rows"][-1]["metrics"]
    assert set(m) == {"mrr@10", "ndcg@10", "recall@100", "recall@1000"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert saved["data"]["name"] == "toy" and saved["data"]["corpus_size"] == 32
    assert saved["rows"][-1]["corpus"]["size"] == 32 and saved["rows"][-1]["num_queries"] == 8
    assert (out / "config_resolved.yaml").exists() and (out / "csv" / "metrics.csv").exists()
    trec = read_trec_run(out / "runs" / "test-baseline-documents.trec")
    assert len(trec) == 8 and all(len(docs) == 32 for docs in trec.values())  # top_k capped at corpus size
    assert [r["split"] for r in saved["rows"]] == ["dev", "test"]  # dev carved from train


def test_rerun_with_other_config_refuses_to_overwrite(compose_in_tmp):
    run(compose_in_tmp(["debug=smoke"]))
    with pytest.raises(RuntimeError, match="different configuration"):
        run(compose_in_tmp(["debug=smoke", "eval.top_k=10"]))


def test_local_encoder_folder_as_retriever(compose_in_tmp, tmp_path):
    """How users bring their own model: retriever.model=<any local HF encoder folder>."""
    cfg = compose_in_tmp(["retriever=tiny"])
    tiny = instantiate(cfg.retriever)
    folder = tmp_path / "my-encoder"
    tiny.encoder.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    cfg = compose_in_tmp(["debug=smoke", f"retriever.model={folder}", "~retriever.config", "tag=-local"])
    results = run(cfg)
    assert results["retriever"]["name"] == str(folder)
    ref = tiny.encode_documents(["zesudo gemoki"])
    mine = instantiate(cfg.retriever).encode_documents(["zesudo gemoki"])
    assert (ref - mine).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("experiment", "phases"),
    [("fixed_summary", []), ("non_iterative", ["iter1-grpo"])],
)
def test_standalone_experiments_run(compose_in_tmp, tmp_path, experiment, phases):
    """Each paper row also runs as its own experiment, with only the phases it needs."""
    results = run(
        compose_in_tmp(
            [
                "debug=smoke",
                f"experiment={experiment}",
                "grpo.config.steps=1",
                "grpo.config.val_every=0",
                "logger=none",
            ]
        )
    )
    assert [r["row"] for r in results["rows"]] == [experiment, experiment]  # dev, test
    assert all(r["view"] == "summaries" for r in results["rows"])
    done = sorted(p.stem for p in (tmp_path / "out" / "phases").glob("*.json"))
    assert done == phases  # non_iterative: GRPO, no adaptation
    assert results["summarizer"] is not None
    # the final evaluation reuses the iteration's summaries: their statistics are not overwritten
    # by a second, cache-hit call
    last = results["summaries"][max(results["summaries"])]
    assert last["n_generated"] + last["cache_hits"] == last["n_docs"]
    assert f"summarize/{max(results['summaries'])}" in results["seconds"]


def test_paper_preset_runs_offline_on_a_tiny_msmarco_format_copy(compose_in_tmp, tmp_path):
    """experiment=paper_iterative end to end (the paper's grpo/adaptation settings, bf16-mixed) on a
    tiny BEIR folder laid out as MS MARCO's (train + dev qrels), models swapped for tiny ones."""
    from resume.data.toy import write_toy

    folder = write_toy(tmp_path / "msmarco", seed=3)
    (folder / "qrels" / "test.tsv").rename(folder / "qrels" / "dev.tsv")
    results = run(
        compose_in_tmp(
            [
                "experiment=paper_iterative",
                f"data.path={folder}",
                "summarizer=tiny",
                "retriever=tiny",
                "budget.max_iterations=1",
                "grpo.config.steps=1",
                "grpo.config.prompts_per_step=2",
                "grpo.config.num_generations=2",
                "grpo.config.mini_batch_size=2",
                "grpo.config.val_every=0",
                "grpo.config.max_new_tokens=8",
                "grpo.config.log_completions_every=0",
                "reward.n_negatives=4",
                "adaptation.batch_size=4",
                "logger=none",
            ]
        )
    )
    assert results["data"]["name"] == "msmarco"
    assert [(r["row"], r["split"]) for r in results["rows"]] == [
        ("baseline", "dev"),
        ("fixed_summary", "dev"),
        ("non_iterative", "dev"),
        ("iterative", "dev"),
    ]
    cfg = (tmp_path / "out" / "config_resolved.yaml").read_text()
    assert "precision: bf16-mixed" in cfg and "lr: 3.0e-07" in cfg
    assert sorted(p.stem for p in (tmp_path / "out" / "phases").glob("*.json")) == [
        "iter1-adapt",
        "iter1-grpo",
    ]


def test_run_folder_check_compares_configs_as_data(tmp_path):
    """The same settings written in another key order are the same run; another value is refused."""
    from resume.train import _check_run_folder

    (tmp_path / "config_resolved.yaml").write_text("a: 1\nb:\n  c: 2\n  d: [1, 2]\n")
    _check_run_folder(tmp_path, "b:\n  d: [1, 2]\n  c: 2\na: 1\n")
    with pytest.raises(RuntimeError, match="different configuration"):
        _check_run_folder(tmp_path, "a: 1\nb:\n  c: 3\n  d: [1, 2]\n")


def test_a_new_row_is_a_yaml_entry(compose_in_tmp):
    """loop.eval_points adds rows without code: one reached (iteration 0), one the run never reaches
    (iteration 1 of a T=0 run), which is reported, not silently dropped."""
    points = "[{row: probe, iteration: 0, view: documents, splits: [test]}, {row: later, iteration: 1}]"
    results = run(compose_in_tmp(["debug=smoke", "experiment=baseline", f"loop.eval_points={points}"]))
    assert [(r["row"], r["split"]) for r in results["rows"]] == [
        ("probe", "test"), ("baseline", "dev"), ("baseline", "test"),
    ]  # fmt: skip
    assert results["rows"][0]["metrics"] == results["rows"][-1]["metrics"]  # the same state, indexed twice
    assert results["unreached_eval_points"] == ["later"]


def test_adapted_baseline_trains_on_documents_without_a_summarizer(compose_in_tmp, tmp_path):
    """Control row: the iterative row's adaptation recipe on (query, document) pairs, T rounds."""
    results = run(compose_in_tmp(["debug=smoke", "experiment=adapted_baseline", "logger=none"]))
    assert results["summarizer"] is None  # no LLM is loaded for it
    assert [r["row"] for r in results["rows"]] == ["adapted_baseline"] * 2
    assert all(r["view"] == "documents" for r in results["rows"])
    phases = sorted(p.stem for p in (tmp_path / "out" / "phases").glob("*.json"))
    assert phases == ["iter1-adapt", "iter2-adapt"]
    assert [it["adapt"]["view"] for it in results["iterations"]] == ["documents", "documents"]
    assert {it["dev"]["ndcg@10"] for it in results["iterations"]}  # dev evaluated over documents
    for key, mem in results["memory_mb"].items():
        assert 0 < mem["start_mb"] <= mem["peak_mb"], key
        if Path("/proc/self/statm").exists():  # the run's own part of the peak (no library file pages)
            assert 0 < mem["peak_anon_mb"] < mem["peak_mb"], key
    if Path("/proc/self/statm").exists():
        assert results["peak_anon_mb"] == max(m["peak_anon_mb"] for m in results["memory_mb"].values())
        assert results["peak_anon_mb"] < results["peak_rss_mb"]


def test_the_lead_row_indexes_each_documents_first_words(compose_in_tmp, tmp_path):
    """experiment=lead: the original retriever over the first `loop.lead_words` words of each document,
    no LLM; with a lead longer than every document it is the baseline to the digit."""
    short = run(compose_in_tmp(["debug=smoke", "experiment=lead", "loop.lead_words=3", "logger=none"]))
    assert short["summarizer"] is None
    assert [(r["row"], r["view"]) for r in short["rows"]] == [("lead", "lead")] * 2
    shutil.rmtree(tmp_path / "out")
    whole = run(compose_in_tmp(["debug=smoke", "experiment=lead", "loop.lead_words=100000", "logger=none"]))
    shutil.rmtree(tmp_path / "out")
    base = run(compose_in_tmp(["debug=smoke", "experiment=baseline", "logger=none"]))
    assert [r["metrics"] for r in whole["rows"]] == [r["metrics"] for r in base["rows"]]
    assert [r["metrics"] for r in short["rows"]] != [r["metrics"] for r in base["rows"]]


def test_adapted_lead_adapts_on_the_leads_without_a_summarizer(compose_in_tmp, tmp_path):
    results = run(
        compose_in_tmp(["debug=smoke", "experiment=adapted_lead", "loop.lead_words=3", "logger=none"])
    )
    assert results["summarizer"] is None
    assert [(r["row"], r["view"]) for r in results["rows"]] == [("adapted_lead", "lead")] * 2
    assert [it["adapt"]["view"] for it in results["iterations"]] == ["lead", "lead"]
    phases = sorted(p.stem for p in (tmp_path / "out" / "phases").glob("*.json"))
    assert phases == ["iter1-adapt", "iter2-adapt"]


def test_adapted_fixed_summary_adapts_on_the_untrained_summaries(compose_in_tmp, tmp_path):
    results = run(compose_in_tmp(["debug=smoke", "experiment=adapted_fixed_summary", "logger=none"]))
    assert [r["view"] for r in results["rows"]] == ["summaries"] * 2
    phases = sorted(p.stem for p in (tmp_path / "out" / "phases").glob("*.json"))
    assert phases == ["iter1-adapt", "iter2-adapt"]  # no GRPO
    assert [it["adapt"]["view"] for it in results["iterations"]] == ["summaries", "summaries"]
    # the summarizer never changes: iteration 1 generates the untrained summaries, iteration 2
    # finds every one of them in the cache
    assert results["summaries"]["iter1"]["n_generated"] == results["summaries"]["iter1"]["n_docs"]
    assert results["summaries"]["iter2"]["n_generated"] == 0
    assert results["summaries"]["iter2"]["cache_file"] == results["summaries"]["iter1"]["cache_file"]
    # the reward-hacking watch: overlap with the training queries' words, and the same five documents'
    # summaries at every iteration in the run folder
    for label in ("iter1", "iter2"):
        stats = results["summaries"][label]
        if stats["separator_failure_rate"] < 1.0:
            assert 0.0 <= stats["train_query_overlap"] <= 1.0
        else:  # the tiny random model rarely writes the separator: no summary to score
            assert stats["train_query_overlap"] is None
        assert 0.0 < stats["train_query_overlap_documents"] <= 1.0  # toy docs hold their queries' words
    samples = (tmp_path / "out" / "summaries" / "samples.md").read_text()
    assert samples.count("\n## ") == 5
    assert samples.count("- **iter1**") == samples.count("- **iter2**") == 5


def test_transfer_evaluates_a_finished_runs_models(compose_in_tmp, tmp_path):
    """experiment=transfer (Table 2) loads a run's last summarizer and retriever: on the same data it
    reproduces that run's own final row exactly, and it trains nothing."""
    fast = ["grpo.config.steps=1", "grpo.config.val_every=0", "logger=none"]
    first = run(compose_in_tmp(["debug=smoke", "experiment=iterative", *fast]))
    source = tmp_path / "source"
    (tmp_path / "out").rename(source)
    again = run(compose_in_tmp(["debug=smoke", "experiment=transfer", f"transfer.run={source}", *fast]))
    assert again["iterations"] == [] and not list((tmp_path / "out" / "phases").glob("*.json"))
    assert again["summarizer"]["name"] == str(source / "iter2" / "summarizer")
    assert again["retriever"]["name"] == str(source / "iter2" / "retriever")
    mine = {r["split"]: r["metrics"] for r in again["rows"]}
    theirs = {r["split"]: r["metrics"] for r in first["rows"] if r["row"] == "iterative"}
    assert mine == theirs
