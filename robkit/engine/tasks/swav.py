"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn codes, without a momentum network."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from robkit.engine.tasks.base import Online, Task
from robkit.models.heads import SwAVHead
from robkit.models.students import Student


class SwAVTask(Task):
    """SwAV (Caron et al. 2020): swapped prediction of Sinkhorn codes; prototypes kept on the sphere."""

    method = "swav"

    def __init__(
        self,
        student: Student,
        head: SwAVHead,
        loss: nn.Module,
        freeze_prototypes_epochs: float = 1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.online = Online(student, head, channels_last)
        self.loss = loss
        self.freeze_prototypes_epochs = freeze_prototypes_epochs

    def forward(self, views: list[torch.Tensor], epoch: float) -> tuple[torch.Tensor, dict[str, Any]]:
        """Crop-major views ``[B, 3, H, W]`` -> ``(loss, parts)``; normalises the prototypes first."""
        cast(SwAVHead, self.online.head).normalize_prototypes()
        emb, scores = self.run_online(views)
        return self.loss(emb, scores, cast(SwAVHead, self.online.head).prototypes.weight, epoch)

    def before_optimizer_step(self, epoch: float) -> None:
        """Drop the prototypes' gradient while ``epoch < freeze_prototypes_epochs``."""
        if epoch < self.freeze_prototypes_epochs:
            cast(SwAVHead, self.online.head).prototypes.weight.grad = None
