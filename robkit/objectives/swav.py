"""SwAV loss (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments") with SSLight's loss re-balancing (Tan et al. 2023, eq. 3).

What this module matches (reference: official ``main_swav.py`` and SSLight's SwAV loss):

* codes ``q`` for each assignment crop (``crops_for_assign``, default the two globals) from the
  *detached* prototype scores with Sinkhorn-Knopp (:func:`robkit.objectives.sinkhorn.sinkhorn_knopp`,
  eps 0.05, 3 iterations, no max-shift);
* swapped prediction: every other crop ``v`` predicts that code with ``softmax(scores_v / 0.1)``;
* weighting: uniform mean over the (assignment crop, other crop) terms -- the official SwAV
  ``/ (crops - 1) / len(crops_for_assign)`` -- or SSLight's eq. 3;
* optional feature queue (``queue_length`` rows per assignment crop, from ``queue_start_epoch``):
  the stored embeddings are re-scored with the current prototypes and put in front of the batch
  for Sinkhorn, only the last ``B`` code rows are kept, and the batch is pushed in afterwards so
  it only serves later steps.  The queue is used once its last row is non-zero (i.e. full).

Not handled here (the caller's job, as in SSLight): prototypes are L2-renormalised before every
forward, and their gradients are dropped for ``freeze_prototypes_epochs`` (1 epoch in SSLight;
official SwAV counts 313 iterations) -- see the SwAV training task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robkit.objectives.multicrop import (
    batch_size_of,
    check_rows,
    combine_terms,
    compute_dtype,
    cross_view_pairs,
)
from robkit.objectives.sinkhorn import sinkhorn_knopp


class SwAVLoss(nn.Module):
    """Swapped prediction of Sinkhorn codes between multi-crop views.

    Args:
        n_prototypes: K (3000).
        embed_dim: dimension of the L2-normalised projections (128); sizes the queue.
        n_global, n_local: crop counts (crop-major inputs, globals first).
        temperature: softmax temperature of the predictions (0.1).
        epsilon, sinkhorn_iterations: Sinkhorn-Knopp regularisation and iterations (0.05, 3).
        crops_for_assign: crops whose codes are predicted (0, 1).
        alpha: ``None`` for the uniform mean (official SwAV) or SSLight's eq. 3 weight (0.4).
        queue_length: rows of past embeddings kept per assignment crop **on this process**
            (official SwAV: 3840 trimmed to a multiple of the global batch, divided by the world
            size); 0 disables the queue.
        queue_start_epoch: first epoch that fills and uses the queue (15).

    ``forward(embeddings [S*B, D], scores [S*B, K], prototypes [K, D], epoch)`` returns the loss
    and ``{"loss_gg", "loss_gl", "queue_used"}``.  ``scores`` must be ``embeddings @ prototypes.T``
    computed with the graph (they carry the gradient); ``prototypes`` is only used to re-score the
    queue.  The queue is a buffer, so it is saved in the state dict.

    """

    queue: Tensor

    def __init__(
        self,
        n_prototypes: int = 3000,
        embed_dim: int = 128,
        n_global: int = 2,
        n_local: int = 6,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
        alpha: float | None = None,
        queue_length: int = 0,
        queue_start_epoch: int = 15,
    ) -> None:
        super().__init__()
        n_crops = n_global + n_local
        crops_for_assign = tuple(int(c) for c in crops_for_assign)
        if not crops_for_assign or any(not 0 <= c < n_crops for c in crops_for_assign):
            raise ValueError(
                f"crops_for_assign={crops_for_assign} must name crops in [0, {n_crops}) "
                f"(n_global={n_global}, n_local={n_local}); SwAV uses (0, 1), the two global crops"
            )
        if len(set(crops_for_assign)) != len(crops_for_assign):
            raise ValueError(f"crops_for_assign={crops_for_assign} repeats a crop")
        if n_crops < 2:
            raise ValueError(
                f"swapped prediction needs at least 2 crops, got n_global={n_global}, n_local={n_local}"
            )
        if temperature <= 0 or epsilon <= 0 or sinkhorn_iterations < 0 or queue_length < 0:
            raise ValueError(
                f"need temperature > 0, epsilon > 0, sinkhorn_iterations >= 0, queue_length >= 0; got "
                f"{temperature}, {epsilon}, {sinkhorn_iterations}, {queue_length}"
            )
        self.n_prototypes, self.embed_dim = n_prototypes, embed_dim
        self.n_global, self.n_local = n_global, n_local
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.crops_for_assign, self.alpha = crops_for_assign, alpha
        self.queue_length, self.queue_start_epoch = queue_length, queue_start_epoch
        self.pairs = cross_view_pairs(crops_for_assign, n_crops, n_global)
        self.register_buffer(
            "queue", torch.zeros(len(crops_for_assign) if queue_length else 0, queue_length, embed_dim)
        )
        # Rows of the queue filled so far, kept on the host so that "is the queue full?" never waits
        # for the device; re-read from the buffer once after a load_state_dict (a resumed run).
        self._queue_rows: int | None = 0
        self.register_load_state_dict_post_hook(_forget_queue_rows)

    def forward(
        self, embeddings: Tensor, scores: Tensor, prototypes: Tensor, epoch: int
    ) -> tuple[Tensor, dict[str, Any]]:
        """Embeddings ``[S*B, D]``, scores ``[S*B, K]`` and prototypes ``[K, D]`` -> ``(loss, parts)``."""
        n_crops = self.n_global + self.n_local
        b = batch_size_of(scores.shape[0], n_crops, "scores")
        check_rows(embeddings, n_crops * b, "embeddings", "crop-major, same rows as scores")
        if scores.shape[1] != self.n_prototypes or tuple(prototypes.shape) != (
            self.n_prototypes,
            self.embed_dim,
        ):
            raise ValueError(
                f"SwAVLoss was built for {self.n_prototypes} prototypes of dim {self.embed_dim}; got scores "
                f"{tuple(scores.shape)} and prototypes {tuple(prototypes.shape)}"
            )
        use_queue_now = self.queue_length > 0 and epoch >= self.queue_start_epoch
        if use_queue_now and self.queue_length < b:
            raise ValueError(
                f"queue_length={self.queue_length} is shorter than the per-process batch {b}; use at least "
                "one batch (official SwAV: 3840 for batch 256), or 0 to disable the queue"
            )
        scores_c = compute_dtype(scores)
        codes: dict[int, Tensor] = {}
        queue_used = False
        with torch.no_grad():
            for i, crop in enumerate(self.crops_for_assign):
                out = scores_c[crop * b : (crop + 1) * b].detach()
                if use_queue_now:
                    # Official SwAV tests the queue's last row for zeros; it fills from the front.
                    if self._filled_rows() >= self.queue_length:
                        queue_used = True
                        queued = self.queue[i].to(prototypes.dtype) @ prototypes.detach().t()
                        out = torch.cat([compute_dtype(queued).to(out.dtype), out])
                    # Shift the queue by one batch and put the current embeddings in front.
                    self.queue[i, b:] = self.queue[i, :-b].clone()
                    self.queue[i, :b] = embeddings[crop * b : (crop + 1) * b].detach().to(self.queue.dtype)
                codes[crop] = sinkhorn_knopp(out, self.epsilon, self.sinkhorn_iterations)[-b:]

        log_p = F.log_softmax(scores_c / self.temperature, dim=1).chunk(n_crops)
        terms_gg: list[Tensor] = []
        terms_gl: list[Tensor] = []
        for q, v, is_gg in self.pairs:
            term = -torch.mean(torch.sum(codes[q] * log_p[v], dim=1))
            (terms_gg if is_gg else terms_gl).append(term)
        if use_queue_now:
            self._queue_rows = min(self._filled_rows() + b, self.queue_length)
        loss, parts = combine_terms(terms_gg, terms_gl, self.alpha)
        parts["queue_used"] = float(queue_used)
        return loss, parts

    def _filled_rows(self) -> int:
        if self._queue_rows is None:  # after a load: the rows whose embedding is not all zero
            self._queue_rows = int((self.queue[0] != 0).any(dim=-1).sum()) if self.queue.numel() else 0
        return self._queue_rows


def _forget_queue_rows(module: nn.Module, incompatible_keys: object) -> None:  # noqa: ARG001
    """After ``load_state_dict`` the buffer holds the queue: count its filled rows on the next use."""
    module._queue_rows = None  # type: ignore[assignment]
