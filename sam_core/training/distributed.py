"""DDP plumbing: join the ``torchrun`` process group and agree across ranks.

Each rank takes an equal share of every global batch and DDP averages the gradients, so N ranks compute the
same update as one process on the same global batch. Backend gloo on CPU, nccl on CUDA. Every helper is a
no-op in a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's rank among ``world`` processes (rank 0 evaluates, checkpoints and publishes)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size())


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.world > 1:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if info.world == 1:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_across_ranks(value: float, info: DistInfo) -> float:
    """The mean of ``value`` over all ranks."""
    if info.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world
