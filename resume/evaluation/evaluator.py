"""Evaluate a retriever over one representation of the corpus (documents or summaries)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resume.data import RetrievalData
from resume.evaluation.metrics import METRICS, evaluate, write_trec_run
from resume.retriever.index import FlatIPIndex, encode_corpus
from resume.utils.hashing import fingerprint_texts
from resume.utils.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class Evaluator:
    """Encode (cached), index, search top_k, score with trec_eval semantics, write the run file."""

    top_k: int = 1000
    metrics: Sequence[str] = METRICS
    use_gpu: bool | str = "auto"
    shard_size: int = 8192
    progress: bool = True

    def __call__(
        self,
        retriever: Any,
        data: RetrievalData,
        split: str,
        doc_texts: Mapping[str, str],
        label: str,
        out_dir: str | Path,
        cache_dir: str | Path,
    ) -> dict[str, Any]:
        """Metrics and provenance for `split`, searching `doc_texts` (doc id -> text under test)."""
        sp = data.split(split)
        ids = list(doc_texts)
        texts = [doc_texts[d] for d in ids]
        t0 = time.perf_counter()
        key = f"{retriever.fingerprint()}-{fingerprint_texts(zip(ids, texts))}"
        emb = encode_corpus(
            retriever, ids, texts, Path(cache_dir) / "embeddings" / key, self.shard_size, self.progress
        )
        t_encode = time.perf_counter() - t0
        qids = list(sp.queries)
        q_emb = retriever.encode_queries([sp.queries[q] for q in qids], progress=self.progress).numpy()
        index = FlatIPIndex(emb, ids, use_gpu=self.use_gpu)
        run = index.run(qids, q_emb, self.top_k)
        result = evaluate(sp.qrels, run, list(self.metrics))
        run_path = Path(out_dir) / "runs" / f"{split}-{label}.trec"
        write_trec_run(run_path, run, tag=f"resume-{label}", depth=self.top_k)
        atomic_write_json(run_path.with_suffix(".per_query.json"), result.per_query)
        t_total = time.perf_counter() - t0
        log.info("eval %s (%s): %s (%.1fs)", split, label, result.aggregate, t_total)
        return {
            "metrics": dict(result.aggregate),
            "split": split,
            "num_queries": result.num_queries,
            "corpus": {"name": data.name, "size": len(ids), "source": data.source},
            "index": {
                "type": "faiss.IndexFlatIP",
                "on_gpu": index.on_gpu,
                "bytes": int(emb.nbytes),
                "dim": int(emb.shape[1]),
            },
            "run_file": str(run_path),
            "per_query_file": str(run_path.with_suffix(".per_query.json")),
            "embeddings": key,
            "seconds": {"encode_corpus": round(t_encode, 2), "total": round(t_total, 2)},
        }
