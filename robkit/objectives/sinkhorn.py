"""Sinkhorn-Knopp equipartition (Cuturi 2013), the one copy SwAV and RoB-SwAV both call.

SwAV (Caron et al. 2020, sec. 3.1 and its ``distributed_sinkhorn``) turns prototype scores into
soft codes that spread the batch evenly over the prototypes; RoB-SwAV (Duval et al. 2023, VISSL
``swav_distillation_loss``) runs the same iterations on the frozen teacher's scores.  The two
official codes differ only in VISSL's overflow guards (``subtract_max``): SwAV's scores are
cosines (``|s| <= 1``, so ``exp(s / 0.05) <= exp(20)`` cannot overflow) while a teacher's stored
prototypes need not be unit-norm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from robkit.objectives.multicrop import compute_dtype
from robkit.utils import distributed as dist_utils


def _all_reduce_max_(x: Tensor) -> Tensor:
    """In-place maximum over processes (VISSL all-reduces the max before ``exp``); a no-op alone."""
    if dist_utils.is_dist() and dist_utils.world_size() > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor, epsilon: float = 0.05, iterations: int = 3, *, subtract_max: bool = False
) -> Tensor:
    """Equipartitioned soft codes ``[B, K]`` from prototype scores ``[B, K]``; each row sums to 1.

    ``Q = exp(scores / epsilon)`` transposed to ``[K, B]`` and divided by its total mass, then
    ``iterations`` rounds of every prototype's mass set to ``1/K`` and every sample's to
    ``1/B_global``; finally each sample's code is renormalised to sum 1, so ``iterations=0`` gives
    ``softmax(scores / epsilon)`` (VISSL's ``num_iters 0``).  The total and the prototype sums are
    all-reduced when ``torch.distributed`` is initialised, so ``B_global`` counts the samples of
    every process and the codes are those of the global batch.  Defaults: SwAV's eps 0.05 and 3
    iterations.

    ``subtract_max=True`` is VISSL's guarded variant: ``scores / epsilon`` minus its global
    (all-reduced) maximum before ``exp``, and ``1e-12`` added to every entry when a prototype's
    mass underflows to zero.  Official SwAV does neither (``False``).

    Computed in float32 for half-precision scores (float64 when given float64), on detached scores.
    """
    q = compute_dtype(scores.detach()) / epsilon
    if subtract_max:
        q = q - _all_reduce_max_(q.max().clone())
    q = torch.exp(q).t().contiguous()
    q /= dist_utils.all_reduce_sum(q.sum())
    n_prototypes, batch = q.shape
    n_samples = dist_utils.world_size() * batch
    for _ in range(iterations):
        rows = dist_utils.all_reduce_sum(q.sum(dim=1))
        if subtract_max and bool((rows == 0).any()):
            q += 1e-12
            rows = dist_utils.all_reduce_sum(q.sum(dim=1))
        q *= (1.0 / n_prototypes / rows).unsqueeze(1)
        q *= (1.0 / n_samples / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).t()


def vissl_sinkhorn_knopp(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    """VISSL's guarded Sinkhorn, the teacher targets of RoB-SwAV: ``sinkhorn_knopp(subtract_max=True)``."""
    return sinkhorn_knopp(scores, epsilon, iterations, subtract_max=True)
