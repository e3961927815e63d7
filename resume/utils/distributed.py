"""The loop on several processes: which rank this is, and the few collectives the loop needs.

Everything goes through `torch.distributed` (the group torchrun's environment describes, which
Lightning's DDP strategy joins rather than creates anew); nothing here talks to another process by
any other means. In a single process every function is the identity: `rank()` is 0, `barrier()`
returns at once, `broadcast(obj)` returns `obj`, so the loop's code is the same in both cases.

    torchrun --nproc-per-node 2 -m resume.train trainer=ddp ...

Rank 0 alone writes the run folder (`only_rank_zero_writes`: a write there from another rank is
an error, not a silent race); every rank trains, and each generates its share of the summaries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_CREATED: list[bool] = []  # whether init_from_env created the default group (and teardown destroys it)
_GUARDED: list[Path] = []  # run folders only rank 0 may write


def env_world_size() -> int:
    """The world size torchrun (or Slurm through Lightning) announces, before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else env_world_size()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(timeout_minutes: float = 60.0) -> bool:
    """Join the process group torchrun's environment describes (`MASTER_ADDR`, `WORLD_SIZE`, `RANK`);
    False (and nothing done) in a single process. `timeout_minutes` bounds every collective's wait: a
    rank may wait at a barrier while rank 0 evaluates or summarizes."""
    if env_world_size() <= 1:
        return False
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            f"WORLD_SIZE={env_world_size()} but MASTER_ADDR is unset: launch with torchrun "
            "(torchrun --nproc-per-node N -m resume.train ...), which sets both"
        )
    if not is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group(backend(), timeout=timedelta(minutes=timeout_minutes))
        _CREATED.append(True)
    return True


def teardown() -> None:
    """Destroy the group `init_from_env` created (only that one; an engine's own groups are its own)."""
    _GUARDED.clear()
    if _CREATED and is_initialized():
        dist.destroy_process_group()
    _CREATED.clear()


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (any picklable object)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (any picklable object)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's contiguous share of `items` (whose length the world size must divide): rank r of N
    takes items [r L/N, (r+1) L/N), so the shares in rank order are `items` again."""
    r = rank() if rank_ is None else rank_
    n = world_size() if world is None else world
    if len(items) % n:
        raise ValueError(f"{len(items)} items cannot be split evenly over {n} ranks")
    size = len(items) // n
    return list(items[r * size : (r + 1) * size])


# ---------------------------------------------------------------------- who writes
def only_rank_zero_writes(folder: str | Path) -> None:
    """From now on, `check_writer(path)` refuses a path inside `folder` on every rank but 0."""
    _GUARDED.append(Path(folder).resolve())


def check_writer(path: str | Path) -> None:
    """Raise when this rank is not 0 and `path` lies in a folder `only_rank_zero_writes` guards."""
    if not _GUARDED or is_main():
        return
    target = Path(path).resolve()
    for folder in _GUARDED:
        if target == folder or folder in target.parents:
            raise RuntimeError(
                f"rank {rank()} tried to write {target}, inside the run folder {folder}: only rank 0 "
                "writes there (wrap the write in `if distributed.is_main():`)"
            )


# ---------------------------------------------------------------------- sharded models
@contextlib.contextmanager
def full_parameters(trainer: Any) -> Iterator[None]:
    """Inside the block the policy's parameters are whole on every rank, whatever the strategy shards:
    FSDP's `summon_full_params` (no writeback), DeepSpeed ZeRO-3's `GatheredParameters`; nothing to do
    for DDP or a single device. Rollouts and the weight sync into the engine run inside it."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    name = type(strategy).__name__ if strategy is not None else ""
    if name == "FSDPStrategy":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.model, writeback=False, recurse=True):
            yield
        return
    if name == "DeepSpeedStrategy":
        import deepspeed  # the deepspeed extra

        params = [p for p in trainer.model.parameters() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    yield
