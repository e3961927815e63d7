"""Corpus-encoding throughput: our DenseRetriever.encode vs sentence-transformers' encode.

Same model, same texts, same process; prints passages/s and the ratio to the reference
run (sentence-transformers), since absolute times on shared machines are noise.

    python experiments/bench/encode.py --model sentence-transformers/all-MiniLM-L6-v2 --n 512
    python experiments/bench/encode.py --random-bert-base --n 20000 --batch-size 512   # GPU, paper size
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from resume.assets import resolve_model
from resume.retriever import build_retriever

SCIFACT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "scifact" / "corpus.jsonl"


def _texts(n: int) -> list[str]:
    if SCIFACT.is_file():
        docs = [json.loads(line) for line in SCIFACT.open()]
        texts = [f"{d['title']} {d['text']}".strip() for d in docs]
    else:  # synthetic passages of realistic length
        texts = [" ".join(f"word{(i * 7 + j) % 5000}" for j in range(120 + i % 200)) for i in range(n)]
    return (texts * (n // len(texts) + 1))[:n]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument(
        "--random-bert-base", action="store_true", help="BERT-base at random weights (Contriever's shape)"
    )
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from sentence_transformers import SentenceTransformer, models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.random_bert_base:
        from transformers import BertConfig, BertModel, BertTokenizerFast

        from resume.utils.tiny import wordpiece_tokenizer

        tmp = Path("/tmp/resume-bench-bert")
        tok = (
            wordpiece_tokenizer(tmp, vocab_size=30522)
            if not (tmp / "tokenizer.json").exists()
            else BertTokenizerFast.from_pretrained(tmp)
        )
        BertModel(BertConfig(vocab_size=len(tok))).save_pretrained(tmp)
        path = str(tmp)
    else:
        path = resolve_model(args.model)
    ours = build_retriever(
        model=path, pooling="mean", doc_max_length=args.max_length, batch_size=args.batch_size
    ).to(device)
    word = models.Transformer(path, max_seq_length=args.max_length)
    ref = SentenceTransformer(
        modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")], device=device
    )
    if device == "cuda":
        ours.precision_mode = "bf16"
        ref = ref.to(torch.bfloat16)
    texts = _texts(args.n)
    t_ref = _time(
        lambda: ref.encode(texts, batch_size=args.batch_size, normalize_embeddings=True), args.repeats
    )
    t_ours = _time(lambda: ours.encode_documents(texts), args.repeats)
    a = torch.as_tensor(ref.encode(texts[:64], batch_size=args.batch_size, normalize_embeddings=True)).float()
    b = ours.encode_documents(texts[:64])
    agree = torch.nn.functional.cosine_similarity(a, b).min().item()
    print(
        f"device={device} model={'random bert-base' if args.random_bert_base else args.model} n={args.n} "
        f"batch={args.batch_size} max_length={args.max_length}"
    )
    print("| run | passages/s | ratio vs sentence-transformers |")
    print("|---|---|---|")
    print(f"| sentence-transformers encode (reference) | {args.n / t_ref:.1f} | 1.00 |")
    print(f"| resume DenseRetriever.encode | {args.n / t_ours:.1f} | {t_ref / t_ours:.2f} |")
    print(f"min cosine between the two embeddings: {agree:.6f}")


if __name__ == "__main__":
    main()
