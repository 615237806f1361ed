"""DINO loss (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers")
with SSLight's loss re-balancing (Tan et al. 2023, eq. 3).

Teacher-free SSL: the "teacher" is the EMA of the student (maintained by the training task), and
only its outputs on the global crops enter here.  What this module matches (reference:
official ``DINOLoss`` in ``main_dino.py`` and SSLight's ``sslight/utils/loss.py``):

* student probabilities ``softmax(s / student_temp)``; teacher targets
  ``softmax((t - center) / tau_t(epoch))`` with the center from *before* the call;
* ``tau_t`` is looked up per **epoch** from ``linspace(warmup_teacher_temp, teacher_temp, W)``
  followed by ``teacher_temp`` (so it already equals ``teacher_temp`` at epoch ``W - 1``);
* cross-view pairs only: teacher crop ``q`` with every student crop ``v != q``;
* after the loss, ``center <- m * center + (1 - m) * mean(t)`` over all teacher rows, the sum
  all-reduced across processes and divided by rows x world size;
* weighting: uniform mean over the pair terms (official DINO, SSLight eq. 2) or eq. 3.
"""

from __future__ import annotations

from typing import Any

import numpy as np
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
from robkit.utils import distributed as dist_utils


def teacher_temperature(
    epoch: float, teacher_temp: float, warmup_teacher_temp: float, warmup_epochs: float
) -> float:
    """``tau_t`` at ``epoch`` (fractional epochs elapsed).

    A whole number of warm-up epochs ``W`` is DINO's schedule: ``np.linspace(warmup, final, W)``
    looked up at the current whole epoch, then constant ``final``.  A fractional ``W`` (short
    budgets, where a whole epoch is most of the run) ramps linearly with the fractional epoch
    from ``warmup`` at 0 to ``final`` at ``W``.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch >= warmup_epochs:
        return float(teacher_temp)
    if float(warmup_epochs).is_integer():
        return float(np.linspace(warmup_teacher_temp, teacher_temp, int(warmup_epochs))[int(epoch)])
    return float(warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * epoch / warmup_epochs)


class DINOLoss(nn.Module):
    """Cross-entropy between centred/sharpened teacher targets and student predictions.

    Args:
        out_dim: K, the number of head outputs (prototypes); the center has shape ``[1, K]``.
        n_global, n_local: crop counts; the student sees ``n_global + n_local`` crops, the teacher
            the ``n_global`` globals.
        student_temp: student softmax temperature (0.1).
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: the teacher temperature
            schedule (0.04 -> 0.07 over 30 epochs, SSLight CNN yamls use 50).
        n_epochs: length of the run; only used to reject a warm-up longer than the run.
        center_momentum: EMA momentum of the center (0.9).
        alpha: ``None`` for the uniform mean over pairs (official DINO); a float for SSLight's
            ``alpha * L_gg / n_gg + (1 - alpha) * L_gl / n_gl`` (0.4 in SSLight).
        global_only: SSLight ``DINO.GLOBAL_ONLY``: return ``L_gg / n_gg`` (local terms are still
            computed for logging and the center is still updated).

    ``forward(student_logits [S*B, K], teacher_logits [n_global*B, K], epoch)`` returns the
    loss and ``{"loss_gg", "loss_gl", "teacher_temp"}``.  Both tensors are crop-major.

    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        n_global: int = 2,
        n_local: int = 6,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 30,
        n_epochs: int = 100,
        center_momentum: float = 0.9,
        alpha: float | None = None,
        global_only: bool = False,
    ) -> None:
        super().__init__()
        if n_global < 1 or n_local < 0 or n_global + n_local < 2:
            raise ValueError(
                f"DINO needs n_global >= 1 and at least 2 crops in all, got n_global={n_global}, n_local={n_local}"
            )
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0:
            raise ValueError(
                f"temperatures must be > 0, got student_temp={student_temp}, teacher_temp={teacher_temp}, "
                f"warmup_teacher_temp={warmup_teacher_temp}"
            )
        if warmup_teacher_temp_epochs > n_epochs:
            raise ValueError(
                f"warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} is longer than the run "
                f"(n_epochs={n_epochs}); shorten the warm-up (loss.warmup_teacher_temp_epochs)"
            )
        self.out_dim, self.n_global, self.n_local = out_dim, n_global, n_local
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_teacher_temp_epochs = (
            warmup_teacher_temp,
            warmup_teacher_temp_epochs,
        )
        self.n_epochs, self.center_momentum = n_epochs, center_momentum
        self.alpha, self.global_only = alpha, global_only
        self.pairs = cross_view_pairs(range(n_global), n_global + n_local, n_global)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp_at(self, epoch: float) -> float:
        """The teacher temperature at ``epoch`` (fractional epochs elapsed) on this loss's schedule."""
        return teacher_temperature(
            epoch, self.teacher_temp, self.warmup_teacher_temp, self.warmup_teacher_temp_epochs
        )

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, epoch: float
    ) -> tuple[Tensor, dict[str, Any]]:
        """Student ``[S*B, K]``, teacher ``[n_global*B, K]`` logits -> ``(loss, parts)``; center updated."""
        n_crops = self.n_global + self.n_local
        b = batch_size_of(teacher_logits.shape[0], self.n_global, "teacher_logits")
        check_rows(
            student_logits,
            n_crops * b,
            "student_logits",
            f"{n_crops} crops x batch {b} from the teacher's {self.n_global} global crops",
        )
        if teacher_logits.shape[1] != self.out_dim or student_logits.shape[1] != self.out_dim:
            raise ValueError(
                f"DINOLoss was built for out_dim={self.out_dim}, got student {tuple(student_logits.shape)} and "
                f"teacher {tuple(teacher_logits.shape)}; out_dim must equal the head's output size"
            )
        student = compute_dtype(student_logits)
        teacher = compute_dtype(teacher_logits).detach()
        tau = self.teacher_temp_at(epoch)

        log_p = F.log_softmax(student / self.student_temp, dim=-1).chunk(n_crops)
        targets = F.softmax((teacher - self.center) / tau, dim=-1).chunk(self.n_global)
        terms_gg: list[Tensor] = []
        terms_gl: list[Tensor] = []
        for q, v, is_gg in self.pairs:
            term = torch.sum(-targets[q] * log_p[v], dim=-1).mean()
            (terms_gg if is_gg else terms_gl).append(term)
        loss, parts = combine_terms(terms_gg, terms_gl, self.alpha, self.global_only)
        self.update_center(teacher)
        parts["teacher_temp"] = tau
        return loss, parts

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA of the batch mean of the teacher logits, the mean taken over all processes."""
        batch_center = torch.sum(compute_dtype(teacher_logits), dim=0, keepdim=True)
        dist_utils.all_reduce_sum(batch_center)
        batch_center = batch_center / (teacher_logits.shape[0] * dist_utils.world_size())
        self.center.mul_(self.center_momentum).add_(
            batch_center.to(self.center.dtype), alpha=1 - self.center_momentum
        )
