"""GRPO step time: our `run_grpo` vs TRL's `GRPOTrainer` on the same model, prompts and settings.

Three runs: TRL (the reference), ours as before (HF generate, prompt + completion packed per row)
and ours now (vLLM rollouts with weight sync, each prompt run once per group: `shared_prompt`).

Same process, same rendered prompts, same reward function (a cheap text score, so the bench
times the step machinery: rollout generation, log-probs, backward, optimizer step), same
batch (prompts x k completions), completion budget, loss (dapo), beta 0 and learning rate.
Prints seconds per step (median over the steps after the first) and the ratio to TRL.
Runs with HF_HUB_OFFLINE=1 unless set otherwise: online, TRL 1.16 spent ~20 s per step on hub
requests that time out on a machine without the hub (measured), which is not step machinery.

    python experiments/bench/grpo_step.py --summarizer tiny --steps 4            # seconds, any machine
    python experiments/bench/grpo_step.py --summarizer smollm2 --steps 3         # SmolLM2-135M
    python experiments/bench/grpo_step.py --random-qwen3-4b --prompts 16 --k 8   # GPU, paper size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _models import bench_docs, bench_summarizer

from resume.grpo import GRPOConfig, run_grpo
from resume.summarizer.vllm_engine import vllm_available
from resume.utils.memory import PeakRSS, release_memory, set_mmap_threshold

SWITCH = {"off": [False], "on": [True], "both": [False, True]}  # an off|on|both flag: the settings it runs


def text_score(text: str) -> float:
    """Distinct words over 64, capped at 1: cheap, deterministic, varied within a group."""
    return min(1.0, len(set(text.split())) / 64)


@dataclass
class _Scores:
    total: torch.Tensor

    def log_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/reward_mean": float(self.total.mean())}


class BenchReward:
    def compute(self, texts: list[str], group_ids: list[str]) -> _Scores:
        return _Scores(torch.tensor([text_score(t) for t in texts]))


def _summarizer(args: argparse.Namespace, backend: str = "hf"):
    # vLLM's CPU attention needs heads of >= 32: the tiny model gets 32-wide heads in every run
    wide = ["+summarizer.config.head_dim=32"] if args.summarizer == "tiny" else []
    return bench_summarizer(
        args.summarizer, args.max_doc_tokens, args.random_qwen3_4b, [f"summarizer/backend={backend}", *wide]
    )


def bench_ours(
    args,
    docs,
    backend: str,
    shared_prompt: bool,
    precision: str = "32-true",
    checkpointing: bool = False,
    reuse_heap: bool = True,
    tree_attention: bool = True,
    autocast: str = "off",
) -> dict[str, list[float]]:
    summarizer = _summarizer(args, backend)
    config = GRPOConfig(
        steps=args.steps,
        num_generations=args.k,
        prompts_per_step=args.prompts,
        loss_type="dapo",
        beta=0.0,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        val_every=0,
        log_completions_every=0,
        checkpoint_every=0,
        mini_batch_size=args.mini_batch,
        shared_prompt=shared_prompt,
        gradient_checkpointing=checkpointing,
        tied_grad_in_place=True,  # conf/grpo/default.yaml's memory options (same gradient up to rounding)
        chunked_head=shared_prompt,
        reuse_heap=reuse_heap,  # and its allocator options (same values): see --mmap-threshold-mb
        preallocate_grads=reuse_heap,
        tree_attention=tree_attention,  # the prefix tree's prompt causal and unmasked (same values)
        autocast=autocast,  # the update's forwards under bf16 autocast (fp32 master weights)
    )
    with tempfile.TemporaryDirectory() as out:
        run_grpo(
            summarizer,
            BenchReward(),
            docs,
            list(docs),
            out_dir=out,
            config=config,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0),
            trainer_kwargs={"precision": precision},
        )
        history = [json.loads(line) for line in (Path(out) / "grpo_history.jsonl").read_text().splitlines()]
    release = getattr(summarizer.backend, "release", None)
    if callable(release):
        release()
    keys = sorted({k for h in history for k in h if k.startswith(("time/", "mem/"))})
    return {k: [h[k] for h in history if h.get(k) is not None] for k in keys}


def bench_trl(args, docs, bf16: bool) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    summarizer = _summarizer(args)  # TRL loads the same weights from a folder
    folder = Path(tempfile.mkdtemp(prefix="resume-bench-trl-"))
    summarizer.model.save_pretrained(folder)
    summarizer.tokenizer.save_pretrained(folder)
    prompts = summarizer.prompts_for([(d.title, d.text) for d in docs.values()])
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    cuda = torch.cuda.is_available()
    cfg = TRLConfig(
        output_dir=str(folder / "out"),
        per_device_train_batch_size=args.prompts * args.k,
        num_generations=args.k,
        max_completion_length=args.max_new_tokens,
        max_steps=args.steps,
        learning_rate=1e-6,
        weight_decay=0.0,
        beta=0.0,
        loss_type="dapo",
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        bf16=bf16,  # HF Trainer's autocast (CPU or GPU), fp32 master weights
        use_cpu=not cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        gradient_checkpointing=False,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        gradient_accumulation_steps=1,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=str(folder),
        args=cfg,
        processing_class=summarizer.tokenizer,
        reward_funcs=lambda completions, **kw: [text_score(c) for c in completions],
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        callbacks=[StepTimes()],
    )
    trainer.train()
    return times


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarizer", default="tiny", help="a conf/summarizer/ file")
    ap.add_argument("--random-qwen3-4b", action="store_true")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-doc-tokens", type=int, default=128)
    ap.add_argument("--mini-batch", type=int, default=None)
    ap.add_argument(
        "--precisions",
        default=None,
        help="Lightning precisions of our vLLM run, comma-separated (default: GPU bf16-mixed, CPU 32-true)",
    )
    ap.add_argument("--skip-before", action="store_true", help="leave out our HF-generate, per-row run")
    ap.add_argument(
        "--checkpointing",
        choices=("off", "on", "both"),
        default="off",
        help="gradient checkpointing in our vLLM runs (then through logps.prefix_tree_logps)",
    )
    ap.add_argument(
        "--mmap-threshold-mb",
        type=float,
        default=None,
        help="glibc's mmap threshold for the whole process, TRL included (the default run's conf/train.yaml "
        "sets 1; default: glibc's own, under which reuse_heap only returns the backward's free pages)",
    )
    ap.add_argument(
        "--reuse-heap",
        choices=("off", "on", "both"),
        default="on",
        help="our runs with conf/grpo/default.yaml's reuse_heap + preallocate_grads, without, or both",
    )
    ap.add_argument(
        "--tree-attention",
        choices=("off", "on", "both"),
        default="on",
        help="our checkpointed runs with conf/grpo/default.yaml's tree_attention, without, or both",
    )
    ap.add_argument(
        "--autocast",
        default="off",
        help="grpo.config.autocast of our vLLM runs, comma-separated (off, bf16, auto), e.g. off,bf16",
    )
    ap.add_argument("--repeats", type=int, default=1, help="run our plans this many times, interleaved")
    ap.add_argument(
        "--skip-trl", action="store_true", help="no TRL run: ratios against our first run instead"
    )
    ap.add_argument(
        "--trl-precisions",
        default=None,
        help="TRL runs, comma-separated fp32 and/or bf16 (its bf16=True: autocast); the first is the "
        "reference (default: GPU bf16, CPU fp32)",
    )
    args = ap.parse_args()
    set_mmap_threshold(args.mmap_threshold_mb)
    precisions = (args.precisions or ("bf16-mixed" if torch.cuda.is_available() else "32-true")).split(",")
    docs = bench_docs(args.prompts * args.steps)
    peaks: dict[str, dict[str, float]] = {}

    def measured(name: str, fn, *a):
        release_memory()  # the previous run's freed pages back to the system: each run's own peak
        with PeakRSS() as mem:
            out = fn(*a)
        peaks[name] = mem.record()
        return out

    trl_precisions = (args.trl_precisions or ("bf16" if torch.cuda.is_available() else "fp32")).split(",")
    if bad := [p for p in trl_precisions if p not in ("fp32", "bf16")]:
        raise SystemExit(f"--trl-precisions: {bad} are not fp32 or bf16")
    trl_runs: dict[str, list[float]] = {}
    for i, p in enumerate([] if args.skip_trl else trl_precisions):
        name = f"TRL GRPOTrainer {p}{' (reference)' if i == 0 else ''}"
        trl_runs[name] = measured(name, bench_trl, args, docs, p == "bf16")
    trl_times = next(iter(trl_runs.values()), [])
    engine = "vllm" if vllm_available() else "hf"
    plans = (
        []
        if args.skip_before
        else [("resume run_grpo: HF generate, prompt per row (before)", "hf", False, "32-true", False, False)]
    )
    ckpts, reuses, trees = (SWITCH[a] for a in (args.checkpointing, args.reuse_heap, args.tree_attention))
    plans += [
        (
            (
                f"resume run_grpo: {engine}, each prompt once, {prec}{', checkpointing' * c}"
                f"{', heap reuse' * r if args.reuse_heap == 'both' else ''}"
                f"{', tree attention' * t if args.tree_attention == 'both' else ''}"
                f"{f', autocast {a}' if a != 'off' else ''}"
            ),
            engine,
            True,
            prec,
            c,
            r,
            t,
            a,
        )
        for a in args.autocast.split(",")
        for prec in precisions
        for c in ckpts
        for r in reuses
        for t in (trees if c else [False])  # tree attention acts on the checkpointed (prefix-tree) path
    ]
    runs = {}
    for repeat in range(args.repeats):  # interleaved: A B A B, so drift on a shared machine hits both
        for name, *plan in plans:
            label = f"{name} #{repeat + 1}" if args.repeats > 1 else name
            runs[label] = measured(label, bench_ours, args, docs, *plan)

    def med(times: list[float]) -> float:
        return statistics.median(times[1:] or times) if times else float("nan")

    print(
        f"device={'cuda' if torch.cuda.is_available() else 'cpu'} summarizer="
        f"{'random qwen3-4b' if args.random_qwen3_4b else args.summarizer} prompts={args.prompts} k={args.k} "
        f"max_new_tokens={args.max_new_tokens} steps={args.steps} threads={torch.get_num_threads()}"
    )
    print(
        f"| run | s/step (median, first step excluded) | ratio vs {'TRL' if trl_times else 'the first run'}"
        " (lower is faster) | "
        "peak RSS MB (above the run's start) |"
    )
    print("|---|---|---|---|")

    def peak(name: str) -> str:
        p = peaks[name]
        return f"{p['peak_mb']:.0f} (+{p['peak_mb'] - p['start_mb']:.0f})"

    if trl_times:
        ref = med(trl_times)
        for name, times in trl_runs.items():
            print(f"| {name} | {med(times):.2f} | {med(times) / ref:.2f} | {peak(name)} |")
    else:  # --skip-trl: the first of our runs is the reference
        ref = med(next(iter(runs.values()))["time/step"])
    for i, (name, t) in enumerate(runs.items()):
        step = med(t["time/step"])
        label = f"{name} (reference)" if not trl_times and i == 0 else name
        print(f"| {label} | {step:.2f} | {step / ref:.2f} | {peak(name)} |")
    # Where our step's time and memory go (this rank; medians over the steps after the first).
    parts = [
        "generate",
        "reward",
        "update_old_logps",
        "update_ref_logps",
        "update_forward",
        "update_backward",
    ]
    parts += ["update_optimizer", "sync"]
    marks = [
        "step_start",
        "generate",
        "update_start",
        "update_forward",
        "update_backward",
        "update_optimizer",
    ]
    print()
    print("| run | " + " | ".join(f"{p} s" for p in parts) + " |")
    print("|---|" + "---|" * len(parts))
    for name, t in runs.items():
        print(f"| {name} | " + " | ".join(f"{med(t.get(f'time/{p}', [])):.2f}" for p in parts) + " |")
    print()
    print("| run | " + " | ".join(f"RSS after {m} MB" for m in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for name, t in runs.items():
        print(
            f"| {name} | "
            + " | ".join(f"{max(t.get(f'mem/{m}_mb', [float('nan')])):.0f}" for m in marks)
            + " |"
        )
    for name, t in runs.items():  # memory step by step: where the first step's allocations stay
        for step in range(len(t["time/step"])):
            cells = ", ".join(f"{m} {t[f'mem/{m}_mb'][step]:.0f}" for m in marks if f"mem/{m}_mb" in t)
            print(f"  {name}, step {step} RSS MB: {cells}")
    for name, times in trl_runs.items():
        print(f"per-step seconds: {name} {[round(x, 2) for x in times]}")
    for name, t in runs.items():
        print(f"  {name}: {[round(x, 2) for x in t['time/step']]}")


if __name__ == "__main__":
    main()
