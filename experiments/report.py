"""Gather finished runs and write the paper's Tables 1-3 (Markdown + CSV) and per-iteration plots.

    python experiments/report.py outputs/ multirun/ --out report/

Each table cell is the mean over seeds (± sample std when there are several). Significance
is a paired two-sided randomisation test (sign flipping, 10,000 draws, fixed seed) of
per-query nDCG@10 against the baseline row on the same data and split, per-query values
averaged over the seeds both rows share; Table 3 compares each ablation with the full model.
Every table names the corpus it indexed and its size, the query count and the models. The rows
come from the configs: Table 1 is `experiment=iterative`'s evaluation points and its own row,
Table 3 every `conf/ablation/*.yaml`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"


def table1_rows(conf: Path = CONF) -> list[str]:
    """Table 1's rows as the configs define them: the evaluation points of `experiment=iterative`,
    then its own row (a row added there as a YAML entry shows up here too)."""
    exp = yaml.safe_load((conf / "experiment" / "iterative.yaml").read_text())
    points = [p["row"] for p in exp.get("loop", {}).get("eval_points", [])]
    return [*points, exp["experiment_name"]]


def ablation_names(conf: Path = CONF) -> list[str]:
    """Table 3's rows: every `conf/ablation/*.yaml`, in the paper's order (new ones after, by name)."""
    names = [
        yaml.safe_load(f.read_text())["ablation_name"] for f in sorted((conf / "ablation").glob("*.yaml"))
    ]
    order = list(ABLATION_LABELS)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


ABLATION_LABELS = {
    "none": "Full model",
    "no_adaptation": "w/o retrieval adaptation",
    "no_negatives": "w/o negative queries",
    "no_discrete_reward": "w/o discrete reward",
}
PAPER_ROWS = table1_rows()
ABLATIONS = ablation_names()
TABLE1_METRICS = ["mrr@10", "ndcg@10", "recall@100", "recall@1000"]
TABLE2_METRICS = ["mrr@10", "ndcg@10", "recall@100"]


def find_results(folders: Iterable[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            try:
                found.append((path, json.loads(path.read_text())))
            except json.JSONDecodeError as e:
                raise SystemExit(
                    f"{path}: not valid JSON ({e}); a run still writing? delete or finish it"
                ) from None
    return found


def collect(
    found: list[tuple[Path, dict[str, Any]]],
) -> dict[tuple[str, str, str, str], list[dict[str, Any]]]:
    """(data, split, row, ablation) -> one entry per seed: metrics, per-query file, corpus, models."""
    groups: dict[tuple[str, str, str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for path, res in found:
        for row in res.get("rows", []):
            key = (res["data"]["name"], row["split"], row["row"], res.get("ablation", "none"))
            pq = Path(row.get("per_query_file", ""))
            if not pq.is_absolute() or not pq.exists():
                pq = path.parent / "runs" / pq.name
            groups[key][int(res.get("seed", 0))] = {  # a later file for the same seed replaces an earlier one
                "metrics": row["metrics"],
                "per_query": pq if pq.exists() else None,
                "corpus": row["corpus"],
                "num_queries": row["num_queries"],
                "budget": res.get("budget"),
                "models": {
                    "retriever": res.get("retriever", {}).get("name"),
                    "summarizer": (res.get("summarizer") or {}).get("name"),
                },
                "iterations": res.get("iterations", []),
                "run": str(path.parent),
            }
    return {k: [v[s] | {"seed": s} for s in sorted(v)] for k, v in groups.items()}


def paired_randomization(a: np.ndarray, b: np.ndarray, draws: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of mean(a - b) under random sign flips of the paired differences."""
    d = a - b
    if len(d) == 0 or np.allclose(d, 0):
        return 1.0
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(draws, len(d)))
    null = np.abs((signs * d).mean(axis=1))
    return float((np.sum(null >= abs(d.mean()) - 1e-12) + 1) / (draws + 1))


def _per_query(entries: list[dict[str, Any]], metric: str, seeds: set[int]) -> dict[str, float]:
    """Per-query metric averaged over the given seeds."""
    acc: dict[str, list[float]] = defaultdict(list)
    for e in entries:
        if e["seed"] in seeds and e["per_query"] is not None:
            for q, m in json.loads(Path(e["per_query"]).read_text()).items():
                acc[q].append(m[metric])
    return {q: float(np.mean(v)) for q, v in acc.items()}


def cell(entries: list[dict[str, Any]], metric: str) -> tuple[str, float]:
    vals = [e["metrics"][metric] for e in entries if metric in e["metrics"]]
    if not vals:
        return "–", float("nan")
    mean = statistics.fmean(vals)
    text = f"{mean:.4f}" + (f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else "")
    return text, mean


def significance(
    groups, data: str, split: str, row: str, ablation: str, ref: tuple[str, str], metric: str = "ndcg@10"
) -> str:
    """Mean per-query difference in `metric` of (row, ablation) against the reference (row, ablation),
    with the paired randomisation p-value, over the queries and seeds both share."""
    base = groups.get((data, split, *ref))
    mine = groups.get((data, split, row, ablation))
    if (row, ablation) == ref or not base or not mine:
        return ""
    seeds = {e["seed"] for e in base} & {e["seed"] for e in mine}
    a, b = _per_query(mine, metric, seeds), _per_query(base, metric, seeds)
    common = sorted(set(a) & set(b))
    if not common:
        return "n/a"
    x, y = np.array([a[q] for q in common]), np.array([b[q] for q in common])
    p = paired_randomization(x, y)
    return f"{(x - y).mean():+.4f} (p={p:.3g}{'*' if p < 0.05 else ''})"


