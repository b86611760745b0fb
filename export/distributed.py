"""Data-parallel export over torch.distributed: the process group, who writes, and the few
collectives the job needs.

One process per rank runs the whole export (``torchrun --nproc-per-node N -m
coalora.export.cli export train ...``, or Ray Train's workers, which set up the same group).
Every rank holds the same frozen model and adapter; a training step splits the global batch
into one shard per rank and all-reduces the gradients, so every rank takes the same optimizer
step. Evaluations (the Pareto search's candidates, the sweep's configurations) are shared out
over the ranks and gathered back. Rank 0 alone writes checkpoints, logs, caches and the bundle;
the other ranks wait for it at barriers where they read what it wrote.

Without a process group (a plain ``coalora export train``) every function here is the
one-process identity: rank 0 of 1, no collectives.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")

# Set by torchrun (and by Ray Train's workers) for each rank.
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_RANK = "RANK"
ENV_LOCAL_RANK = "LOCAL_RANK"
# Long enough for rank 0 to quantize a large model while the others wait at a barrier.
TIMEOUT = datetime.timedelta(hours=4)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether a launcher started this process as one rank of several."""
    return int(os.environ.get(ENV_WORLD_SIZE, "1")) > 1


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (before the group is joined)."""
    return int(os.environ.get(ENV_RANK, "0"))


def local_rank() -> int:
    return int(os.environ.get(ENV_LOCAL_RANK, "0"))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """Join the launcher's process group for the job (yields whether this run is distributed).

    A group someone else set up (Ray Train's) is used as is and left to them; one created here
    is destroyed at the end."""
    if active() or not launched():
        yield active()
        return
    dist.init_process_group(backend_for(device), timeout=TIMEOUT)
    try:
        yield True
        # Every rank done before any tears its connections down: a gloo rank destroying its
        # group while a peer still finishes its last collective aborted the peer (SIGABRT,
        # "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (in-memory pickling only; nothing reaches a file)."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def main_first(fn: Callable[[], T]) -> T:
    """Rank 0 runs ``fn`` (which computes and caches its result), then the others run it and
    find the cache: every rank ends up with exactly the bits rank 0 wrote."""
    if not active():
        return fn()
    out = fn() if is_main() else None
    barrier()
    if not is_main():
        out = fn()
    barrier()
    return out  # type: ignore[return-value]


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world``-th one from its rank on."""
    return list(items[rank() :: world_size()])


def shared_map(fn: Callable[[T], R], items: Sequence[T], progress: Any = None) -> list[R]:
    """``[fn(x) for x in items]`` with the items shared out over the ranks, every rank getting
    the whole list back in order. ``progress``: a callable wrapping this rank's share (a tqdm
    bar on rank 0)."""
    mine = shard(items)
    done = [fn(x) for x in (progress(mine) if progress is not None else mine)]
    if not active():
        return done
    parts: list[list[R] | None] = [None] * world_size()
    dist.all_gather_object(parts, done)
    out: list[R] = [None] * len(items)  # type: ignore[list-item]
    for r, part in enumerate(parts):
        out[r :: world_size()] = part  # type: ignore[index]
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def batch_shard(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch: one contiguous, near-equal slice per rank."""
    n = world_size()
    if n == 1:
        return batch
    rows = int(next(iter(batch.values())).shape[0])
    if rows < n:
        raise ValueError(f"a batch of {rows} rows cannot be shared by {n} processes")
    lo, hi = rank() * rows // n, (rank() + 1) * rows // n
    return {k: v[lo:hi] for k, v in batch.items()}
