"""The loop's phases, built from configured pieces: each returns the callable `Loop` expects.

`train.py` builds these once from the config; `Loop` only calls them. Keeping the glue here
lets the loop stay ignorant of caches, tokenizers and trainers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from resume.data import RetrievalData
from resume.retriever.adapt import training_pairs
from resume.rewards.diagnostics import query_overlap, repetition_score
from resume.summaries.corpus import summarize_corpus, summarize_shard
from resume.summaries.stats import summary_stats
from resume.utils import distributed
from resume.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def make_summarize(
    data: RetrievalData,
    cache_dir: str | Path,
    out_dir: str | Path,
    count_tokens: Callable[[str], int],
    batch_size: int = 16,
    fallback: str = "completion",
    progress: bool = True,
) -> Callable[[Any, str], tuple[dict[str, str], dict[str, Any]]]:
    """Summarize the whole corpus (cached by weights + settings); copy the summaries into the run folder,
    with the reward-hacking watch: repetition, overlap with the training queries' words, and the same
    five documents' summaries at every iteration (`summaries/samples.md`).

    On N ranks each generates its share into its own shard of the cache (`summarize_shard`), then,
    after a barrier, every rank reads the whole corpus's summaries from the cache; rank 0 writes the
    run-folder files."""
    watch: dict[str, Any] = {}  # built at the first corpus pass: a run that never summarizes pays nothing
    samples: dict[str, dict[str, str]] = {}  # label -> doc -> indexed text

    def watched() -> dict[str, Any]:
        if not watch:
            positives = train_queries_by_doc(data)
            texts = data.full_texts()
            ids = sorted(data.corpus)
            pick = np.random.default_rng(0).choice(len(ids), size=min(5, len(ids)), replace=False)
            watch.update(
                positives=positives,
                document_overlap=float(np.mean([query_overlap(texts[d], qs) for d, qs in positives.items()]))
                if positives
                else None,
                sample_ids=[ids[i] for i in sorted(pick)],
            )
        return watch

    def summarize(summarizer: Any, label: str) -> tuple[dict[str, str], dict[str, Any]]:
        rank, world = distributed.rank(), distributed.world_size()
        shards = None
        if world > 1:
            mine = summarize_shard(summarizer, data.corpus, cache_dir, rank, world, batch_size, progress)
            distributed.barrier()  # every share is in the cache
            shards = distributed.all_gather(mine)
        result = summarize_corpus(summarizer, data.corpus, cache_dir, batch_size, progress, fallback)
        if shards is not None and result.n_generated:
            raise RuntimeError(
                f"rank {rank} generated {result.n_generated} summaries after every shard was done: the "
                f"ranks do not share the cache folder {cache_dir} (paths.cache_dir must be on a shared disk)"
            )
        positives, sample_ids = watched()["positives"], watch["sample_ids"]
        stats = summary_stats(result, count_tokens)
        summaries = [r["summary"] for r in result.records.values() if r["summary"] is not None]
        stats["repetition_mean"] = (
            float(np.mean([repetition_score(s) for s in summaries])) if summaries else None
        )
        scored = [d for d in positives if result.records[d]["summary"] is not None]
        stats["train_query_overlap"] = (
            float(np.mean([query_overlap(result.records[d]["summary"], positives[d]) for d in scored]))
            if scored
            else None
        )
        stats["train_query_overlap_documents"] = watch["document_overlap"]  # what the documents hold
        if shards is not None:
            stats["shards"] = shards  # what each rank generated
        samples[label] = {d: result.texts[d] for d in sample_ids}
        stats["cache_file"] = str(result.cache_path)
        if not distributed.is_main():
            return result.texts, stats
        atomic_write_text(Path(out_dir) / "summaries" / "samples.md", samples_markdown(data, samples))
        lines = (
            json.dumps(
                {
                    "doc_id": d,
                    "indexed_text": result.texts[d],
                    "summary": r["summary"],
                    "has_separator": r["has_separator"],
                    "completion": r["completion"],
                }
            )
            + "\n"
            for d, r in result.records.items()
        )
        atomic_write_text(Path(out_dir) / "summaries" / f"{label}.jsonl", "".join(lines))
        log.info("summaries %s: %s", label, {k: v for k, v in stats.items() if not isinstance(v, str)})
        return result.texts, stats

    return summarize


def train_queries_by_doc(data: RetrievalData) -> dict[str, list[str]]:
    """doc id -> the texts of the training queries judged relevant to it (empty without a train split)."""
    if "train" not in data.splits:
        return {}
    split = data.splits["train"]
    out: dict[str, list[str]] = {}
    for q, docs in split.qrels.items():
        for d, rel in docs.items():
            if rel > 0 and q in split.queries and d in data.corpus:
                out.setdefault(d, []).append(split.queries[q])
    return out


def samples_markdown(data: RetrievalData, samples: Mapping[str, Mapping[str, str]]) -> str:
    """The same documents' indexed summaries, one block per document, one line per summary label."""
    lines = ["# Summary samples: the same five documents at every iteration", ""]
    for d in next(iter(samples.values()), {}):
        doc = data.corpus[d]
        lines += [f"## {d}: {doc.title}", "", f"document: {' '.join(doc.text.split())[:600]}", ""]
        lines += [f"- **{label}**: {' '.join(texts[d].split())}" for label, texts in samples.items()]
        lines.append("")
    return "\n".join(lines)