def table(
    groups,
    data: str,
    split: str,
    rows: list[tuple[str, str, str]],
    metrics: list[str],
    title: str,
    ref: tuple[str, str] = ("baseline", "none"),
    ref_label: str = "baseline",
) -> tuple[str, list[list[str]]]:
    """rows: (label, row name, ablation); the significance column compares each row with `ref`."""
    header = ["run", *metrics, f"Δ nDCG@10 vs {ref_label} (paired)", "seeds", "corpus indexed", "queries"]
    md = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out = [header]
    for label, row, ablation in rows:
        entries = groups.get((data, split, row, ablation))
        if not entries:
            continue
        cells = [cell(entries, m)[0] for m in metrics]
        corpus = entries[0]["corpus"]
        line = [
            label,
            *cells,
            significance(groups, data, split, row, ablation, ref),
            str(len(entries)),
            f"{corpus['name']} ({corpus['size']} docs)",
            str(entries[0]["num_queries"]),
        ]
        md.append("| " + " | ".join(line) + " |")
        out.append(line)
    if len(md) == 4:
        md.append("| (no finished runs) |" + " |" * (len(header) - 1))
    budgets = sorted(
        {str(e["budget"]) for (d, s, _, _), es in groups.items() if d == data and s == split for e in es}
    )
    models = sorted(
        {
            json.dumps(e["models"], sort_keys=True)
            for (d, s, _, _), es in groups.items()
            if d == data
            for e in es
        }
    )
    note = (
        "Δ: mean per-query difference and paired randomisation p over the queries and the seeds both rows "
        "share (cells average all of a row's seeds)"
    )
    md += ["", note, f"budget: {'; '.join(budgets)}", f"models: {'; '.join(models)}", ""]
    return "\n".join(md), out


def eval_split_of(groups, data: str) -> str:
    splits = {s for (d, s, _, _) in groups if d == data}
    return "test" if "test" in splits else min(splits - {"dev"} or splits)


def plot_iterations(groups, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    panels = [
        ("reward", lambda it: it.get("grpo", {}).get("reward_mean")),
        ("dev MRR@10", lambda it: it.get("dev", {}).get("mrr@10")),
        ("summary length (retriever tokens)", lambda it: it.get("summaries", {}).get("summary_tokens_mean")),
        ("separator failure rate", lambda it: it.get("summaries", {}).get("separator_failure_rate")),
    ]
    for (data, split, row, ablation), entries in groups.items():
        if row != "iterative" or split != eval_split_of(groups, data):
            continue
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
        for ax, (name, get) in zip(axes, panels):
            for e in entries:
                xs = [it["iteration"] for it in e["iterations"] if get(it) is not None]
                ax.plot(
                    xs,
                    [get(it) for it in e["iterations"] if get(it) is not None],
                    marker="o",
                    label=f"seed {e['seed']}",
                )
            ax.set_title(name)
            ax.set_xlabel("iteration")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{data} – iterative – {ablation}")
        fig.tight_layout()
        path = out / f"iterations_{data}_{ablation}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def paper_tables(groups, data: str) -> list[tuple[str, str, list[list[str]]]]:
    """(name, Markdown, CSV rows) of the paper's tables for one dataset: Table 1 (Table 2 for the
    out-of-domain NFCorpus, without R@1000) against the baseline, and Table 3 against the full model."""
    split = eval_split_of(groups, data)
    main_name, metrics = ("table2", TABLE2_METRICS) if data == "nfcorpus" else ("table1", TABLE1_METRICS)
    t1, c1 = table(
        groups,
        data,
        split,
        [(r, r, "none") for r in PAPER_ROWS],
        metrics,
        f"{main_name.replace('table', 'Table ')} – {data} ({split})",
    )
    t3, c3 = table(
        groups,
        data,
        split,
        [(ABLATION_LABELS.get(a, a), "iterative", a) for a in ABLATIONS],
        ["ndcg@10"],
        f"Table 3 – ablations – {data} ({split})",
        ref=("iterative", "none"),
        ref_label="full model",
    )
    return [(main_name, t1, c1), ("table3", t3, c3)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="folders searched recursively for results.json")
    ap.add_argument("--out", default="report", help="where tables (md, csv) and plots go")
    args = ap.parse_args(argv)
    found = find_results(args.folders)
    if not found:
        raise SystemExit(f"no results.json under {args.folders}")
    groups = collect(found)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for data in sorted({d for (d, _, _, _) in groups}):
        for name, md, rows in paper_tables(groups, data):
            sections.append(md)
            with (out / f"{name}_{data}.csv").open("w", newline="") as f:
                csv.writer(f).writerows(rows)
    plots = plot_iterations(groups, out)
    text = "\n".join(sections) + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    (out / "tables.md").write_text(text)
    print(text)
    print(f"written: {out}/tables.md, {out}/table*_*.csv, {len(plots)} plot(s)")


if __name__ == "__main__":
    main()
