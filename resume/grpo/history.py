"""The GRPO run's record: per-step history statistics, the curves plot and sample tables."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from resume.summarizer.parsing import parse_completion
from resume.utils.io import atomic_write_text
from resume.utils.lightning import is_wandb


def finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def merge_stats(parts: Sequence[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """Combine per-mini-batch stats: extremes by min/max, everything else token-weighted means."""
    merged: dict[str, float] = {}
    for key in dict.fromkeys(k for stats, _ in parts for k in stats):
        values = [(s[key], w) for s, w in parts if key in s and math.isfinite(s[key])]
        if not values:
            merged[key] = math.nan
        elif key.endswith("min"):
            merged[key] = min(v for v, _ in values)
        elif key.endswith("max"):
            merged[key] = max(v for v, _ in values)
        else:
            total = sum(w for _, w in values)
            merged[key] = sum(v * w for v, w in values) / total if total else math.nan
    return merged


def plot_history(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Reward mean (train +- std, greedy validation), separator rate and completion length per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    ax = axes[0, 0]
    steps, mean = series("train/reward_mean")
    std = dict(zip(*series("train/reward_std")))
    ax.plot(steps, mean, label="train (sampled)")
    if std:
        ax.fill_between(
            steps,
            [m - std.get(s, 0) for s, m in zip(steps, mean)],
            [m + std.get(s, 0) for s, m in zip(steps, mean)],
            alpha=0.2,
        )
    ax.plot(*series("val/reward_mean"), "o-", label="val (greedy)")
    ax.set_title("reward mean")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(*series("val/reward_mean"), "o-", color="C1")
    ax.set_title("validation reward (greedy, held-out docs)")
    ax = axes[1, 0]
    ax.plot(*series("train/separator_rate"), label="train")
    ax.plot(*series("val/separator_rate"), "o-", label="val")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("separator rate")
    ax.legend()
    ax = axes[1, 1]
    ax.plot(*series("train/completion_length"), label="train")
    ax.plot(*series("val/completion_length"), "o-", label="val")
    ax.set_title("completion length (LLM tokens)")
    ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("GRPO step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def history_stats(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The run's summary: `reward_mean` is the mean over the last 25% of the steps (the loop's stopping
    criterion); `*_first` / `*_last` are the first and last measured values."""

    def values(key: str) -> list[float]:
        return [h[key] for h in history if h.get(key) is not None]

    reward = values("train/reward_mean")
    tail = reward[-max(1, math.ceil(len(reward) / 4)) :] if reward else []
    out: dict[str, Any] = {"reward_mean": float(np.mean(tail)) if tail else None}
    for name, key in (
        ("reward", "train/reward_mean"),
        ("separator_rate", "train/separator_rate"),
        ("val_reward", "val/reward_mean"),
        ("val_separator_rate", "val/separator_rate"),
        ("completion_length", "train/completion_length"),
    ):
        seen = values(key)
        out[f"{name}_first"] = seen[0] if seen else None
        out[f"{name}_last"] = seen[-1] if seen else None
    out["tokens_generated"] = int(sum(values("train/tokens")) + sum(values("val/tokens")))
    out["train_seconds"] = round(float(sum(values("time/step"))), 2)  # every step, resumed runs included
    return out


def sample_rows(
    step: int,
    doc_ids: Sequence[str],
    completions: Sequence[Any],
    rewards: Any,
    advantages: Tensor,
    separator: str,
    limit: int,
) -> list[dict[str, Any]]:
    """The first `limit` completions of a step with their summary, reward terms and advantage."""
    components = [
        c
        for c in ("structure", "retrieval", "delta", "num_tokens", "has_separator")
        if isinstance(getattr(rewards, c, None), Tensor)
    ]
    rows = []
    for i in range(min(len(completions), limit)):
        text = completions[i].text
        row: dict[str, Any] = {
            "step": step,
            "doc_id": doc_ids[i],
            "completion": text,
            "summary": parse_completion(text, separator).summary,
            "reward": float(rewards.total[i]),
            "advantage": float(advantages[i]),
            "completion_tokens": completions[i].num_tokens,
        }
        for name in components:
            value = getattr(rewards, name)[i].item()
            row[name] = finite(value) if isinstance(value, float) else value
        rows.append(row)
    return rows


def write_samples(
    rows: Sequence[Mapping[str, Any]], step: int, out_dir: Path | None, loggers: Iterable[Any]
) -> None:
    """Sample completions of one step: `<out_dir>/samples/step_XXXX.jsonl`, and a W&B table."""
    if out_dir is not None:
        atomic_write_text(
            out_dir / "samples" / f"step_{step:04d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
        )
    for logger in loggers:
        if is_wandb(logger):
            columns = list(rows[0]) if rows else []
            logger.log_table(
                key="summarizer/train/completions",
                columns=columns,
                data=[[r[c] for c in columns] for r in rows],
                step=step,
            )


def write_history(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One JSON line per recorded step (`grpo_history.jsonl`)."""
    atomic_write_text(path, "".join(json.dumps(h) + "\n" for h in history))
    return path
