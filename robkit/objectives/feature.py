"""Feature distillation from a headless teacher (DINOv2, DINOv3, any backbone without a released head).

With no prototypes there is no distribution to match, so the student regresses the teacher's
features through a small projector (:class:`~robkit.models.heads.FeatureProjector`):

* **CLS term** (Proteus, Zhang et al. 2024, "token-level" objective): the projected pooled student
  embedding of every crop predicts the teacher's final-normed CLS token;
* **patch term** (lightly-train's distillation v2; Proteus' "patch-level" objective): the student's
  last spatial map, projected per location and resized bilinearly to the teacher's patch grid,
  predicts the teacher's final-normed patch tokens, on the global crops only (the teacher saw them).

Crops are paired as in RoB (:func:`robkit.objectives.rob.pair_mask`): student global ``i`` with
teacher global ``i`` (identical views), every local crop with every teacher crop; multi-crop is kept.

Where we differ from the published recipes, and why:

* ``distance="cosine"`` (``1 - cos``) is the default; Proteus and lightly-train use a plain MSE on
  unnormalised features (``distance="mse"``; ``"smooth_l1"`` is the robust variant). The released
  ViTs' final features carry a few very large channels, which dominate a squared error; the cosine
  is scale-free and needs no per-teacher loss weight.
* lightly-train concatenates the last two blocks' outputs and uses one view with mixup; we regress
  the last block's normed output (what the hub models return) on RoB's identical multi-crop views.
* Proteus also masks student patches (iBOT-style) and adds a feature-level term; not built.
* ``center_momentum`` (off by default): the teacher's CLS features minus an EMA of their batch
  mean, DINO's centering applied to features, for teachers whose features share a large common
  direction (a CNN's pooled post-ReLU output). Measured on held-out images it did not help a
  ResNet-18 teacher (BENCHMARKS.md), so no recipe turns it on.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robkit.objectives.multicrop import compute_dtype
from robkit.objectives.pairs import _crop_layout, pair_mask
from robkit.utils import distributed as dist_utils

DISTANCES = ("cosine", "mse", "smooth_l1")


def feature_distance(pred: Tensor, target: Tensor, distance: str = "cosine", beta: float = 1.0) -> Tensor:
    """Per-row distance over the last (feature) axis: ``[..., D], [..., D] -> [...]``.

    ``cosine``: ``1 - cos(pred, target)``; ``mse``: mean squared error over ``D``; ``smooth_l1``:
    Huber loss with threshold ``beta``, mean over ``D``.
    """
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    if distance == "mse":
        return (pred - target).pow(2).mean(-1)
    if distance == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta, reduction="none").mean(-1)
    raise ValueError(f"unknown feature distance {distance!r}; expected one of {', '.join(DISTANCES)}")


class FeatureDistillLoss(nn.Module):
    """``L = mean over pairs (t, s) of d(student crop s, teacher crop t)  +  patch_weight * L_patch``.

    ``d`` is :func:`feature_distance` averaged over the images of a crop; the pairs are RoB's identical-view
    pairs (``cross_view=True``: every ``s != t``, the ablation). ``L_patch`` averages ``d`` over the
    patch tokens of the ``T`` global crops, each against its own teacher crop.
    """

    center: Tensor

    def __init__(
        self,
        n_teacher_crops: int = 2,
        distance: str = "cosine",
        patch_weight: float = 0.0,
        beta: float = 1.0,
        cross_view: bool = False,
        center_momentum: float | None = None,
        dim: int | None = None,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown feature distance {distance!r}; expected one of {', '.join(DISTANCES)}")
        if patch_weight < 0:
            raise ValueError(f"patch_weight must be >= 0, got {patch_weight}")
        if beta <= 0:
            raise ValueError(f"beta (smooth-L1 threshold) must be > 0, got {beta}")
        self.n_teacher_crops, self.distance, self.beta = n_teacher_crops, distance, beta
        self.patch_weight, self.cross_view = float(patch_weight), cross_view
        self.center_momentum = center_momentum
        if center_momentum is not None:
            if not 0 <= center_momentum < 1:
                raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum}")
            if not dim:
                raise ValueError("centering the teacher features needs their width: dim=D")
            self.register_buffer("center", torch.zeros(1, int(dim)))

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        student_patches: Tensor | None = None,
        teacher_patches: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """``student [S·B, D]``, ``teacher [T·B, D]`` (CLS), optional ``[T·B, N, D]`` patch tokens of both."""
        batch, n_student = _crop_layout(
            student.shape[0], teacher.shape[0], self.n_teacher_crops, None, "FeatureDistillLoss"
        )
        s, t = compute_dtype(student), compute_dtype(teacher).to(compute_dtype(student).dtype)
        if self.center_momentum is not None:  # DINO's centering, on features: the center from before the call
            raw = t
            t = t - self.center.to(t.dtype)
            self.update_center(raw)
        terms = []
        for ti, si in pair_mask(self.n_teacher_crops, n_student, self.cross_view):
            pred, target = s[si * batch : (si + 1) * batch], t[ti * batch : (ti + 1) * batch]
            terms.append(feature_distance(pred, target, self.distance, self.beta).mean())
        cls_term = torch.stack(terms).mean()
        with torch.no_grad():  # identical global pairs, the number to watch
            g = self.n_teacher_crops * batch
            cos = F.cosine_similarity(s[:g], t, dim=-1).mean().detach()
        parts: dict[str, Any] = {"cls": cls_term.detach(), "cos": cos}
        if self.patch_weight == 0:
            return cls_term, parts
        if student_patches is None or teacher_patches is None:
            raise ValueError("patch_weight > 0 needs student_patches and teacher_patches [T*B, N, D]")
        if student_patches.shape != teacher_patches.shape:
            raise ValueError(
                f"student patches {tuple(student_patches.shape)} vs teacher patches "
                f"{tuple(teacher_patches.shape)}: resize the student map to the teacher's grid first"
            )
        sp = compute_dtype(student_patches)
        patch_term = feature_distance(sp, teacher_patches.to(sp.dtype), self.distance, self.beta).mean()
        parts["patch"] = patch_term.detach()
        return cls_term + self.patch_weight * patch_term, parts

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """EMA of the batch mean of the teacher's CLS features, the mean taken over all processes."""
        m = cast(float, self.center_momentum)
        batch = torch.sum(teacher.detach().float(), dim=0, keepdim=True)
        dist_utils.all_reduce_sum(batch)
        batch = batch / (teacher.shape[0] * dist_utils.world_size())
        self.center.mul_(m).add_(batch.to(self.center.dtype), alpha=1 - m)
