"""Per-token log-probs of the completions: TRL's packed path, and each prompt run once for its group.

`sequence_logps` is TRL's: every row runs its prompt + completion. The `k` completions of a GRPO group
share one prompt (~750 of SmolLM2's ~820 tokens per row at the default budget), so that path pays
the prompt's forward and backward `k` times (`grpo.config.shared_prompt` turns the others on).
Here the prompt runs once, its KV cache is repeated for the `k` rows, and the completions run on top
of it. Attention is causal, so every completion token sees exactly the keys and values it sees in
the packed layout, and gradients flow back through the cache into the one prompt pass, where the `k`
rows' contributions add up: the same log-probs and the same gradient, up to float rounding (tested),
for about `(P + kC) / (k (P + C))` of the tokens. Under gradient checkpointing, where HF turns the
cache off, `prefix_tree_logps` gets the same attention pattern from one masked sequence instead.
Both share the per-segment driver.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from resume.grpo.head_logps import head_logps
from resume.grpo.rollouts import PackedBatch
from resume.grpo.tree_attention import TREE_SDPA, attention_implementation

# (model, prompt, ids, mask, head) -> what predicts the [k, C] completion tokens: [k, C, V] logits, or with
# head=True the [k, C, D] last hidden states that head_logps projects a few rows at a time
SegmentOutputs = Callable[[torch.nn.Module, Tensor, Tensor, Tensor, bool], Tensor]


def sequence_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    *,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies of the completion, the last `logits_to_keep` tokens.

    Logits are divided by `temperature`, the sampling temperature, as TRL does, so the
    log-probs are those of the distribution the completions were sampled from. Positions whose
    `attention_mask` is 0 get log-prob 0 and entropy 0, as in TRL's fused LM head.

    Args:
        model: a Hugging Face causal LM (accepts `logits_to_keep`).
        input_ids, attention_mask: `[B, P + C]` prompt followed by completion.
        logits_to_keep: `C`, the completion length.
        temperature: sampling temperature (> 0).
        batch_size: rows per forward pass, to bound the `[rows, C, vocab]` logits in memory;
            `None` = all at once.

    Returns:
        `(logps, entropies)`, both `[B, C]`; `logps` carries the graph, `entropies` is detached
        (it is only logged).
    """
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    if not 0 < logits_to_keep < input_ids.size(1):
        raise ValueError(
            f"logits_to_keep ({logits_to_keep}) must be in [1, {input_ids.size(1) - 1}]: the completion "
            "must follow at least one prompt token"
        )
    batch_size = batch_size or input_ids.size(0)
    all_logps, all_entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids = input_ids[start : start + batch_size]
        attn = attention_mask[start : start + batch_size]
        # One extra position: the logit at t predicts token t+1, so C+1 logits cover the C completion
        # tokens; the last one (after the final token) is dropped.
        logits = model(
            input_ids=ids, attention_mask=attn, logits_to_keep=logits_to_keep + 1, use_cache=False
        ).logits
        logits = logits[:, :-1, :]
        if temperature != 1.0:  # x / 1.0 is x: no copy of the logits kept for the backward
            logits = logits / temperature
        targets = ids[:, -logits_to_keep:]
        logps = selective_log_softmax(logits, targets)
        with torch.no_grad():
            entropies = entropy_from_logits(logits)
        padding = attn[:, -logits_to_keep:] == 0
        all_logps.append(logps.masked_fill(padding, 0.0))
        all_entropies.append(entropies.masked_fill(padding, 0.0))
    return torch.cat(all_logps, dim=0), torch.cat(all_entropies, dim=0)


def shared_prompt_logps(
    model: torch.nn.Module, packed: PackedBatch, temperature: float = 1.0, chunked_head: bool = False
) -> tuple[Tensor, Tensor]:
    """`(logps, entropies)`, both `[B, C]` over `packed`'s completion columns, as `sequence_logps`
    returns them (padding 0, entropies detached), computed one prompt segment at a time. `chunked_head`:
    from the hidden states through `head_logps`, without whole logits (only where `plain_head(model)`)."""
    return _per_prompt_segment(model, packed, temperature, _cached_segment_logits, chunked_head)


