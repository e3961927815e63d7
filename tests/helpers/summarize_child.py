"""Test-only: summarize a corpus with the tiny summarizer, stopping mid-write of a batch to be killed.

`run(...)` is the body of the child process in tests/test_summarize_resume.py (forked, so it
starts without re-importing torch). It builds its own summarizer from conf/summarizer/tiny.yaml,
so the only thing it shares with the parent test is the cache on disk.

As a script, for a manual check in a fresh interpreter:
    RESUME_TEST_KILL_AT_APPEND=3 python tests/helpers/summarize_child.py CORPUS_JSONL CACHE_DIR BATCH_SIZE
then `kill -9` the process once it prints `KILL ME`.

With kill_at=N, the N-th cache append writes only the first half of its bytes (a write torn
by the kill), signals readiness and sleeps until killed: batches 1..N-1 are complete on
disk and batch N is cut in the middle of a line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run(corpus_path: Path, cache_dir: Path, batch_size: int, kill_at: int, ready: Callable[[], Any]) -> None:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from resume.data.beir import load_corpus
    from resume.summaries import cache as cache_module
    from resume.summaries.corpus import summarize_corpus
    from resume.utils.config import compose_node

    torch.set_num_threads(1)
    calls = {"n": 0}
    real_append = cache_module.SummaryCache.append

    def append(self, records):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] != kill_at:
            return real_append(self, records)
        lines = [
            json.dumps({k: r[k] for k in cache_module.FIELDS}, ensure_ascii=False) + "\n" for r in records
        ]
        data = "".join(lines).encode()
        with open(self.path, "ab") as f:  # the first half of this batch's bytes, then the kill
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        ready()
        time.sleep(600)

    cache_module.SummaryCache.append = append  # type: ignore[method-assign]
    cfg = OmegaConf.create({"seed": 0, "summarizer": compose_node("summarizer", ["summarizer=tiny"])})
    summarizer = instantiate(cfg.summarizer)
    summarize_corpus(summarizer, load_corpus(corpus_path), cache_dir, batch_size=batch_size, progress=False)


if __name__ == "__main__":
    run(
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        int(sys.argv[3]),
        int(os.environ.get("RESUME_TEST_KILL_AT_APPEND", "0")),
        ready=lambda: print("KILL ME", flush=True),
    )
    print("FINISHED", flush=True)
