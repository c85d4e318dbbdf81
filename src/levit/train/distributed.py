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
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process group was started here (and is torn down here)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Choose the device (``auto`` / ``cpu`` / ``cuda``) and, under torchrun, start the process group."""
    if device == "cuda" and not torch.cuda.is_available():
        raise LeViTError("--device cuda: no CUDA GPU is available (use --device cpu)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        process_device = torch.device("cuda", local_rank)
    else:
        process_device = torch.device("cpu")
    ctx = DistContext(rank, world_size, local_rank, process_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        device_id = process_device if use_cuda else None
        store = _restart_store(rank, world_size)
        if store is None:
            dist.init_process_group(backend=backend, device_id=device_id)
        else:
            dist.init_process_group(backend=backend, device_id=device_id, store=store, rank=rank, world_size=world_size)
        ctx.owns_group = True
    return ctx


def _restart_store(rank: int, world_size: int) -> dist.Store | None:
    """Under a torchrun restart, the agent's store under a prefix of its own for this attempt; else
    ``None`` (torch's ``env://``). The agent keeps its store across restarts, and without a prefix the
    restarted workers read the addresses their killed predecessors published and never connect."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart in ("", "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"levit/restart_{restart}", agent)


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


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def barrier(ctx: DistContext) -> None:
    """Wait for every process (a no-op in a single process)."""
    if ctx.is_distributed:
        dist.barrier()


def gather_lists(ctx: DistContext, items: list) -> list:
    """Every process's ``items`` concatenated in rank order (picklable objects)."""
    if not ctx.is_distributed:
        return list(items)
    per_rank: list = [None] * ctx.world_size
    dist.all_gather_object(per_rank, items)
    return [item for rank_items in per_rank for item in rank_items]


def log(ctx: DistContext, msg: str) -> None:
    """Print ``msg`` to stderr on rank 0 only."""
    if ctx.is_main:
        print(msg, file=sys.stderr, flush=True)