def prefix_tree_logps(
    model: torch.nn.Module,
    packed: PackedBatch,
    temperature: float = 1.0,
    chunked_head: bool = False,
    bucket: int = 0,
) -> tuple[Tensor, Tensor]:
    """What `shared_prompt_logps` returns, computed without a KV cache, so that it runs under gradient
    checkpointing (which turns HF's cache off).

    Each prompt segment becomes one sequence: the prompt, then its `k` completions one after another,
    with an attention mask under which a completion token sees the whole prompt and its own row's
    earlier tokens, never another row's, and position ids that restart after the prompt for every row.
    That is the attention pattern of the cached path, so the log-probs and gradients are the same (up to
    rounding; tested), for the same `P + k (C - 1)` tokens through the model. Logits are taken only
    where a completion token is predicted.

    `bucket > 0` pads the prompt block and the whole sequence to multiples of `bucket` tokens with
    tokens no real token attends to (the same values up to rounding; tested), so the model sees a few
    sequence shapes rather than one per document. For bf16 on a CPU: oneDNN builds and caches kernels
    per shape, and SmolLM2's forward and backward at each new length left ~11 MB on the heap for good
    (measured: +250 MB over 24 lengths; 6.5% more tokens on average at 64, P ~ 755 + k C = 252)."""
    segment = functools.partial(_tree_segment_logits, bucket=bucket) if bucket else _tree_segment_logits
    return _per_prompt_segment(model, packed, temperature, segment, chunked_head)


