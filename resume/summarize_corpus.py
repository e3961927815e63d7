"""`python -m resume.summarize_corpus`: summarize a corpus into the shared cache, sharded over ranks.

Each rank takes a fixed round-robin share of the corpus (longest documents first, so ranks
finish together), generates what the cache lacks of it, and appends to its own shard file
(`summaries.rank<r>-of-<n>.jsonl`): no rank ever waits for another while generating, a
killed rank reruns only its missing documents, and a training run started afterwards
(`python -m resume.train` with the same summarizer) generates nothing. With `shard.merge`
rank 0 then waits for the other shards (a `torch.distributed` barrier when launched by
torchrun, else polling the cache) and writes the merged statistics.

Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or from
`shard.rank=` / `shard.world_size=` (independent jobs, e.g. a Slurm array).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from resume.data import register_data_resolvers
from resume.summaries.cache import doc_hash
from resume.summaries.corpus import cache_for, cached_records, summarize_corpus, summarize_shard
from resume.summarizer.vllm_engine import release_engines
from resume.utils.config import register_resolvers
from resume.utils.io import atomic_write_json

log = logging.getLogger("resume")

# Before @hydra.main composes: hydra.run.dir and paths.* interpolate these resolvers.
register_resolvers()
register_data_resolvers()


_CREATED_GROUP: list[bool] = []  # whether this module created the default process group (and must destroy it)


def _init_distributed(world_size: int, wait_minutes: float) -> bool:
    """Join torchrun's process group when there is one (used only for the final barrier, whose
    timeout is `shard.wait_minutes`: ranks may finish their shares minutes apart)."""
    if world_size <= 1 or "MASTER_ADDR" not in os.environ or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=wait_minutes)
        )
        _CREATED_GROUP.append(True)
    return True


def run(cfg: DictConfig) -> dict:
    rank, world, local = int(cfg.shard.rank), int(cfg.shard.world_size), int(cfg.shard.local_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    distributed = _init_distributed(world, float(cfg.shard.wait_minutes))
    data = instantiate(cfg.data)
    summarizer = instantiate(cfg.summarizer)
    docs = data.corpus
    opts = {"batch_size": cfg.summaries.batch_size, "progress": cfg.summaries.progress}
    stats = summarize_shard(summarizer, docs, cfg.paths.cache_dir, rank, world, **opts)
    log.info("shard %d/%d done: %s", rank, world, stats)
    if distributed and cfg.shard.merge:
        torch.distributed.barrier()  # every rank's share is in the cache
    if not cfg.shard.merge or rank != 0:
        return stats
    if not distributed:  # independent jobs: wait until the other shards' summaries are all in the cache
        cache = cache_for(summarizer, cfg.paths.cache_dir, summarizer.corpus_generation)
        hashes = {d: doc_hash(doc.title, doc.text) for d, doc in docs.items()}
        deadline = time.monotonic() + 60 * float(cfg.shard.wait_minutes)
        while (n := len(cached_records(cache, docs, hashes))) < len(docs):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"shard.wait_minutes={cfg.shard.wait_minutes} passed with {len(docs) - n} of {len(docs)} "
                    f"summaries missing from {cache.folder} (files: {[p.name for p in cache.files()]}); "
                    "rerun the missing ranks (each resumes its own shard), then this one"
                )
            log.info("waiting for the other shards (%d of %d summaries in the cache)", n, len(docs))
            time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))
    merged = summarize_corpus(summarizer, docs, cfg.paths.cache_dir, fallback=cfg.summaries.fallback, **opts)
    if merged.n_generated:
        raise RuntimeError(
            f"rank 0 had to generate {merged.n_generated} documents after every shard finished"
        )
    out = {
        "shard": stats,
        "n_docs": len(docs),
        "n_fallback": len(merged.fallback_ids),
        "cache": str(Path(merged.cache_path).parent) if merged.cache_path else None,
        "summarizer": summarizer.name,
        "data": data.describe(),
    }
    atomic_write_json(Path(cfg.paths.output_dir) / "summaries.json", out)
    print(json.dumps({k: v for k, v in out.items() if k != "data"}, indent=1))
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="summarize_corpus")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    finally:
        release_engines()
        # Only the group this module created: an in-process vLLM engine initialises one of its own and
        # tears it down at exit (destroying it here made vLLM's exit handler fail).
        if _CREATED_GROUP and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
