"""Gather finished runs and write the paper's Tables 1-3 (Markdown + CSV), the control rows, the
per-iteration reward watch, summary samples and plots.

    python experiments/report.py outputs/ multirun/ --out report/
    python experiments/report.py experiments/results/cpu_study --out experiments/results/cpu_study

Each table cell is the mean over seeds (± sample std when there are several); the 95% CI column is
a bootstrap over queries (10,000 resamples, fixed seed) of the per-query nDCG@10 averaged over the
row's seeds. Δ columns are the mean per-query difference against a reference row, with its paired
bootstrap 95% CI and a paired two-sided randomisation test (sign flipping, 10,000 draws, fixed seed),
per-query values averaged over the seeds both rows share. Table 1 is compared with the baseline and
with `adapted_baseline` (the control row that gets the same supervised adaptation on documents);
Table 3 each ablation with the full model. Every table names the corpus it indexed and its size, the
query count and the models. The rows come from the configs: Table 1 is `experiment=iterative`'s
evaluation points and its own row, then the control rows; Table 3 every `conf/ablation/*.yaml`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
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
CONTROL_ROWS = {  # not in the paper: conf/experiment/adapted_*.yaml and lead.yaml
    "adapted_baseline": "control: adapted baseline (documents)",
    "adapted_fixed_summary": "control: adapted fixed summary",
    "lead": "control: lead (each document's first words)",
    "adapted_lead": "control: adapted lead",
}
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
                "data": res.get("data"),
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


def bootstrap_ci(
    values: np.ndarray, draws: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (resampling queries with replacement)."""
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(draws, len(values)))
    means = values[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def ci_cell(entries: list[dict[str, Any]], metric: str = "ndcg@10") -> str:
    """95% bootstrap CI over queries of a row's per-query `metric` (averaged over its seeds)."""
    pq = _per_query(entries, metric, {e["seed"] for e in entries})
    if not pq:
        return "–"
    lo, hi = bootstrap_ci(np.array([pq[q] for q in sorted(pq)]))
    return f"[{lo:.3f}, {hi:.3f}]"


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
    lo, hi = bootstrap_ci(x - y)
    return f"{(x - y).mean():+.4f} [{lo:+.3f}, {hi:+.3f}] (p={p:.3g}{'*' if p < 0.05 else ''})"


def table(
    groups,
    data: str,
    split: str,
    rows: list[tuple[str, str, str]],
    metrics: list[str],
    title: str,
    refs: Sequence[tuple[str, tuple[str, str]]] = (("baseline", ("baseline", "none")),),
) -> tuple[str, list[list[str]]]:
    """rows: (label, row name, ablation); each Δ column compares a row with one reference
    (label, (row, ablation)); a reference with no runs gets no column."""
    refs = [(label, ref) for label, ref in refs if groups.get((data, split, *ref))]
    header = [
        "run",
        *metrics,
        "nDCG@10 95% CI",
        *[f"Δ nDCG@10 vs {label} [95% CI] (paired p)" for label, _ in refs],
        "seeds",
        "corpus indexed",
        "queries",
    ]
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
            ci_cell(entries),
            *[significance(groups, data, split, row, ablation, ref) for _, ref in refs],
            ", ".join(str(e["seed"]) for e in entries),
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
            json.dumps({k: short_model(v) for k, v in e["models"].items()}, sort_keys=True)
            for (d, s, _, _), es in groups.items()
            if d == data
            for e in es
        }
    )
    datasets = sorted(
        {
            f"{e['data']['name']}, {e['data']['corpus_size']} docs, queries per split "
            + json.dumps(e["data"].get("splits", {}), sort_keys=True)
            for (d, s, _, _), es in groups.items()
            if d == data and s == split
            for e in es
            if "corpus_size" in (e.get("data") or {})
        }
    )
    note = (
        "Δ: mean per-query difference, its paired bootstrap 95% CI and the paired randomisation p "
        "(* p < 0.05) over the queries and the seeds both rows share; cells average all of a row's seeds"
    )
    md += ["", note, f"budget: {'; '.join(budgets)}"]
    md += [f"data: {'; '.join(datasets)}"] if datasets else []
    md += [f"models: {'; '.join(models)}", ""]
    return "\n".join(md), out


