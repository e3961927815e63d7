"""A tiny synthetic BEIR dataset, written by code, for tests and smoke runs.

Each document belongs to a topic and carries two key words of its own, buried in filler;
each query names one document's key words plus a topic word, and is judged relevant to that
document only. A retriever can learn it and a summarizer can learn to keep the key words,
which is what the learning tests need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from resume.utils.lexicon import FILLER, lexicon


def write_toy(
    folder: str | Path,
    n_topics: int = 4,
    docs_per_topic: int = 8,
    doc_words: int = 60,
    train_fraction: float = 0.75,
    seed: int = 0,
) -> Path:
    """Write corpus.jsonl, queries.jsonl, qrels/{train,test}.tsv into `folder`, atomically as a whole.

    The files are written into a private sibling folder that is then renamed into place, so a
    concurrent reader (another rank or job) never sees a half-written dataset; when two
    processes race, the first rename wins and the other's identical copy is discarded.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    (staging / "qrels").mkdir()
    rng = np.random.default_rng(seed)
    vocab = lexicon(seed)
    used: set[str] = set()
    pool = [w for w in vocab if w not in FILLER]
    rng.shuffle(pool)
    it = iter(pool)
    docs, queries, qrels = [], [], []
    for t in range(n_topics):
        topic = [next(it) for _ in range(3)]
        for j in range(docs_per_topic):
            keys = [next(it) for _ in range(2)]
            used.update(keys)
            body = list(rng.choice(FILLER, size=doc_words - 6)) + topic + keys + keys[:1]
            rng.shuffle(body)
            did = f"d{t}_{j}"
            docs.append({"_id": did, "title": f"{topic[0]} {keys[0]}", "text": " ".join(body) + "."})
            qid = f"q{t}_{j}"
            queries.append({"_id": qid, "text": f"{keys[0]} {keys[1]} {topic[int(rng.integers(3))]}"})
            qrels.append((qid, did))
    order = rng.permutation(len(qrels))
    n_train = round(train_fraction * len(qrels))
    files = {
        "corpus.jsonl": "".join(json.dumps(d) + "\n" for d in docs),
        "queries.jsonl": "".join(json.dumps(q) + "\n" for q in queries),
        "qrels/train.tsv": "query-id\tcorpus-id\tscore\n"
        + "".join(f"{qrels[i][0]}\t{qrels[i][1]}\t1\n" for i in order[:n_train]),
        "qrels/test.tsv": "query-id\tcorpus-id\tscore\n"
        + "".join(f"{qrels[i][0]}\t{qrels[i][1]}\t1\n" for i in order[n_train:]),
    }
    for rel, content in files.items():
        (staging / rel).write_text(content, encoding="utf-8")
    try:
        os.rename(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "corpus.jsonl").is_file():
            raise
    return folder
