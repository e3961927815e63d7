"""Summarize a corpus through the crash-safe cache, and report what was indexed.

`summarize_corpus` generates only the documents the cache lacks (greedy corpus settings),
batch by batch, appending each batch to the cache before the next starts: a run killed at
any point resumes where it stopped, and no document is ever generated twice.

A completion without the separator has no summary. What gets indexed for it is the
`fallback`, chosen in the config and always visible in the stats:
- `completion`: the whole completion, think tags removed (the model's text, still no
  document leak);
- `document`: the original document. This LEAKS THE BASELINE representation into the
  summary index and flatters a summarizer that fails the format: report it;
- `empty`: an empty string (the document is then unretrievable by content).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from tqdm.auto import tqdm

from resume.data.beir import full_text
from resume.summaries.cache import SummaryCache, doc_hash
from resume.summarizer.generate import Completion, GenerationParams
from resume.summarizer.parsing import parse_completion

log = logging.getLogger(__name__)

Fallback = Literal["completion", "document", "empty"]
FALLBACKS = ("completion", "document", "empty")


class DocumentLike(Protocol):
    title: str
    text: str


@dataclass
class SummaryResult:
    """What `summarize_corpus` produced: the text to index per document, its records and run stats."""

    texts: dict[str, str]  # doc_id -> text to index (summary, or the fallback)
    records: dict[str, dict[str, Any]]  # doc_id -> cache record
    fallback: str
    fallback_ids: list[str] = field(default_factory=list)  # docs indexed through the fallback
    n_generated: int = 0  # generated in this run
    n_cached: int = 0  # found in the cache
    generated_tokens: int = 0  # in this run
    seconds: float = 0.0  # generation wall time of this run
    cache_path: Path | None = None


def _strip_tags(text: str, separator: str) -> str:
    """Remove the separator and its opening tag (`</think>` -> also `<think>`)."""
    out = text.replace(separator, " ")
    if separator.startswith("</") and separator.endswith(">"):
        out = out.replace("<" + separator[2:], " ")
    return " ".join(out.split())


def index_text(record: Mapping[str, Any], doc: DocumentLike, fallback: Fallback, separator: str) -> str:
    """The text indexed for one document: its summary, or the fallback when there is none."""
    if record["summary"] is not None:
        return record["summary"]
    if fallback == "completion":
        return _strip_tags(record["completion"], separator)
    if fallback == "document":
        return full_text(doc.title, doc.text)
    return ""


def make_record(doc_id: str, doc: DocumentLike, completion: Completion, separator: str) -> dict[str, Any]:
    parsed = parse_completion(completion.text, separator)
    return {
        "doc_id": doc_id,
        "doc_hash": doc_hash(doc.title, doc.text),
        "completion": completion.text,
        "summary": parsed.summary,
        "has_separator": parsed.has_separator,
        "num_generated_tokens": completion.num_tokens,
    }


def cache_for(
    summarizer: Any, cache_dir: str | Path, params: GenerationParams, shard: str | None = None
) -> SummaryCache:
    """The cache folder for this summarizer state (weights, tokenizer, prompt, separator) and `params`."""
    key_parts = {
        "fingerprint": summarizer.fingerprint(),
        "generation": params.key(),
        # The engine and its dtype change greedy outputs too (bf16 vs fp32, vLLM vs HF kernels).
        "engine": _engine_key(summarizer),
        "prompt": summarizer.prompt.describe(),
        "separator": summarizer.separator,
    }
    info = {
        "model": summarizer.name,
        "generation_params": params.describe(),
        "engine": _engine_key(summarizer),
    }
    return SummaryCache(cache_dir, key_parts, label=summarizer.name, info=info, shard=shard)


def _engine_key(summarizer: Any) -> dict[str, Any]:
    info = summarizer.backend_info() if callable(getattr(summarizer, "backend_info", None)) else {}
    return {k: info[k] for k in ("engine", "dtype") if k in info}


def _checked(params: GenerationParams, fallback: str, batch_size: int) -> None:
    if fallback not in FALLBACKS:
        raise ValueError(f"summaries fallback={fallback!r} must be one of {FALLBACKS}")
    if batch_size < 1:
        raise ValueError(f"summarize batch_size ({batch_size}) must be >= 1")
    if params.num_return_sequences != 1:
        raise ValueError(f"corpus summaries need num_return_sequences=1, got {params.num_return_sequences}")


def _generate_missing(
    summarizer: Any,
    docs: Mapping[str, DocumentLike],
    todo: list[str],
    cache: SummaryCache,
    params: GenerationParams,
    batch_size: int,
    progress: bool,
    initial: int,
    total: int,
    done: dict[str, dict[str, Any]],
) -> tuple[int, float]:
    """Generate `todo` batch by batch, each batch durable in `cache` before the next; (tokens, seconds)."""
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=initial, desc="summarize", unit="doc", disable=not progress)
    for start in range(0, len(todo), batch_size):
        ids = todo[start : start + batch_size]
        completions = summarizer.summarize([(docs[d].title, docs[d].text) for d in ids], params)
        records = [
            make_record(d, docs[d], c, summarizer.separator) for d, c in zip(ids, completions, strict=True)
        ]
        cache.append(records)  # durable before the next batch starts
        done.update(zip(ids, records))
        tokens += sum(r["num_generated_tokens"] for r in records)
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.update(len(ids))
        bar.set_postfix(
            tok_s=f"{tokens / elapsed:.1f}", sep=f"{np.mean([r['has_separator'] for r in records]):.2f}"
        )
    bar.close()
    return tokens, (time.perf_counter() - t0 if todo else 0.0)


def cached_records(
    cache: SummaryCache, docs: Mapping[str, DocumentLike], hashes: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """doc_id -> cached record, for the documents of `docs` whose text is unchanged since
    (`hashes`: their `doc_hash`es, computed here when not given)."""
    hashes = hashes or {d: doc_hash(doc.title, doc.text) for d, doc in docs.items()}
    return {d: r for d, r in cache.done(hashes).items() if d in docs}


def _longest_first(docs: Mapping[str, DocumentLike], ids: Any) -> list[str]:
    # Similar lengths share a batch (less padding) and an out-of-memory error shows at once.
    return sorted(ids, key=lambda d: (-len(docs[d].text), d))


def summarize_corpus(
    summarizer: Any,
    docs: Mapping[str, DocumentLike],
    cache_dir: str | Path,
    batch_size: int = 64,
    progress: bool = True,
    fallback: Fallback = "completion",
    params: GenerationParams | None = None,
) -> SummaryResult:
    """Summaries of every document in `docs`, generating only those missing from the cache.

    `summarizer` is a `SummarizerModule` (or anything with `summarize`, `fingerprint`,
    `prompt`, `separator`, `name`, `corpus_generation`). `batch_size` documents are generated
    and appended per step: the most a kill can lose. `params` defaults to the summarizer's
    greedy corpus settings. Summaries written by `summarize_shard` (several ranks or jobs)
    are found here: only what no shard has done is generated.
    """
    params = params or summarizer.corpus_generation
    _checked(params, fallback, batch_size)
    cache = cache_for(summarizer, cache_dir, params)
    done = cached_records(cache, docs)
    todo = _longest_first(docs, (d for d in docs if d not in done))
    log.info(
        "summaries: %d of %d documents cached in %s, %d to generate",
        len(done),
        len(docs),
        cache.folder,
        len(todo),
    )
    n_cached = len(done)
    tokens, seconds = _generate_missing(
        summarizer, docs, todo, cache, params, batch_size, progress, n_cached, len(docs), done
    )
    texts, fallback_ids = {}, []
    for d, doc in docs.items():
        rec = done[d]
        if rec["summary"] is None:
            fallback_ids.append(d)
        texts[d] = index_text(rec, doc, fallback, summarizer.separator)
    if fallback_ids:
        log.warning(
            "summaries: %d of %d completions have no %r; indexed through fallback=%s%s",
            len(fallback_ids),
            len(docs),
            summarizer.separator,
            fallback,
            " (the ORIGINAL documents: leaks the baseline)" if fallback == "document" else "",
        )
    return SummaryResult(
        texts=texts,
        records={d: done[d] for d in docs},
        fallback=fallback,
        fallback_ids=fallback_ids,
        n_generated=len(todo),
        n_cached=n_cached,
        generated_tokens=tokens,
        seconds=seconds,
        cache_path=cache.path,
    )


def shard_of(doc_ids: list[str], rank: int, world_size: int) -> list[str]:
    """Rank `rank`'s share of `doc_ids` (already longest first): round robin, so every rank gets
    documents of every length and the ranks finish together."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard rank {rank} of world size {world_size}: need 0 <= rank < world_size")
    return doc_ids[rank::world_size]


