"""Generation throughput of every backend on the same prompts, in one process.

The reference is `HFBackend` in the model's fp32 with the shared-prefix cache (the default before the
vLLM backend). Each row prints generated tokens/s, the ratio to the reference, whether its completions
are token-for-token the reference's, its start-up time, and its share of this machine's limit: the
FLOP rate of the generated tokens (2 x parameters per token; prompt tokens not counted) over the rate a
large matmul reaches here in that dtype (measured at start; `--peak-tflops` to give one instead).
Every workload runs twice per backend and the second, steady-state pass is timed, with vLLM's prefix
cache emptied first (else the second pass would skip the prefill of every prompt it saw in the first).

    python experiments/bench/generate.py --backend all                 # SmolLM2-135M, 32 SciFact docs
    python experiments/bench/generate.py --backend all --compiled      # + vLLM compiled (~70 s start-up)
    python experiments/bench/generate.py --backend hf --summarizer tiny --n 16
    python experiments/bench/generate.py --backend vllm --random-qwen3-4b --n 256 --max-new-tokens 512  # GPU
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import replace

import torch
from _models import bench_docs, bench_summarizer

from resume.summarizer.hf_backend import HFBackend
from resume.summarizer.vllm_backend import VLLMBackend
from resume.summarizer.vllm_engine import release_engines, vllm_available
from resume.utils.devices import cpu_bf16_is_fast, dtype_name


def matmul_tflops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """The dense matmul rate this device reaches in `dtype` (TFLOP/s): the compute limit of a row."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def backends(args, summarizer) -> list[tuple[str, str, object]]:
    """(label, dtype, factory) of the runs asked for; the first is the reference."""
    model, tok = summarizer.model, summarizer.tokenizer
    bf16 = "bf16" in args.dtypes.split(",")
    fast_bf16 = torch.cuda.is_available() or cpu_bf16_is_fast()
    runs = []
    if args.backend in ("all", "hf"):
        runs.append(
            ("hf fp32 (reference)", "fp32", lambda: HFBackend(model, tok, batch_size=args.batch_size))
        )
        if bf16:
            runs.append(
                ("hf bf16", "bf16", lambda: HFBackend(model, tok, batch_size=args.batch_size, dtype="bf16"))
            )
    if args.backend in ("all", "vllm"):
        if not vllm_available():
            raise SystemExit("--backend vllm: vLLM is not installed (see .ci/install)")
        settings = [("fp32", True)] + ([("bf16", True)] if bf16 else [])
        if args.compiled:  # in the dtype `auto` would pick
            settings.append(("bf16" if fast_bf16 else "fp32", False))
        budget = args.max_num_batched_tokens
        engine = {"max_num_batched_tokens": budget} if budget else {}
        for dtype, eager in settings:
            label = f"vllm {dtype} {'eager' if eager else 'compiled'}"
            runs.append(
                (
                    label,
                    dtype,
                    lambda dtype=dtype, eager=eager: VLLMBackend(
                        model,
                        tok,
                        dtype=dtype,
                        enforce_eager=eager,
                        max_num_seqs=args.max_num_seqs,
                        engine_kwargs=engine,
                    ),
                )
            )
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="all", choices=["all", "hf", "vllm"])
    ap.add_argument("--summarizer", default="smollm2", help="a conf/summarizer/ file")
    ap.add_argument("--n", type=int, default=32, help="documents")
    ap.add_argument("--batch-size", type=int, default=8, help="HF: sequences per generate call")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="vLLM: sequences decoded together")
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=0,
        help="vLLM: tokens per engine step (0 = vLLM's default, 4,096 on CPU; the sampled workload's "
        "8 x ~755 prompt tokens need more: README, the known vLLM CPU crash)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-doc-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="completions per prompt in the sampled (rollout) run")
    ap.add_argument("--compiled", action="store_true", help="also vLLM without enforce_eager (slow start-up)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 (the reference) and/or bf16 rows")
    ap.add_argument(
        "--random-qwen3-4b", action="store_true", help="Qwen3-4B's architecture at random weights"
    )
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak; 0 = measure a matmul")
    args = ap.parse_args()
    summarizer = bench_summarizer(args.summarizer, args.max_doc_tokens, args.random_qwen3_4b)
    if not args.random_qwen3_4b:
        summarizer.model.float()  # the reference is fp32; bf16 rows cast for themselves
    n_params = sum(p.numel() for p in summarizer.model.parameters())
    prompts = summarizer.prompts_for([(d.title, d.text) for d in bench_docs(args.n).values()])
    workloads = {
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
    limits = {
        d: args.peak_tflops or matmul_tflops(dt, device)
        for d, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(
        f"device={device} summarizer={'random qwen3-4b' if args.random_qwen3_4b else args.summarizer} "
        f"params={n_params / 1e6:.0f}M docs={args.n} max_new_tokens={args.max_new_tokens} "
        f"max_doc_tokens={args.max_doc_tokens} threads={torch.get_num_threads()} "
        f"matmul TFLOP/s fp32={limits['fp32']:.2f} bf16={limits['bf16']:.2f} "
        f"(CPU bf16 fast: {cpu_bf16_is_fast()})"
    )
    rows = []
    reference: dict[str, tuple[list, float]] = {}
    for label, dtype, factory in backends(args, summarizer):
        t0 = time.perf_counter()
        backend = factory()
        backend.generate(
            prompts[:1], replace(workloads["greedy (corpus)"][1], max_new_tokens=2)
        )  # start + warm-up
        startup = time.perf_counter() - t0
        for name, (ps, params) in workloads.items():
            backend.generate(ps, params)  # first pass: kernels for these shapes (vLLM's first is slower)
            # The timed pass must prefill its prompts like a pass over new documents does: vLLM's
            # prefix cache still holds every prompt of the first pass (only the shared few-shot
            # prefix may be reused, as HF's prefix cache does within a call).
            getattr(backend, "reset_prefix_cache", lambda: None)()
            t = time.perf_counter()
            groups = backend.generate(ps, params)
            dt = time.perf_counter() - t
            ids = [[c.token_ids for c in g] for g in groups]
            toks = sum(len(x) for g in ids for x in g)
            reference.setdefault(name, (ids, toks / dt))
            ref_ids, ref_rate = reference[name]
            share = 100 * (toks / dt) * 2 * n_params / (limits[dtype] * 1e12)
            rows.append(
                (name, label, toks / dt, toks / dt / ref_rate, ids == ref_ids, startup, share, dt / len(ps))
            )
        engine_dtype = getattr(backend, "describe", dict)().get("dtype", "?")
        assert engine_dtype == dtype_name(torch.bfloat16 if dtype == "bf16" else torch.float32), (
            label,
            engine_dtype,
        )
        del backend
        release_engines()
        gc.collect()
    print(
        "| workload | backend | generated tok/s | ratio vs hf fp32 | identical to hf fp32 | start-up s | "
        "s per prompt | % of matmul limit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, label, rate, ratio, same, startup, share, per in rows:
        print(
            f"| {name} | {label} | {rate:.1f} | {ratio:.2f} | {same} | {startup:.1f} | {per:.2f} | "
            f"{share:.1f} |"
        )


if __name__ == "__main__":
    main()
