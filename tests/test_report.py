"""experiments/report.py on hand-made run folders: cells, spread, paired differences, p-values, files."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import report

QUERIES = ["q1", "q2", "q3", "q4", "q5"]


def _run(root: Path, ablation: str, seed: int, rows: dict[str, list[float]]) -> None:
    """A finished run folder: one test row per entry, per-query nDCG@10 as given."""
    folder = root / f"scifact-iterative-{ablation}-s{seed}"
    (folder / "runs").mkdir(parents=True)
    out = []
    for row, values in rows.items():
        pq = folder / "runs" / f"test-{row}.per_query.json"
        pq.write_text(json.dumps({q: {"ndcg@10": v} for q, v in zip(QUERIES, values)}))
        m = float(np.mean(values))
        out.append(
            {
                "row": row,
                "split": "test",
                "per_query_file": str(pq),
                "num_queries": len(values),
                "corpus": {"name": "scifact", "size": 32},
                "metrics": {"mrr@10": m, "ndcg@10": m, "recall@100": 1.0, "recall@1000": 1.0},
            }
        )
    iterations = [
        {
            "iteration": t,
            "grpo": {"reward_mean": 0.1 * t},
            "dev": {"mrr@10": 0.5},
            "summaries": {"summary_tokens_mean": 40.0 + t, "separator_failure_rate": 0.0},
        }
        for t in (1, 2)
    ]
    (folder / "results.json").write_text(
        json.dumps(
            {
                "data": {"name": "scifact"},
                "ablation": ablation,
                "seed": seed,
                "budget": "test budget",
                "rows": out,
                "retriever": {"name": "r"},
                "summarizer": {"name": "s"},
                "iterations": iterations,
            }
        )
    )


def exact_p(d: np.ndarray) -> float:
    """Two-sided sign-flip p-value by full enumeration."""
    null = [abs(np.mean(np.array(s) * d)) for s in itertools.product([-1, 1], repeat=len(d))]
    return float(np.mean([n >= abs(d.mean()) - 1e-12 for n in null]))


def test_tables_cells_spread_and_paired_tests(tmp_path, capsys):
    base = [0.2, 0.4, 0.6, 0.8, 1.0]
    full = {0: [0.5, 0.6, 0.7, 0.9, 1.0], 1: [0.4, 0.6, 0.9, 0.9, 1.0]}
    for seed in (0, 1):
        _run(tmp_path, "none", seed, {"baseline": base, "iterative": full[seed]})
        _run(tmp_path, "no_adaptation", seed, {"iterative": base[::-1]})
    report.main([str(tmp_path), "--out", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "tables.md").read_text()
    t1 = next(line for line in md.splitlines() if line.startswith("| iterative ")).split(" | ")
    means = [np.mean(full[s]) for s in (0, 1)]
    assert t1[2] == f"{np.mean(means):.4f} ± {np.std(means, ddof=1):.4f}"  # nDCG@10 over the seeds
    d = np.mean([full[0], full[1]], axis=0) - np.array(base)  # per-query, averaged over shared seeds
    # 95% bootstrap CI over queries of the seed-averaged per-query nDCG@10: inside the observed range
    lo, hi = (float(x) for x in t1[5].strip("[]").split(", "))
    pooled = np.mean([full[0], full[1]], axis=0)
    assert pooled.min() <= lo < pooled.mean() < hi <= pooled.max()
    assert (lo, hi) == pytest.approx(report.bootstrap_ci(pooled), abs=1e-3)
    delta, rest = t1[6].split(" [")
    ci, p = rest.split("] (p=")
    assert float(delta) == pytest.approx(d.mean(), abs=1e-4)
    assert float(p.rstrip("*)")) == pytest.approx(exact_p(d), abs=0.02)
    assert tuple(float(x) for x in ci.split(", ")) == pytest.approx(report.bootstrap_ci(d), abs=1e-3)
    t3 = next(line for line in md.splitlines() if line.startswith("| w/o retrieval adaptation")).split(" | ")
    d3 = np.array(base[::-1]) - np.mean([full[0], full[1]], axis=0)  # Table 3: against the full model
    assert float(t3[3].split(" [")[0]) == pytest.approx(d3.mean(), abs=1e-4)
    assert "Δ nDCG@10 vs full model" in md and "Δ nDCG@10 vs baseline" in md
    assert "budget: test budget" in md and (tmp_path / "rep" / "table3_scifact.csv").is_file()
    assert (tmp_path / "rep" / "iterations_scifact_none.png").is_file()
    assert "w/o negative queries" not in md  # rows without runs are left out, not invented
    assert "vs adapted baseline" not in md  # no adapted_baseline run: no column against it


def test_bootstrap_ci_covers_the_mean_and_narrows_with_more_queries():
    rng = np.random.default_rng(1)
    small, large = rng.random(30), rng.random(3000)
    lo_s, hi_s = report.bootstrap_ci(small)
    lo_l, hi_l = report.bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 5  # ~ 1/sqrt(n): 10x narrower for 100x the queries
    assert report.bootstrap_ci(np.full(10, 0.5)) == (0.5, 0.5)


def test_control_rows_are_reported_against_the_adapted_baseline(tmp_path):
    base, adapted, full = [0.2, 0.4, 0.6, 0.8, 1.0], [0.3, 0.5, 0.6, 0.8, 1.0], [0.5, 0.6, 0.7, 0.9, 1.0]
    _run(tmp_path, "none", 0, {"baseline": base, "iterative": full})
    folder = tmp_path / "ctrl"
    _run(folder, "none", 0, {"adapted_baseline": adapted})
    report.main([str(tmp_path), "--out", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "tables.md").read_text()
    assert "Δ nDCG@10 vs adapted baseline" in md
    line = next(x for x in md.splitlines() if x.startswith("| iterative ")).split(" | ")
    header = next(x for x in md.splitlines() if x.startswith("| run ")).split(" | ")
    col = next(i for i, h in enumerate(header) if h.startswith("Δ nDCG@10 vs adapted baseline"))
    assert float(line[col].split(" [")[0]) == pytest.approx(np.mean(full) - np.mean(adapted), abs=1e-4)
    assert any(x.startswith("| control: adapted baseline (documents) ") for x in md.splitlines())


def test_paired_randomization_matches_enumeration():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random(8), rng.random(8)
        assert report.paired_randomization(a, b) == pytest.approx(exact_p(a - b), abs=0.02)
    assert report.paired_randomization(np.ones(4), np.ones(4)) == 1.0


def test_notebook_rebuilds_the_tables_from_a_results_folder(tmp_path, monkeypatch):
    """Runs the notebook's code cells (IPython's display stubbed) against hand-made runs."""
    import types

    shown: list = []
    display_mod = types.ModuleType("IPython.display")
    display_mod.Markdown = lambda text: ("md", text)
    display_mod.Image = lambda filename: ("img", filename)
    display_mod.display = shown.append
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", display_mod)
    _run(tmp_path / "runs", "none", 0, {"baseline": [0.2, 0.4, 0.6, 0.8, 1.0], "iterative": [0.5] * 5})
    nb = json.loads((Path(report.__file__).parents[1] / "notebooks" / "01_results.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    ns: dict = {}
    monkeypatch.chdir(Path(report.__file__).parents[1])
    exec(cells[0], ns)  # noqa: S102 -- our own notebook
    ns["RESULTS"], ns["OUT"] = [tmp_path / "runs"], tmp_path / "out"
    for code in cells[1:]:
        exec(code, ns)  # noqa: S102
    tables = [text for kind, text in shown if kind == "md"]
    assert len(tables) == 2 and "| iterative | 0.5000" in tables[0] and "Table 3" in tables[1]
    assert [kind for kind, _ in shown].count("img") == 1


def test_a_transferred_full_model_is_labelled_by_its_source_and_sampled_against_the_untrained(tmp_path):
    """Table 2's transfer row: its t = 0 summaries are the *trained* summarizer's, so the report names
    the source run and takes the untrained summaries from the dataset's fixed_summary run."""
    source = "/elsewhere/outputs/scifact-iterative-none-s1"
    runs = {"fixed": ("fixed_summary", "untrained words"), "transfer": ("iterative", "trained words")}
    for name, (row, text) in runs.items():
        folder = tmp_path / name
        (folder / "summaries").mkdir(parents=True)
        recs = [{"doc_id": f"d{i}", "summary": f"{text} {i}", "completion": ""} for i in range(3)]
        (folder / "summaries" / "iter0.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
        transfer = f"transfer:\n  run: {source}\n  iteration: 2\n" if name == "transfer" else ""
        (folder / "config_resolved.yaml").write_text(f"loop:\n  max_iterations: 0\n{transfer}")
        pq = folder / "runs" / f"test-{row}.per_query.json"
        pq.parent.mkdir()
        pq.write_text(json.dumps({q: {"ndcg@10": 0.5} for q in QUERIES}))
        model = f"{source}/iter2/summarizer" if name == "transfer" else "HuggingFaceTB/SmolLM2"
        res = {
            "data": {"name": "nfcorpus", "corpus_size": 3, "splits": {"test": 5}},
            "seed": 0,
            "budget": "b",
            "retriever": {"name": "r"},
            "summarizer": {"name": model},
            "iterations": [],
            "rows": [
                {
                    "row": row,
                    "split": "test",
                    "per_query_file": str(pq),
                    "num_queries": 5,
                    "corpus": {"name": "nfcorpus", "size": 3},
                    "metrics": {"ndcg@10": 0.5},
                }
            ],
        }
        (folder / "results.json").write_text(json.dumps(res))
    assert report.transfer_source(tmp_path / "transfer") == ("scifact-iterative-none-s1", 2)
    assert report.transfer_source(tmp_path / "fixed") is None
    report.main([str(tmp_path), "--out", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "tables.md").read_text()
    assert '"summarizer": "scifact-iterative-none-s1/iter2/summarizer"' in md  # not the machine's path
    assert "data: nfcorpus, 3 docs" in md
    samples = (tmp_path / "rep" / "samples_nfcorpus.md").read_text()
    assert "the models of scifact-iterative-none-s1 (t = 2)" in samples
    assert "before: untrained words 0" in samples and "after: trained words 0" in samples


def test_committed_results_from_another_machine_load_their_data_here(tmp_path, monkeypatch):
    """A results folder's resolved config names the paths of the machine it ran on (here a folder that
    does not exist, as a committed study job's `/work/study/...` on a new machine): the report finds the
    same dataset under this checkout's paths, and keeps values outside those paths as they are."""
    shared = tmp_path / "shared" / "data"
    folder = shared / "mini"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"text {i}"}) + "\n" for i in range(3))
    )
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "text"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    monkeypatch.setenv("RESUME_SHARED_DATA", str(shared))
    gone = "/nonexistent/machine/study"
    run = tmp_path / "scifact-iterative-none-s0"
    run.mkdir()
    (run / "config_resolved.yaml").write_text(
        yaml.safe_dump(
            {
                "paths": {
                    "root_dir": gone,
                    "data_dir": f"{gone}/data",
                    "shared_data": f"{gone}/../shared/data",
                },
                "data": {
                    "_target_": "resume.data.load_dataset",
                    "name": "mini",
                    "path": f"{gone}/../shared/data/mini",
                    "download_dir": f"{gone}/data",
                    "url": "https://example.org/mini.zip",
                    "splits": ["test"],
                    "eval_split": "test",
                },
            }
        )
    )
    here = report.checkout_paths()
    assert here["shared_data"] == str(shared)
    data = report.run_data(run)
    assert data is not None and sorted(data.corpus) == ["d0", "d1", "d2"]
    moved = report.rebase_paths(
        {"path": f"{gone}/data/x", "url": "https://example.org/mini.zip", "n": 3},
        {"data_dir": f"{gone}/data"},
        here,
    )
    assert moved == {"path": f"{here['data_dir']}/x", "url": "https://example.org/mini.zip", "n": 3}
    # a path only sharing a prefix with the run's folder is not moved
    assert report.rebase_paths({"path": f"{gone}2/x"}, {"root_dir": gone}, here) == {"path": f"{gone}2/x"}
