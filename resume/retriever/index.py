"""Encode a corpus to sharded embeddings on disk, then search them with an exact FAISS index.

Encoding and search are separate steps joined by files (Tevatron's shape): a corpus is
encoded shard by shard, each shard written atomically, so a killed encoding resumes at the
first missing shard and search can run elsewhere (or on a GPU) from the same folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resume.utils.io import atomic_save_npy, atomic_write_json

log = logging.getLogger(__name__)


def _faiss() -> Any:
    import faiss  # faiss-cpu here; faiss-gpu (same module name) where installed

    return faiss


def encode_corpus(
    retriever: Any,
    ids: Sequence[str],
    texts: Sequence[str],
    folder: str | Path,
    shard_size: int = 8192,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings [n, d] float32 of `texts`, cached in `folder` (reused if ids/settings match)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    n_shards = (len(ids) + shard_size - 1) // shard_size
    manifest = {"n": len(ids), "shard_size": shard_size, "n_shards": n_shards, "dim": retriever.dim}
    ids_path = folder / "ids.json"
    if ids_path.exists() and json.loads(ids_path.read_text()) != list(ids):
        raise ValueError(f"{ids_path}: the cached ids differ from the corpus being encoded; delete {folder}")
    atomic_write_json(ids_path, list(ids))
    shards = []
    for s in range(n_shards):
        path = folder / f"shard-{s:05d}.npy"
        if path.exists():
            arr = np.load(path)
        else:
            lo, hi = s * shard_size, min(len(ids), (s + 1) * shard_size)
            desc = f"encode corpus shard {s + 1}/{n_shards}"
            arr = retriever.encode_documents(list(texts[lo:hi]), progress=progress, desc=desc).numpy()
            atomic_save_npy(path, arr.astype(np.float32))
        shards.append(arr)
    atomic_write_json(manifest_path, {**manifest, "complete": True})
    return np.concatenate(shards, axis=0) if shards else np.zeros((0, retriever.dim), np.float32)


class FlatIPIndex:
    """Exact inner-product search over L2-normalised vectors (= cosine), on GPU when asked and available."""

    def __init__(self, embeddings: np.ndarray, ids: Sequence[str], use_gpu: bool | str = "auto") -> None:
        faiss = _faiss()
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(f"embeddings shape {emb.shape} does not match {len(ids)} ids")
        self.ids = list(ids)
        index = faiss.IndexFlatIP(emb.shape[1])
        n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.on_gpu = bool(use_gpu) and n_gpus > 0
        if use_gpu is True and n_gpus == 0:
            raise RuntimeError(
                "index.use_gpu=true but faiss sees no GPU (install faiss-gpu, the 'gpu' extra)"
            )
        if self.on_gpu:
            # sharded over all GPUs: the flat index is split by rows, results merged by faiss
            index = (
                faiss.index_cpu_to_all_gpus(index, co=_sharded_options(faiss))
                if n_gpus > 1
                else faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            )
        index.add(emb)
        self.index = index

    def search(self, queries: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, row indices) for each query; k is capped at the index size."""
        k = min(k, len(self.ids))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        scores, idx = [], []
        for lo in range(0, len(q), batch_size):
            s, i = self.index.search(q[lo : lo + batch_size], k)
            scores.append(s)
            idx.append(i)
        return np.concatenate(scores), np.concatenate(idx)

    def run(self, query_ids: Sequence[str], queries: np.ndarray, k: int) -> dict[str, dict[str, float]]:
        """A TREC-style run: query id -> {doc id: score} for the top k."""
        scores, idx = self.search(queries, k)
        return {
            qid: {self.ids[j]: float(s) for s, j in zip(srow, irow) if j >= 0}
            for qid, srow, irow in zip(query_ids, scores, idx)
        }


def _sharded_options(faiss: Any) -> Any:
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True
    return co
