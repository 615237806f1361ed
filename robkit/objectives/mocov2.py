"""MoCo-v2* loss: MoCo-v2 (Chen et al. 2020) with multi-crop queries, as defined by SSLight
(Tan et al. 2023, sec. 3.2) and re-balanced by its eq. 3.

The loss is asymmetric, as SSLight's ``MOCOLoss``:

* the **key** is global view 0 through the momentum encoder (the task computes it, batch-shuffled
  for BatchNorm); global view 0 is never a query;
* the **queries** are global view 1 and every local view through the online encoder, crop-major
  ``[(1 + n_local) * B, dim]``;
* per query chunk: InfoNCE with the positive ``q . k`` of the same image and the negatives of the
  queue *as it was before this step*, logits divided by ``T`` (0.2), cross-entropy with label 0;
* the pair counts are therefore ``P_gg = 1`` and ``P_gl = n_local``: ``alpha=None`` is the uniform
  mean over the ``1 + n_local`` chunks (SSLight's 1/7 baseline for 6 locals), a float gives
  ``alpha * CE(global) + (1 - alpha) * mean_l CE(local)``;
* afterwards the B keys of every process (all-gathered) overwrite the queue at a pointer that
  wraps modulo the queue length, which must be a multiple of the global batch (as MoCo asserts).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robkit.objectives.multicrop import batch_size_of, check_rows, combine_terms, compute_dtype
from robkit.utils import distributed as dist_utils


class MoCoV2Loss(nn.Module):
    """InfoNCE of multi-crop queries against momentum keys and a queue of past keys.

    Args:
        dim: dimension of the projections (128).
        queue_size: number of negative keys (65 536); a multiple of the global batch size.
        temperature: T of the logits (0.2, MoCo-v2).
        n_local: local crops among the queries.
        alpha: ``None`` for the uniform mean over query chunks, or SSLight's eq. 3 weight (0.4).
        global_only: SSLight ``MOCO.GLOBAL_ONLY``: the global query's CE only.

    ``forward(queries [(1+n_local)*B, dim], keys [B, dim])`` takes raw (unnormalised) projections,
    returns the loss and ``{"loss_gg", "loss_gl", "queue_ptr"}``, then enqueues the keys.  The queue
    ``[dim, queue_size]`` (MoCo's layout, random unit columns at start) and its pointer are buffers.

    """

    queue: Tensor
    queue_ptr: Tensor

    def __init__(
        self,
        dim: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.2,
        n_local: int = 6,
        alpha: float | None = None,
        global_only: bool = False,
    ) -> None:
        super().__init__()
        if queue_size < 1 or temperature <= 0 or n_local < 0:
            raise ValueError(
                f"need queue_size >= 1, temperature > 0, n_local >= 0; got {queue_size}, {temperature}, {n_local}"
            )
        self.dim, self.queue_size, self.temperature = dim, queue_size, temperature
        self.n_local, self.alpha, self.global_only = n_local, alpha, global_only
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # A host copy of the pointer, so that enqueuing never waits for the device; it is re-read
        # from the buffer once after a load_state_dict (a resumed run).
        self._ptr_host: int | None = 0
        self.register_load_state_dict_post_hook(_forget_host_pointer)

    def forward(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Queries ``[(1+n_local)*B, dim]`` and keys ``[B, dim]`` -> ``(loss, parts)``; enqueues the keys."""
        n_chunks = 1 + self.n_local
        b = batch_size_of(keys.shape[0], 1, "keys")
        check_rows(
            queries,
            n_chunks * b,
            "queries",
            f"global view 1 then {self.n_local} local views, {b} images each as in keys",
        )
        if queries.shape[1] != self.dim or keys.shape[1] != self.dim:
            raise ValueError(
                f"MoCoV2Loss was built for dim={self.dim}, got queries {tuple(queries.shape)} and keys "
                f"{tuple(keys.shape)}; dim must equal the projection head's output size"
            )
        self._check_queue_size(b * dist_utils.world_size())
        q_all = F.normalize(compute_dtype(queries), dim=1)
        k = F.normalize(compute_dtype(keys).detach(), dim=1)
        # The negatives are the queue before this step's keys are added (MoCo's ``clone().detach()``).
        negatives = self.queue.clone().detach().to(q_all.dtype)
        ces: list[Tensor] = []
        for q in q_all.chunk(n_chunks):
            l_pos = torch.sum(q * k, dim=1, keepdim=True)
            l_neg = q @ negatives
            logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
            labels = torch.zeros(b, dtype=torch.long, device=logits.device)
            ces.append(F.cross_entropy(logits, labels))
        loss, parts = combine_terms(ces[:1], ces[1:], self.alpha, self.global_only)
        self.dequeue_and_enqueue(k)
        parts["queue_ptr"] = float(self._host_pointer())
        return loss, parts

    def _host_pointer(self) -> int:
        if self._ptr_host is None:
            self._ptr_host = int(self.queue_ptr.item())
        return self._ptr_host

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: Tensor) -> None:
        """Write the normalised keys of all processes at the pointer, then advance it (wrapping)."""
        keys = dist_utils.all_gather_cat(keys.detach())
        n = keys.shape[0]
        self._check_queue_size(n)
        ptr = self._host_pointer()
        self.queue[:, ptr : ptr + n] = keys.t().to(self.queue.dtype)
        self._ptr_host = (ptr + n) % self.queue_size
        self.queue_ptr.fill_(self._ptr_host)

    def _check_queue_size(self, global_batch: int) -> None:
        if self.queue_size % global_batch != 0:
            raise ValueError(
                f"MoCo queue_size={self.queue_size} is not a multiple of the global batch {global_batch} "
                f"(per-process batch x {dist_utils.world_size()} processes); set loss.queue_size to a multiple "
                f"of it, e.g. {max(global_batch, self.queue_size // global_batch * global_batch)}"
            )


def _forget_host_pointer(module: nn.Module, incompatible_keys: object) -> None:  # noqa: ARG001
    """After ``load_state_dict`` the buffer holds the pointer: read it again on the next use."""
    module._ptr_host = None  # type: ignore[assignment]
