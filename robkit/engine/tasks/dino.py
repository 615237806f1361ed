"""DINO self-distillation (Caron et al. 2021): the student matches an EMA teacher of itself."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from robkit.engine.tasks.base import Online, Task, ema_update_, momentum_copy, momentum_pairs
from robkit.models.heads import DINOHead
from robkit.models.students import Student


class DINOTask(Task):
    """DINO self-distillation (Caron et al. 2021) with an EMA teacher; SSLight re-balancing via the loss."""

    method = "dino"

    def __init__(
        self,
        student: Student,
        head: DINOHead,
        loss: nn.Module,
        n_global: int = 2,
        freeze_last_layer_epochs: float = 1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.online = Online(student, head, channels_last)
        self.teacher = momentum_copy(self.online)  # DINO builds its teacher without stochastic depth
        self.loss = loss
        self.n_global = n_global
        self.freeze_last_layer_epochs = freeze_last_layer_epochs

    def forward(self, views: list[torch.Tensor], epoch: float) -> tuple[torch.Tensor, dict[str, Any]]:
        """Crop-major views ``[B, 3, H, W]`` (globals first) -> ``(loss, parts)`` against the EMA teacher."""
        with torch.no_grad():
            t = self.teacher(views[: self.n_global])
        s = self.run_online(views)
        return self.loss(s, t, epoch)

    def before_optimizer_step(self, epoch: float) -> None:
        """Drop the head's last-layer gradients while ``epoch < freeze_last_layer_epochs``."""
        # DINO cancels the last layer's gradients during the first epoch(s): it stabilises training.
        if epoch < self.freeze_last_layer_epochs:
            for p in cast(DINOHead, self.online.head).last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, ema_momentum: float) -> None:
        """EMA step of the teacher's parameters towards the student's; the student's buffers are copied."""
        ema_update_(momentum_pairs(self.teacher, self.online), ema_momentum)
        # BatchNorm statistics are not averaged: the teacher takes the student's.
        for bt, bs in zip(self.teacher.buffers(), self.online.buffers()):
            bt.copy_(bs)