def make_adapt(
    adapt: Callable[..., dict[str, float]],
    data: RetrievalData,
    train_split: str = "train",
    loggers: Any = None,
) -> Callable[[Any, Mapping[str, str], int, Path], dict[str, Any]]:
    """Contrastive fine-tuning on (training query, indexed text of a relevant document); saves the
    retriever."""
    split = data.split(train_split)

    def run(retriever: Any, texts: Mapping[str, str], iteration: int, folder: Path) -> dict[str, Any]:
        pairs = training_pairs(split, texts)
        stats = adapt(retriever, pairs, doc_texts=texts, loggers=loggers)
        if distributed.is_main():  # every rank holds the same weights after DDP
            retriever.save_pretrained(folder)
        distributed.barrier()
        return {**stats, "pairs": len(pairs)}

    return run


def make_grpo(
    grpo: Callable[..., dict[str, Any]],
    reward: Callable[..., Any],
    data: RetrievalData,
    loggers: Any = None,
    log_metrics: Callable[[Mapping[str, float], int | None], None] | None = None,
    train_split: str = "train",
) -> Callable[[Any, Any, int, Path], dict[str, Any]]:
    """GRPO against a reward built on the current (frozen) retriever and the TRAINING split only.

    `reward` is the configured factory (`conf/reward/`); it receives the training queries and
    qrels alone, so dev and test queries can never reach the reward. `grpo` is `run_grpo`'s
    factory (`conf/grpo/`, `resume.grpo.run_grpo`); it exports the trained summarizer to `<folder>`.
    """
    split = data.split(train_split)
    doc_texts = data.full_texts()

    def run(summarizer: Any, retriever: Any, iteration: int, folder: Path) -> dict[str, Any]:
        model = reward(retriever=retriever, doc_texts=doc_texts, queries=split.queries, qrels=split.qrels)
        # `iteration` reseeds the run: otherwise every round replays the same documents and samples
        stats = grpo(
            summarizer, model, data.corpus, out_dir=folder.parent, loggers=loggers, iteration=iteration
        )
        if Path(stats.get("summarizer", folder)) != folder:
            raise RuntimeError(f"GRPO exported the summarizer to {stats['summarizer']}, expected {folder}")
        if log_metrics is not None:
            log_metrics(
                {f"loop/grpo/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}, iteration
            )
        return stats

    return run
