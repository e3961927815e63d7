"""The table the main command prints: its header names the budget, the generation engine and what the
GRPO update's forwards ran in."""

from __future__ import annotations

from resume.train import results_table


def _results(iterations: list) -> dict:
    row = {
        "row": "baseline",
        "split": "test",
        "corpus": {"name": "toy", "size": 3},
        "view": "documents",
        "num_queries": 2,
        "metrics": {"ndcg@10": 0.5},
    }
    return {
        "metric_names": ["ndcg@10"],
        "budget": "smoke: toy",
        "ablation": "none",
        "summarizer": {"generation": {"engine": "vllm", "dtype": "bfloat16"}},
        "iterations": iterations,
        "rows": [row],
    }


def test_the_header_says_what_generated_and_what_the_grpo_update_ran_in():
    rounds = [{"grpo": {"autocast": "bfloat16"}}, {"grpo": {"autocast": "bfloat16"}}, {"grpo": None}]
    lines = results_table(_results(rounds)).splitlines()
    assert lines[:3] == ["budget: smoke: toy", "generation: vllm bfloat16", "GRPO update: bfloat16 autocast"]
    assert lines[-1] == "| baseline | none | test | toy: 3 documents | 2 | 0.5000 |"
    assert "GRPO update: fp32\n" in results_table(_results([{"grpo": {"autocast": "off"}}]))
    assert "GRPO update" not in results_table(_results([]))  # no GRPO round ran (e.g. the baseline)