def short_model(name: str | None) -> str | None:
    """A model as the table shows it: a hub name as is, a local folder by its last three parts (for a
    trained model: the run, its iteration and the model, e.g. scifact-iterative-none-s1/iter2/retriever)."""
    if name is None or not Path(name).is_absolute():
        return name
    return "/".join(Path(name).parts[-3:])


def run_config(run: str | Path, key: str) -> Any:
    """The `key` node of the run's resolved config (`config_resolved.yaml`), None when either is absent."""
    from omegaconf import OmegaConf

    cfg_path = Path(run) / "config_resolved.yaml"
    return OmegaConf.load(cfg_path).get(key) if cfg_path.exists() else None


def transfer_source(run: str | Path) -> tuple[str, int] | None:
    """(source run folder name, iteration) of a run that evaluates another run's trained models
    (experiment=transfer), from its resolved config; None for a run that trained its own."""
    node = run_config(run, "transfer")
    if not node or not node.get("run"):
        return None
    return Path(str(node.run)).name, int(node.iteration)


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
        title, path = f"{data} – iterative – {ablation}", out / f"iterations_{data}_{ablation}.png"
        written.append(_save_figure(fig, axes, title, path))
    return written


def _save_figure(fig: Any, axes: Any, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grpo_history(run: str | Path, iteration: int) -> list[dict[str, Any]]:
    """The GRPO round's per-step records (train/* and val/*), [] when the round left none."""
    path = Path(run) / f"iter{iteration}" / "grpo_history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summaries(run: str | Path, label: str) -> dict[str, dict[str, Any]] | None:
    """doc id -> record of `<run>/summaries/<label>.jsonl` (or its .gz copy), None when absent."""
    import gzip

    for path in (Path(run) / "summaries" / f"{label}.jsonl", Path(run) / "summaries" / f"{label}.jsonl.gz"):
        if path.exists():
            if path.suffix == ".gz":
                with gzip.open(path, "rt") as f:
                    raw = f.read()
            else:
                raw = path.read_text()
            return {r["doc_id"]: r for r in map(json.loads, raw.splitlines()) if r}
    return None


_DATA: dict[str, Any] = {}
PATH_KEYS = ("shared_data", "data_dir", "root_dir")  # most specific first: shared_data lies under root_dir


def checkout_paths() -> dict[str, str]:
    """This checkout's `paths.shared_data`, `data_dir` and `root_dir`, resolved by conf/paths/default.yaml's
    own rules (`RESUME_SHARED_DATA`, else `<repo>/../shared/data`)."""
    from omegaconf import OmegaConf

    from resume.utils.config import CONFIG_DIR, register_resolvers

    register_resolvers()
    cfg = OmegaConf.create({"paths": OmegaConf.load(CONFIG_DIR / "paths" / "default.yaml")})
    return {k: str(cfg.paths[k]) for k in PATH_KEYS}


def rebase_paths(
    data: dict[str, Any], run_paths: dict[str, Any] | None, here: dict[str, str]
) -> dict[str, Any]:
    """`data` (a resolved data config) with every string under the run's own `paths` (the machine it ran
    on: e.g. `/work/study/../shared/data/nfcorpus`) moved under this checkout's, so that committed results
    from another machine or folder load here. Values outside those paths are kept."""
    out = dict(data)
    for k, v in data.items():
        if not isinstance(v, str):
            continue
        for key in PATH_KEYS:
            old = str((run_paths or {}).get(key) or "")
            if old and (v == old or v.startswith(old.rstrip("/") + "/")):
                out[k] = here[key] + v[len(old) :]
                break
    return out


def run_data(run: str | Path) -> Any:
    """The run's dataset, rebuilt from its resolved config with its paths moved to this checkout's
    (`rebase_paths`); None when it cannot be loaded here."""
    from omegaconf import OmegaConf

    node = run_config(run, "data")
    if node is None:
        return None
    paths = run_config(run, "paths")
    run_paths = OmegaConf.to_container(paths, resolve=False) if paths is not None else None
    data = rebase_paths(OmegaConf.to_container(node), run_paths, checkout_paths())
    key = json.dumps(data, sort_keys=True)
    if key not in _DATA:
        from hydra.utils import instantiate

        try:
            _DATA[key] = instantiate(data)
        except Exception as e:  # noqa: BLE001 -- not on this machine: say so, do not invent the column
            where = Path(run) / "config_resolved.yaml"
            print(f"note: {where}: data not loadable here ({type(e).__name__}: {e}); no query overlap")
            _DATA[key] = None
    return _DATA[key]


def train_query_overlap(run: str | Path, label: str) -> tuple[float, float] | None:
    """Keyword-stuffing watch: mean over documents judged relevant to a training query of the share
    of those queries' content words that the summary contains, and the same for the document itself
    (what an honest summary inherits)."""
    from resume.loop.phases import train_queries_by_doc
    from resume.rewards.diagnostics import query_overlap

    data, summaries = run_data(run), read_summaries(run, label)
    if data is None or summaries is None:
        return None
    queries = train_queries_by_doc(data)  # what the run's own summary statistics use
    docs = [d for d in queries if d in summaries and summaries[d]["summary"] is not None]
    if not docs:
        return None
    texts = data.full_texts()
    summ = float(np.mean([query_overlap(summaries[d]["summary"], queries[d]) for d in docs]))
    doc = float(np.mean([query_overlap(texts[d], queries[d]) for d in docs]))
    return summ, doc


def _first_last(history: list[dict[str, Any]], key: str) -> str:
    vals = [h[key] for h in history if h.get(key) is not None]
    return f"{vals[0]:+.3f} → {vals[-1]:+.3f}" if vals else "–"


def _buckets(history: list[dict[str, Any]]) -> str:
    """The round's histogram of Delta buckets (share of scored rollouts per bucket, low to high)."""
    keys = sorted({k for h in history for k in h if k.startswith("train/bucket_")}, key=lambda k: int(k[13:]))
    if not keys:
        return "–"
    return " ".join(f"{np.mean([h.get(k, 0.0) for h in history]):.2f}" for k in keys)


def reward_watch(groups, data: str) -> str:
    """Per run and iteration of the iterative rows: the reward and its two terms, Delta, the separator
    rate, the bucket histogram, dev MRR@10, and the summaries' length, repetition and query overlap."""
    split = eval_split_of(groups, data)
    header = [
        "run",
        "t",
        "reward (first → last step)",
        "structure term",
        "retrieval term",
        "mean Δ",
        "rollout separator rate",
        "Δ buckets (share per bucket, low → high)",
        "dev MRR@10",
        "summary tokens",
        "corpus separator failures",
        "repetition",
        "train-query overlap: summary / document",
    ]
    lines = [f"### Reward watch – {data}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (d, s, row, ablation), entries in sorted(groups.items()):
        if d != data or s != split or row != "iterative":
            continue
        for e in entries:
            run = e["run"]
            summaries = json.loads((Path(run) / "results.json").read_text()).get("summaries", {})
            its = {it["iteration"]: it for it in e["iterations"]}
            source = transfer_source(run)
            for t in range(max(its, default=0) + 1):
                it = its.get(t, {})
                hist = grpo_history(run, t) if t else []
                stats = summaries.get(f"iter{t}", {})
                overlap = train_query_overlap(run, f"iter{t}")
                cells = [
                    f"{ablation} s{e['seed']}",
                    f"{t} (the models of {source[0]}, t = {source[1]})" if source else str(t),
                    _first_last(hist, "train/reward_mean"),
                    _first_last(hist, "train/structure_mean"),
                    _first_last(hist, "train/retrieval_mean"),
                    _first_last(hist, "train/delta_mean"),
                    _first_last(hist, "train/separator_rate"),
                    _buckets(hist),
                    f"{it['dev']['mrr@10']:.4f}" if "dev" in it else "–",
                    f"{stats['summary_tokens_mean']:.1f}" if stats.get("summary_tokens_mean") else "–",
                    f"{stats['separator_failure_rate']:.3f}" if "separator_failure_rate" in stats else "–",
                    f"{stats['repetition_mean']:.3f}" if stats.get("repetition_mean") is not None else "–",
                    f"{overlap[0]:.3f} / {overlap[1]:.3f}" if overlap else "–",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    if len(lines) == 4:
        return ""
    lines += [
        "",
        (
            "t = 0 is the untrained summarizer (a transferred run's t = 0: the source run's trained one, "
            "as named). Reward terms are the GRPO rollouts' means at the round's "
            "first and last step; Δ = retrieval score of the summary minus the document's (METHOD.md); "
            "buckets follow reward.bucket_edges. Repetition: share of repeated word 3-grams. Train-query "
            "overlap: share of the content words of a document's training queries found in its summary "
            "(left) and in the document itself (right); a summary far above its document copies queries."
        ),
        "",
    ]
    return "\n".join(lines)


def summary_samples(groups, data: str, n: int = 5, seed: int = 0) -> str:
    """`n` seeded documents: the untrained summary and the final one of the full model's first seed.
    For a transferred full model (its only summaries are the trained summarizer's), the untrained
    summaries come from the dataset's fixed_summary run, when there is one."""
    split = eval_split_of(groups, data)
    entries = groups.get((data, split, "iterative", "none"))
    if not entries:
        return ""
    e = entries[0]
    last = max((it["iteration"] for it in e["iterations"]), default=0)
    source = transfer_source(e["run"])
    if source:
        fixed = groups.get((data, split, "fixed_summary", "none"))
        before = read_summaries(fixed[0]["run"], "iter0") if fixed else None
        after = read_summaries(e["run"], "iter0")
        whose = f"the models of {source[0]} (t = {source[1]})"
        heading = f"untrained summarizer and after GRPO ({whose})"
    else:
        before, after = read_summaries(e["run"], "iter0"), read_summaries(e["run"], f"iter{last}")
        heading = f"full model seed {e['seed']}: before GRPO (t = 0) and after (t = {last})"
    if not before or not after:
        return ""
    ids = sorted(set(before) & set(after))
    pick = np.random.default_rng(seed).choice(len(ids), size=min(n, len(ids)), replace=False)

    def show(rec: dict[str, Any]) -> str:
        text = rec["summary"] if rec["summary"] is not None else f"(no separator) {rec['completion']}"
        return " ".join(text.split()).replace("|", "\\|")

    lines = [f"### Summary samples – {data}, {heading}", ""]
    for i in sorted(pick):
        d = ids[i]
        lines += [f"- **{d}** before: {show(before[d])}", f"  - after: {show(after[d])}"]
    return "\n".join([*lines, ""])


def row_iteration(run: str | Path, res: dict[str, Any], row: str) -> int:
    """The iteration whose summaries `row` indexed: its `loop.eval_points` entry in the run's resolved
    config, else (the run's own row) the last iteration the run reached."""
    loop = run_config(run, "loop")
    for point in loop.get("eval_points", []) if loop is not None else []:
        if point.row == row:
            return int(point.get("iteration", 0))
    return max((it["iteration"] for it in res.get("iterations", [])), default=0)


def efficiency(groups, data: str) -> str:
    """What the paper's efficiency motive is about: words indexed, index size, corpus encode time."""
    from resume.rewards.diagnostics import words

    split = eval_split_of(groups, data)
    lines = [
        f"### Index over summaries vs documents – {data}",
        "",
        "| row | view | words per indexed text | index bytes | corpus encode s |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for (d, s, row, ablation), entries in sorted(groups.items()):
        if d != data or s != split or ablation != "none":
            continue
        e = entries[0]
        res = json.loads((Path(e["run"]) / "results.json").read_text())
        for r in res.get("rows", []):
            if r["row"] != row or r["split"] != split or row in seen:
                continue
            seen.add(row)
            view = r.get("view", "documents")
            if view in ("documents", "lead"):
                ds = run_data(e["run"])
                if ds is None:
                    texts = []
                elif view == "lead":
                    texts = list(ds.lead_texts(run_config(e["run"], "loop")["lead_words"]).values())
                else:
                    texts = list(ds.full_texts().values())
            else:
                recs = read_summaries(e["run"], f"iter{row_iteration(e['run'], res, row)}") or {}
                texts = [x["indexed_text"] for x in recs.values()]
            n_words = f"{np.mean([len(words(x)) for x in texts]):.1f}" if texts else "–"
            # the row's first split encoded the corpus; its later splits found the embeddings cached
            encodes = [x.get("seconds", {}).get("encode_corpus") for x in res["rows"] if x["row"] == row]
            enc = max((sec for sec in encodes if sec is not None), default=None)
            lines.append(
                f"| {row} | {r.get('view', '–')} | {n_words} | {r.get('index', {}).get('bytes', '–')} | "
                f"{enc if enc is not None else '–'} |"
            )
    lines += [
        "",
        (
            "A flat inner-product index costs the same bytes per text whatever its length; what summaries "
            "save is encoding (and, for a long-document corpus, truncation). Encode time is the longest over "
            "the row's splits (the first encodes, the others read the cache); ~0 where an earlier row of "
            "the run had already encoded the same texts."
        ),
        "",
    ]
    return "\n".join(lines) if len(lines) > 7 else ""


def plot_grpo_steps(groups, out: Path) -> list[Path]:
    """Per GRPO step across the iterations of each iterative run: reward, its two terms, Delta and
    the separator rate (dotted lines: iteration boundaries)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("reward", "train/reward_mean"),
        ("structure term", "train/structure_mean"),
        ("retrieval term", "train/retrieval_mean"),
        ("mean Δ", "train/delta_mean"),
        ("separator rate", "train/separator_rate"),
    ]
    written = []
    for (data, split, row, ablation), entries in groups.items():
        if row != "iterative" or split != eval_split_of(groups, data):
            continue
        series = []
        for e in entries:
            steps, bounds = [], []
            for it in sorted(it["iteration"] for it in e["iterations"]):
                hist = [h for h in grpo_history(e["run"], it) if "train/reward_mean" in h]
                bounds.append(len(steps))
                steps += hist
            series.append((e["seed"], steps, bounds))
        if not any(steps for _, steps, _ in series):
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(20, 3.2))
        for ax, (name, key) in zip(axes, keys):
            for seed, steps, bounds in series:
                ax.plot([h.get(key) for h in steps], label=f"seed {seed}")
                for b in bounds[1:]:
                    ax.axvline(b - 0.5, ls=":", c="grey")
            ax.set_title(name)
            ax.set_xlabel("GRPO step (all iterations)")
        title = f"{data} – iterative – {ablation}: GRPO rollouts per step"
        written.append(_save_figure(fig, axes, title, out / f"grpo_steps_{data}_{ablation}.png"))
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
        [(r, r, "none") for r in PAPER_ROWS] + [(label, r, "none") for r, label in CONTROL_ROWS.items()],
        metrics,
        f"{main_name.replace('table', 'Table ')} – {data} ({split})",
        refs=[
            ("baseline", ("baseline", "none")),
            ("adapted baseline", ("adapted_baseline", "none")),
            ("full model", ("iterative", "none")),
        ],
    )
    t3, c3 = table(
        groups,
        data,
        split,
        [(ABLATION_LABELS.get(a, a), "iterative", a) for a in ABLATIONS],
        ["ndcg@10"],
        f"Table 3 – ablations – {data} ({split})",
        refs=[("full model", ("iterative", "none"))],
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
        sections += [x for x in (efficiency(groups, data), reward_watch(groups, data)) if x]
        samples = summary_samples(groups, data)
        if samples:
            sections.append(samples)
            (out / f"samples_{data}.md").write_text(samples)
    plots = plot_iterations(groups, out) + plot_grpo_steps(groups, out)
    text = "\n".join(sections) + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    (out / "tables.md").write_text(text)
    print(text)
    print(f"written: {out}/tables.md, {out}/table*_*.csv, {len(plots)} plot(s)")


if __name__ == "__main__":
    main()
