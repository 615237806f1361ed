"""Feature distillation from a headless teacher (:mod:`robkit.objectives.feature`), on RoB's machinery.

The teacher (DINOv2, DINOv3, a timm or torchvision backbone) is frozen and sees the student's global
views re-normalised for it, exactly as in RoB; the student's projector regresses its CLS token and,
when the loss has a patch term, its patch tokens from the student's last spatial map.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robkit.engine.tasks.rob import RoBTask
from robkit.models.students import Student


class FeatureDistillTask(RoBTask):
    """RoB with a headless teacher: ``head`` is a :class:`~robkit.models.heads.FeatureProjector` and
    ``loss`` a :class:`~robkit.objectives.feature.FeatureDistillLoss`; everything else (teacher
    placement, precision, compile, target cache) is :class:`RoBTask`'s.
    """

    def __init__(
        self, student: Student, head: nn.Module, loss: nn.Module, teacher: nn.Module, **kwargs: Any
    ) -> None:
        super().__init__(student, head, loss, teacher, "features", **kwargs)
        self.use_patches = float(getattr(self.loss, "patch_weight", 0.0)) > 0

    @property
    def needs_patch_targets(self) -> bool:
        """Whether the loss has a patch term (the teacher's patch tokens are needed)."""
        return self.use_patches

    def teacher_options(self) -> dict[str, bool]:
        """The teacher's patch tokens only when the loss has a patch term."""
        return {"patch_features": self.use_patches}

    def forward(
        self, views: list[torch.Tensor], epoch: int, teacher_out: Any = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Crop-major views -> ``(loss, parts)``; ``teacher_out``: cached targets (a ``BackboneOutput``), if any."""
        t = teacher_out if teacher_out is not None else self.teacher_targets(views)
        t_cls = t.features.clone().float()
        if not self.use_patches:
            return self.loss(self.run_online(views), t_cls)
        if t.patch_features is None:
            raise ValueError("the loss has a patch term but the teacher targets hold no patch tokens")
        t_patch = t.patch_features.clone().float()  # [T*B, N, D] on the teacher's square grid
        side = math.isqrt(t_patch.shape[1])
        s_cls, s_map = self.run_online(views, n_global=self.n_global, spatial=True)
        # lightly-train's distillation v2: the projected student map is resized to the teacher's grid
        s_map = F.interpolate(s_map.float(), size=(side, side), mode="bilinear", align_corners=False)
        return self.loss(s_cls, t_cls, s_map.flatten(2).transpose(1, 2), t_patch)
