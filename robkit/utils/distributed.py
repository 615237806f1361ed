"""Small ``torch.distributed`` helpers that degrade to the single-process identity.

The objectives call these so that the same code runs on one CPU, one GPU or a DDP job: every
statistic that the official implementations all-reduce (DINO's center, SwAV's Sinkhorn sums,
MoCo's enqueued keys) and MoCo's batch shuffle of the keys go through here, and without an
initialised process group each helper returns its input unchanged.  None of them is
differentiable -- the official code only reduces or shuffles detached tensors.
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
    """The rank of the current process in the default group; 0 when not distributed."""
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


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """``t`` as process ``src`` holds it, copied in place on every process (and returned); a no-op
    on a single process.
    """
    if is_dist() and world_size() > 1:
        dist.broadcast(t, src=src)
    return t


@torch.no_grad()
def batch_shuffle(x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """MoCo's "shuffle BN": this process's share of a random permutation of the global batch.

    ``x`` (this process's ``b`` rows; every process must hold the same number) is gathered from
    all processes in rank order into ``x_all [world * b, ...]``.  A permutation of the
    ``world * b`` rows is drawn from ``generator`` on every process and rank 0's is broadcast, so all
    processes use the same one; this process gets ``x_all[perm[rank * b : (rank + 1) * b]]``.
    Pass the returned ``perm`` to :func:`batch_unshuffle` with the encoder's output.

    A network with BatchNorm run on the result computes its batch statistics over images from
    every process, so a key's statistics do not come from the same sub-batch as its query's and
    cannot leak information between them (He et al. 2020, sec. 3.3).  On a single process this is the identity (``x`` itself and
    ``arange(b)``) and ``generator`` is not used.  Not differentiable.
    """
    b = x.shape[0]
    if not (is_dist() and world_size() > 1):
        return x, torch.arange(b, device=x.device)
    x_all = all_gather_cat(x)
    perm = torch.randperm(x_all.shape[0], generator=generator).to(x.device)
    broadcast(perm, src=0)
    r = rank()
    return x_all[perm[r * b : (r + 1) * b]], perm


@torch.no_grad()
def batch_unshuffle(y: Tensor, perm: Tensor) -> Tensor:
    """Inverse of :func:`batch_shuffle`: this process's own rows of the outputs ``y``.

    ``y`` holds the outputs of this process's shuffled rows; the outputs of all processes are
    gathered (the permuted global batch, in rank order) and put back in the gathered order, and
    this process keeps rows ``rank * b : (rank + 1) * b`` -- the outputs of the ``x`` it passed
    to :func:`batch_shuffle`, in the same order.  The identity on a single process.
    """
    if not (is_dist() and world_size() > 1):
        return y
    b = y.shape[0]
    y_all = all_gather_cat(y)
    inverse = torch.argsort(perm)
    r = rank()
    return y_all[inverse[r * b : (r + 1) * b]]


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
