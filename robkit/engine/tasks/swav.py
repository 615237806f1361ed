"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn codes, without a momentum network."""

from __future__ import annotations

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

    def forward(self, views: list[torch.Tensor], epoch: float):
        self.online.head.normalize_prototypes()
        emb, scores = self.run_online(views)
        return self.loss(emb, scores, self.online.head.prototypes.weight, epoch)

    def before_optimizer_step(self, epoch: float) -> None:
        if epoch < self.freeze_prototypes_epochs:
            self.online.head.prototypes.weight.grad = None
