"""Summarizers for the benches: a conf/summarizer/ file, or Qwen3-4B's architecture at random weights."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from resume.data.beir import Document
from resume.utils.config import compose_node

SCIFACT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "scifact" / "corpus.jsonl"


def bench_docs(n: int) -> dict[str, Document]:
    """The first `n` SciFact documents (../shared/data), or synthetic ones of similar length without it."""
    if SCIFACT.is_file():
        rows = [json.loads(line) for _, line in zip(range(n), SCIFACT.open())]
        return {str(r["_id"]): Document(title=r["title"], text=r["text"]) for r in rows}
    return {
        f"d{i}": Document(title=f"doc {i}", text=" ".join(f"w{(i * 7 + j) % 300}" for j in range(150)))
        for i in range(n)
    }


# Qwen3-4B (Qwen3-4B-Thinking-2507's config.json): the paper's summarizer, for throughput at its size.
QWEN3_4B = {
    "model_type": "qwen3",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
    "rope_theta": 5000000.0,
}


def bench_summarizer(
    name: str,
    max_doc_tokens: int,
    random_qwen3_4b: bool = False,
    backend: Sequence[str] = ("summarizer/backend=hf",),
) -> Any:
    """`conf/summarizer/<name>.yaml` (seed 0, documents cut at `max_doc_tokens`); with
    `random_qwen3_4b`, the same prompt on Qwen3-4B's shape at random weights (bf16 on a GPU). Its
    tokenizer is the hub-free tiny BPE one, so the vocabulary (embedding and LM head) is small:
    ~3.6B parameters instead of 4.0B; the bench reports tokens/s against the parameters it has.
    `backend` holds overrides of the summarizer's backend group (default: HF generate)."""
    root = OmegaConf.create(
        {"seed": 0, "summarizer": compose_node("summarizer", [f"summarizer={name}", *backend])}
    )
    cfg = root.summarizer
    cfg.prompt.max_doc_tokens = max_doc_tokens
    if random_qwen3_4b:
        cfg.model, cfg.tokenizer, cfg.dtype, cfg.config = None, None, "auto", dict(QWEN3_4B)
    return instantiate(cfg)
