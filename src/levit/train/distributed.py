"""torchrun / DDP setup and teardown, shared by training and evaluation.

Under ``torchrun`` (``WORLD_SIZE`` > 1) a process group is started unless the caller already did:
NCCL with ``device_id`` bound to ``cuda:LOCAL_RANK`` on GPUs, gloo on CPUs. :func:`distributed` is the
context manager both ``levit train`` and ``levit eval`` run inside, so a group started there is always
destroyed, also on errors.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import LeViTError

__all__ = ["DistContext", "all_reduce_sum", "barrier", "distributed", "gather_lists", "init_distributed", "log"]


@dataclass
class DistContext:
    """This process's place in the run: rank, world size, local rank and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process group was started here (and is torn down here)

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def on(self) -> bool:
        """More than one process."""
        return self.world > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Choose the device (``auto`` / ``cpu`` / ``cuda``) and, under torchrun, start the process group."""
    if device == "cuda" and not torch.cuda.is_available():
        raise LeViTError("--device cuda: no CUDA GPU is available (use --device cpu)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    ctx = DistContext(rank, world, local, dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        ctx.owns_group = True
    return ctx


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistContext]:
    """``with distributed("auto") as ctx: ...``: :func:`init_distributed`, then the group torn down if
    it was started here (a group the caller started is left to the caller)."""
    ctx = init_distributed(device)
    try:
        yield ctx
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all processes in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def barrier(ctx: DistContext) -> None:
    """Wait for every process (a no-op in a single process)."""
    if ctx.on:
        dist.barrier()


def gather_lists(ctx: DistContext, items: list) -> list:
    """Every process's ``items`` concatenated in rank order (picklable objects)."""
    if not ctx.on:
        return list(items)
    gathered: list = [None] * ctx.world
    dist.all_gather_object(gathered, items)
    return [x for g in gathered for x in g]


def log(ctx: DistContext, msg: str) -> None:
    """Print ``msg`` to stderr on rank 0 only."""
    if ctx.main:
        print(msg, file=sys.stderr, flush=True)
