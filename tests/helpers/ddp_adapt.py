"""Run retriever adaptation under Lightning DDP on CPU (gloo); each rank reports what it trained on.

    python tests/helpers/ddp_adapt.py <retriever folder> <toy BEIR folder> <out folder> <devices> \
        [batch] [gather]

Lightning's `ddp` strategy re-launches this script once per extra rank. Every rank writes
`<out>/rank<r>.json`: the queries of each batch it trained on and a checksum of its final weights;
rank 0 also saves the final weights to `<out>/weights.pt`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from resume.data import load_beir
from resume.retriever import build_retriever
from resume.retriever.adapt import adapt_retriever, training_pairs


class RecordBatches(pl.Callback):
    def __init__(self, tokenizer):
        self.tokenizer, self.batches = tokenizer, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        ids = batch["query"]["input_ids"]
        self.batches.append(self.tokenizer.batch_decode(ids, skip_special_tokens=True))


def main(
    retriever_dir: str, data_dir: str, out: str, devices: int, batch_size: int = 4, gather: bool = True
) -> None:
    torch.set_num_threads(1)
    retriever = build_retriever(model=retriever_dir, device="cpu")
    data = load_beir(data_dir, ["train"], name="toy")
    pairs = training_pairs(data.split("train"), {d: doc.full_text for d, doc in data.corpus.items()})
    record = RecordBatches(retriever.tokenizer)
    kwargs = {
        "accelerator": "cpu",
        "devices": devices,
        "strategy": "ddp" if devices > 1 else "auto",
        "callbacks": [record],
    }
    stats = adapt_retriever(
        retriever,
        pairs,
        batch_size=batch_size,
        epochs=1,
        lr=1e-3,
        gather_negatives=gather,
        trainer_kwargs=kwargs,
    )
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    digest = hashlib.sha256(
        b"".join(p.detach().numpy().tobytes() for p in retriever.parameters())
    ).hexdigest()
    Path(out).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in retriever.named_parameters()}, Path(out) / "weights.pt")
    (Path(out) / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "batches": record.batches,
                "weights": digest,
                "steps": stats["retriever/train/steps"],
                "pairs": len(pairs),
            }
        )
    )


if __name__ == "__main__":
    extra = sys.argv[5:]
    main(
        sys.argv[1],
        sys.argv[2],
        sys.argv[3],
        int(sys.argv[4]),
        int(extra[0]) if extra else 4,
        extra[1] != "nogather" if len(extra) > 1 else True,
    )