def _per_prompt_segment(
    model: torch.nn.Module,
    packed: PackedBatch,
    temperature: float,
    segment_outputs: SegmentOutputs,
    chunked_head: bool,
) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies of every prompt segment's rows, from `segment_outputs(model, prompt,
    ids, mask, chunked_head)`: what predicts the segment's `[k, C]` completion tokens."""
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    if not packed.prompt_segments:
        raise ValueError("the packed batch has no prompt segments; build it with pack_completions")
    device = next(model.parameters()).device
    width = packed.width
    completion_ids = packed.input_ids[:, -width:].to(device)
    completion_mask = packed.completion_mask.to(device)
    all_logps, all_entropies = [], []
    for prompt, rows in packed.prompt_segments:
        ids, mask = completion_ids[rows], completion_mask[rows]
        out = segment_outputs(model, prompt.to(device), ids, mask, chunked_head)
        if chunked_head:
            logps, entropies = head_logps(out, model.get_output_embeddings().weight, ids, temperature)
        else:
            logits = out if temperature == 1.0 else out / temperature  # no [k, C, V] copy at 1.0
            logps = selective_log_softmax(logits, ids)
            with torch.no_grad():
                entropies = entropy_from_logits(logits)
        padding = mask == 0
        all_logps.append(logps.masked_fill(padding, 0.0))
        all_entropies.append(entropies.masked_fill(padding, 0.0))
    return torch.cat(all_logps, dim=0), torch.cat(all_entropies, dim=0)


def _outputs(model: torch.nn.Module, head: bool, logits_to_keep: int | Tensor = 0, **inputs: Any) -> Tensor:
    """The model's logits at `logits_to_keep` (HF's meaning: an int keeps the last ones, 0 all, a tensor
    those positions), or with `head` its decoder's last hidden states there."""
    if not head:
        return model(**inputs, logits_to_keep=logits_to_keep).logits
    hidden = model.get_decoder()(**inputs).last_hidden_state
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:] if logits_to_keep else hidden
    return hidden[:, logits_to_keep]


def _cached_segment_logits(
    model: torch.nn.Module, prompt: Tensor, ids: Tensor, mask: Tensor, head: bool = False
) -> Tensor:
    """The prompt once, its KV cache repeated for the `k` rows, the completions on top of it."""
    from transformers import DynamicCache

    k, length = ids.shape
    device = ids.device
    cache = DynamicCache(config=model.config)
    first = _outputs(model, head, 1, input_ids=prompt[None], past_key_values=cache, use_cache=True)
    logits = first.expand(k, 1, first.size(-1))  # [k, 1, V or D]: predicts each row's first completion token
    if length > 1:
        cache.batch_repeat_interleave(k)
        p = prompt.numel()
        attention = torch.cat([torch.ones((k, p), dtype=mask.dtype, device=device), mask[:, :-1]], dim=1)
        positions = torch.arange(p, p + length - 1, device=device).expand(k, -1)
        rest = _outputs(
            model,
            head,
            input_ids=ids[:, :-1],
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )  # [k, C - 1, V or D]
        logits = torch.cat([logits, rest], dim=1)
    return logits


def _tree_segment_logits(
    model: torch.nn.Module, prompt: Tensor, ids: Tensor, mask: Tensor, head: bool = False, bucket: int = 0
) -> Tensor:
    """The prompt and the `k` completions as one prefix-tree sequence (see `prefix_tree_logps`): the
    prompt (P tokens), `pad` tokens to a multiple of `bucket`, the k rows of C - 1 fed tokens, `tail`
    tokens to a multiple of `bucket` (`pad = tail = 0` without one)."""
    k, length = ids.shape
    device = ids.device
    p, c = prompt.numel(), length - 1  # each row feeds its first C - 1 tokens
    block = math.ceil(p / bucket) * bucket if bucket else p  # the prompt block: prompt + its padding
    n = block + k * c
    tail = math.ceil(n / bucket) * bucket - n if bucket else 0
    filler = prompt[-1:]  # any token: nothing real attends to the padding
    inputs = torch.cat([prompt, filler.expand(block - p), ids[:, :c].reshape(-1), filler.expand(tail)])[None]
    positions = torch.cat([torch.arange(block), torch.arange(p, p + c).repeat(k), torch.arange(tail)]).to(
        device
    )[None]
    attend = _prefix_tree_mask(p, k, c, device, block=block, tail=tail)
    # the prompt's last position predicts every row's first token; row r's j-th fed token its (j+1)-th
    keep = torch.cat([torch.tensor([p - 1]), block + torch.arange(k * c)]).to(device)
    # on `TREE_SDPA` the prompt block's queries run causally, without the mask's blocks above the diagonal
    tree = {"tree_prompt_length": block} if attention_implementation(model) == TREE_SDPA else {}
    out = _outputs(
        model,
        head,
        keep,
        input_ids=inputs,
        attention_mask=_as_model_mask(model, attend),
        position_ids=positions,
        use_cache=False,
        **tree,
    )[0]  # [1 + k c, V or D]
    first = out[:1].expand(k, -1)[:, None]  # [k, 1, V]
    return torch.cat([first, out[1:].view(k, c, -1)], dim=1) if c else first


def _prefix_tree_mask(
    p: int, k: int, c: int, device: torch.device, block: int | None = None, tail: int = 0
) -> Tensor:
    """[L, L] boolean, True where a query (row) may attend to a key (column), L = block + k c + tail:
    causal over the prompt block (the prompt, then `block - p` padding tokens); a completion token
    attends to the prompt (not its padding) and causally within its own row; a `tail` padding token to
    itself only (no row is empty, so no NaN). No real token sees a padding token."""
    block = p if block is None else block
    n = block + k * c + tail
    # -1 prompt, -2 the prompt's padding, r >= 0 completion row r, k the tail (one row per token below)
    row_of = torch.cat(
        [torch.full((p,), -1), torch.full((block - p,), -2), torch.arange(k).repeat_interleave(c)]
    )
    row_of = torch.cat([row_of, torch.full((tail,), k)]).to(device)
    index = torch.arange(n, device=device)
    causal = index[None, :] <= index[:, None]
    in_block, is_prompt, is_row = row_of < 0, row_of == -1, (row_of >= 0) & (row_of < k)
    same_row = row_of[:, None] == row_of[None, :]
    block_to_block = in_block[:, None] & in_block[None, :]
    attend = causal & (block_to_block | is_row[:, None] & (same_row | is_prompt[None, :]))
    if tail:  # the tail's rows are empty so far
        attend[-tail:, -tail:] = torch.eye(tail, dtype=torch.bool, device=device)
    return attend


def _as_model_mask(model: torch.nn.Module, attend: Tensor) -> Tensor:
    """The mask as the model's attention takes a custom 4D one: boolean for SDPA, additive otherwise."""
    if attention_implementation(model) in ("sdpa", TREE_SDPA):
        return attend[None, None]
    dtype = next(model.parameters()).dtype
    return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill(
        ~attend, torch.finfo(dtype).min
    )[None, None]
