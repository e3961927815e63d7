"""A checkpointed GRPO forward + backward over prefix trees: SDPA (the reference) vs tree attention.

The update's own work, without rollouts, rewards or the optimizer: `prefix_tree_logps` of
`--prompts` prompt trees (`--prompt-tokens` tokens, `--k` completions of `--completion-tokens`) with
gradient checkpointing and the chunked head, then its backward, as `conf/grpo/default.yaml` runs it.
The two attentions alternate (A B, B A, ...) in one process so that drift hits both; prints the median
seconds of forward and backward, the ratio to SDPA, how many pairs tree attention won, and how far the
two log-probs and gradients are apart (they compute the same thing up to rounding).

    python experiments/bench/tree_attention.py                       # SmolLM2-135M, the default's shapes
    python experiments/bench/tree_attention.py --summarizer tiny --prompt-tokens 200 --completion-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _models import bench_summarizer

from resume.grpo.logps import prefix_tree_logps
from resume.grpo.rollouts import pack_completions
from resume.grpo.tree_attention import attention_implementation, use_tree_attention
from resume.summarizer.generate import Completion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summarizer", default="smollm2", help="conf/summarizer/<name>.yaml (its model, fp32)")
    ap.add_argument("--prompts", type=int, default=2, help="prompt trees per update (the default's 2)")
    ap.add_argument("--k", type=int, default=4, help="completions per prompt")
    ap.add_argument("--prompt-tokens", type=int, default=755, help="the default's few-shot prompt: ~755")
    ap.add_argument("--completion-tokens", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=6, help="alternating (SDPA, tree) pairs, after one warm-up")
    args = ap.parse_args()

    model = bench_summarizer(args.summarizer, 128).model.float().train()
    attention = attention_implementation(model)
    if attention != "sdpa":
        raise SystemExit(f"the model runs {attention!r} attention; tree attention needs sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    completions = []
    for _ in range(args.prompts):
        prompt = torch.randint(10, vocab, (args.prompt_tokens,), generator=gen).tolist()
        for _ in range(args.k):
            ids = torch.randint(10, vocab, (args.completion_tokens,), generator=gen).tolist()
            completions.append(Completion("", ids, prompt, False))
    packed = pack_completions(completions, pad_id=0)
    weights = torch.randn(len(completions), args.completion_tokens, generator=gen)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # allocated once, outside the timed passes

    def update() -> tuple[float, float, torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        logps, _ = prefix_tree_logps(model, packed, 1.0, chunked_head=True)
        loss = (logps * weights).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        out = (t1 - t0, t2 - t1, logps.detach(), grad.clone())
        for p in model.parameters():
            p.grad.zero_()
        return out

    times: dict[str, list[tuple[float, float]]] = {"sdpa": [], "tree": []}
    last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    restore = None
    update()  # warm-up (allocations, oneDNN's first calls)
    for pair in range(args.pairs):
        for mode in ("sdpa", "tree") if pair % 2 == 0 else ("tree", "sdpa"):
            if mode == "tree" and restore is None:
                restore = use_tree_attention(model)
            if mode == "sdpa" and restore is not None:
                restore()
                restore = None
            forward, backward, logps, grad = update()
            times[mode].append((forward, backward))
            last[mode] = (logps, grad)
    if restore is not None:
        restore()

    total = {m: [f + b for f, b in t] for m, t in times.items()}
    wins = sum(t < s for s, t in zip(total["sdpa"], total["tree"]))
    (lp0, g0), (lp1, g1) = last["sdpa"], last["tree"]
    logp_gap, grad_gap = (lp0 - lp1).abs().max().item(), ((g0 - g1).norm() / g0.norm()).item()
    print(
        f"summarizer={args.summarizer} prompts={args.prompts} k={args.k} prompt_tokens={args.prompt_tokens} "
        f"completion_tokens={args.completion_tokens} pairs={args.pairs} threads={torch.get_num_threads()}"
    )
    print("| attention | forward s (median) | backward s (median) | forward + backward s | ratio vs SDPA |")
    print("|---|---|---|---|---|")
    ref = statistics.median(total["sdpa"])
    for mode, label in (("sdpa", "SDPA (reference)"), ("tree", "tree attention")):
        fwd = statistics.median(f for f, _ in times[mode])
        bwd = statistics.median(b for _, b in times[mode])
        both = statistics.median(total[mode])
        print(f"| {label} | {fwd:.2f} | {bwd:.2f} | {both:.2f} | {both / ref:.2f} |")
    print(
        f"tree attention faster in {wins} of {args.pairs} pairs; max |log-prob difference| {logp_gap:.1e}, "
        f"gradient difference {grad_gap:.1e} (relative)"
    )


if __name__ == "__main__":
    main()
