"""Small ``torch.distributed`` helpers that degrade to the single-process identity.

The objectives call these so that the same code runs on one CPU, one GPU or a DDP job: every
statistic that the official implementations all-reduce (DINO's center, SwAV's Sinkhorn sums,
MoCo's enqueued keys) goes through here, and without an initialised process group each helper
returns its input unchanged.  None of them is differentiable -- the official code only
reduces detached statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    """True when a process group is initialised (``torch.distributed`` available and set up)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return dist.get_rank() if is_dist() else 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over all processes, in place (and returned); a no-op on a single process."""
    if is_dist() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: Tensor) -> Tensor:
    """``t`` from every process concatenated along dim 0 in rank order (equal shapes required).

    Not differentiable: the result is a new tensor detached from the graph.
    """
    if not (is_dist() and world_size() > 1):
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); gloo on CPU, NCCL on GPU.

    Multi-node runs work the same way: ``torchrun --nnodes N --node_rank R --rdzv_endpoint HOST:PORT``.
    Returns True when this process is part of a group of more than one.
    """
    import os

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True
