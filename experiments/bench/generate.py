"""Summarization / rollout throughput of the HF backend: shared-prefix KV cache vs the plain path.

Same model, same prompts, same process; prints generated tokens/s and the ratio to the
reference run (`prefix_cache=False`), and whether the completions are identical.

    python experiments/bench/generate.py                              # SmolLM2-135M, 8 SciFact docs
    python experiments/bench/generate.py --summarizer tiny --n 16     # random tiny model (seconds)
    python experiments/bench/generate.py --max-new-tokens 1           # prefill only
    python experiments/bench/generate.py --random-qwen3-4b --n 256 --batch-size 256 \
        --max-new-tokens 512                                          # GPU
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from _models import bench_docs, bench_summarizer

from resume.summarizer.generate import HFBackend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarizer", default="smollm2", help="a conf/summarizer/ file")
    ap.add_argument("--n", type=int, default=8, help="documents")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per generate call")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-doc-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="completions per prompt in the sampled (rollout) run")
    ap.add_argument(
        "--random-qwen3-4b", action="store_true", help="Qwen3-4B's architecture at random weights"
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=790.0 if torch.cuda.is_available() else 0.0,
        help="dense peak of the device (H100 bf16: ~790 measured); 2 x params FLOP per token",
    )
    args = ap.parse_args()
    summarizer = bench_summarizer(args.summarizer, args.max_doc_tokens, args.random_qwen3_4b)
    params = sum(p.numel() for p in summarizer.model.parameters())
    prompts = summarizer.prompts_for([(d.title, d.text) for d in bench_docs(args.n).values()])
    runs = {
        "greedy (corpus)": (
            prompts,
            replace(summarizer.corpus_generation, max_new_tokens=args.max_new_tokens),
        ),
        f"sampled x{args.k} (rollouts)": (
            prompts[: max(1, args.n // args.k)],
            replace(
                summarizer.rollout_generation, max_new_tokens=args.max_new_tokens, num_return_sequences=args.k
            ),
        ),
    }
    device = next(summarizer.model.parameters()).device
    print(
        f"device={device} summarizer={'random qwen3-4b' if args.random_qwen3_4b else args.summarizer} "
        f"params={params / 1e6:.0f}M docs={args.n} batch={args.batch_size} "
        f"max_new_tokens={args.max_new_tokens} max_doc_tokens={args.max_doc_tokens} "
        f"threads={torch.get_num_threads()}"
    )
    print(
        "| run | backend | prefix tokens cached | generated tok/s | ratio vs plain | identical | % of "
        "compute limit |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (ps, params) in runs.items():
        out = {}
        for label, on in (("plain (reference)", False), ("shared-prefix cache", True)):
            backend = HFBackend(
                summarizer.model, summarizer.tokenizer, batch_size=args.batch_size, prefix_cache=on
            )
            backend.generate(ps[:1], replace(params, max_new_tokens=2))  # warm-up
            t = time.perf_counter()
            groups = backend.generate(ps, params)
            dt = time.perf_counter() - t
            toks = sum(c.num_tokens for g in groups for c in g)
            out[label] = ([[c.token_ids for c in g] for g in groups], dt, toks, backend.last_prefix_length)
        ref = out["plain (reference)"]
        for label, (ids, dt, toks, p) in out.items():
            limit = (
                f"{100 * (toks / dt) * 2 * params / (args.peak_tflops * 1e12):.1f}"
                if args.peak_tflops
                else "–"
            )
            print(
                f"| {name} | {label} | {p} | {toks / dt:.1f} | {ref[1] / dt:.2f} | {ids == ref[0]} | "
                f"{limit} |"
            )


if __name__ == "__main__":
    main()
