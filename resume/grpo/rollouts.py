"""What a GRPO step trains on: the documents of each step, and completions packed for a forward pass.

`RolloutBatches` fixes the documents of every step from the seed (so a resumed run replays
them); `pack_completions` lays prompt + completion rows out as TRL does, so the completion
tokens sit in the last columns that `logps.sequence_logps` scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from resume.summarizer.generate import Completion


def split_validation(
    doc_ids: Sequence[str], fraction: float, max_docs: int | None, seed: int
) -> tuple[list[str], list[str]]:
    """(train, val): a seeded `fraction` of `doc_ids` (at most `max_docs`) is held out for validation."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction ({fraction}) must be in [0, 1)")
    ids = list(doc_ids)
    n_val = min(round(fraction * len(ids)), max_docs if max_docs is not None else len(ids))
    if fraction > 0 and len(ids) > 1:
        n_val = max(1, n_val)
    if n_val == 0:
        return ids, []
    held = set(np.random.default_rng([seed, 1]).permutation(len(ids))[:n_val].tolist())
    return [d for i, d in enumerate(ids) if i not in held], [d for i, d in enumerate(ids) if i in held]


class RolloutBatches:
    """The documents of every GRPO step: `steps` batches of `prompts_per_step` distinct doc ids.

    Epoch `e` is the permutation of `doc_ids` drawn from `numpy.random.default_rng([seed, e])`,
    cut into batches (an epoch's incomplete tail is dropped, so no batch holds a document
    twice). Iteration starts at step `start()` (the trainer's restored step when resuming), so
    the position lives in the checkpoint's global step; `state_dict`/`load_state_dict` only
    tell Lightning that this loader resumes correctly mid-epoch.
    """

    def __init__(
        self,
        doc_ids: Sequence[str],
        prompts_per_step: int,
        steps: int,
        seed: int = 0,
        start: Callable[[], int] = lambda: 0,
    ) -> None:
        if len(doc_ids) < prompts_per_step:
            raise ValueError(
                f"{len(doc_ids)} training documents cannot fill a batch of "
                f"prompts_per_step={prompts_per_step}; lower grpo.config.prompts_per_step or val_fraction, "
                "or use more documents"
            )
        self.doc_ids = list(doc_ids)
        self.prompts_per_step = prompts_per_step
        self.steps = steps
        self.seed = seed
        self.start = start
        self._per_epoch = len(self.doc_ids) // prompts_per_step
        self._epoch: tuple[int, list[str]] | None = None

    def batch(self, step: int) -> list[str]:
        epoch, index = divmod(step, self._per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.doc_ids))
            self._epoch = (epoch, [self.doc_ids[i] for i in order])
        return self._epoch[1][index * self.prompts_per_step : (index + 1) * self.prompts_per_step]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[str]]:
        for step in range(self.start(), self.steps):
            yield self.batch(step)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "prompts_per_step": self.prompts_per_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass  # the position is the trainer's global step, restored with the checkpoint


@dataclass
class PackedBatch:
    """Prompt + completion rows for one forward pass (TRL's layout).

    Prompts are LEFT-padded to the longest prompt and completions RIGHT-padded to the longest
    completion, so every row's completion sits in the last `width` columns, the ones
    `sequence_logps(..., logits_to_keep=width)` scores. (Right-padding whole prompt+completion
    rows would put a short row's prompt tokens in those columns.) Left padding shifts the
    positions of a short prompt, which rotary models (Llama, Qwen) do not see: attention depends
    on relative positions only.
    """

    input_ids: Tensor  # [B, P + C]
    attention_mask: Tensor  # [B, P + C]
    completion_mask: Tensor  # [B, C], 1 on completion tokens (EOS included when generated)
    rows: slice  # the rows of the rollout batch
    sampling_logps: Tensor | None = None  # [B, C] the engine's log-probs, when every row has them
    # Runs of consecutive rows with the same prompt (a GRPO group, or the part of one in this chunk):
    # (prompt ids [P], rows), for `shared_prompt_logps`, which runs each prompt once for its rows.
    prompt_segments: list[tuple[Tensor, slice]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.completion_mask.size(1)


def pack_completions(
    completions: Sequence[Completion], pad_id: int, rows: slice | None = None
) -> PackedBatch:
    """Pack `completions` into one batch (CPU tensors); see `PackedBatch`."""
    if not completions:
        raise ValueError("pack_completions got no completions")
    if any(c.num_tokens == 0 or c.prompt_length == 0 for c in completions):
        raise ValueError("every completion needs at least one prompt token and one generated token")
    prompt_width = max(c.prompt_length for c in completions)
    width = max(c.num_tokens for c in completions)
    ids = torch.full((len(completions), prompt_width + width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    has_logps = all(c.logprobs is not None and len(c.logprobs) == c.num_tokens for c in completions)
    sampling = torch.zeros((len(completions), width), dtype=torch.float32) if has_logps else None
    for row, c in enumerate(completions):
        start = prompt_width - c.prompt_length
        ids[row, start:prompt_width] = torch.tensor(c.prompt_ids, dtype=torch.long)
        ids[row, prompt_width : prompt_width + c.num_tokens] = torch.tensor(c.token_ids, dtype=torch.long)
        mask[row, start : prompt_width + c.num_tokens] = 1
        if sampling is not None:
            sampling[row, : c.num_tokens] = torch.tensor(c.logprobs, dtype=torch.float32)
    segments: list[tuple[Tensor, slice]] = []
    start = 0
    for row in range(1, len(completions) + 1):
        if row == len(completions) or completions[row].prompt_ids != completions[start].prompt_ids:
            segments.append(
                (torch.tensor(completions[start].prompt_ids, dtype=torch.long), slice(start, row))
            )
            start = row
    return PackedBatch(
        ids,
        mask,
        mask[:, prompt_width:],
        rows if rows is not None else slice(0, len(completions)),
        sampling,
        segments,
    )


def doc_pair(doc: Any) -> tuple[str, str]:
    """A `Document` (or a (title, text) pair) as the summarizer's (title, text)."""
    if isinstance(doc, tuple):
        return doc
    return (getattr(doc, "title", "") or "", doc.text)