def summarize_shard(
    summarizer: Any,
    docs: Mapping[str, DocumentLike],
    cache_dir: str | Path,
    rank: int,
    world_size: int,
    batch_size: int = 64,
    progress: bool = True,
    params: GenerationParams | None = None,
) -> dict[str, Any]:
    """Generate rank `rank`'s share of the corpus into the shared cache, in its own shard file.

    The share is a fixed function of the corpus (every rank computes the same split), so
    ranks need no communication, a killed rank reruns only what its file lacks, and the
    merged cache is what one process would have written (same greedy completions).
    Documents any file already holds are skipped. Returns this shard's counts.
    """
    params = params or summarizer.corpus_generation
    _checked(params, "completion", batch_size)
    cache = cache_for(summarizer, cache_dir, params, shard=f"rank{rank}-of-{world_size}")
    mine = shard_of(_longest_first(docs, docs), rank, world_size)
    done = cached_records(cache, docs)
    todo = [d for d in mine if d not in done]
    log.info(
        "summaries shard %d/%d: %d documents, %d cached, %d to generate into %s",
        rank,
        world_size,
        len(mine),
        len(mine) - len(todo),
        len(todo),
        cache.path,
    )
    tokens, seconds = _generate_missing(
        summarizer, docs, todo, cache, params, batch_size, progress, len(mine) - len(todo), len(mine), done
    )
    return {
        "rank": rank,
        "world_size": world_size,
        "n_docs": len(mine),
        "n_generated": len(todo),
        "generated_tokens": tokens,
        "seconds": seconds,
        "cache": str(cache.path),
    }
