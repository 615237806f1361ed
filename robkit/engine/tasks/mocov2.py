"""MoCo-v2* (Chen et al. 2020; SSLight sec. 3.2): queries against the keys of a momentum encoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robkit.engine.tasks.base import Online, Task, ema_update_, momentum_copy, momentum_pairs
from robkit.models.heads import MLPHead
from robkit.models.students import Student
from robkit.utils import distributed as dist_utils


class MoCoTask(Task):
    """MoCo-v2* (SSLight sec. 3.2): key = global view 0 through the momentum encoder; queries = the rest.

    On several processes the key images are batch-shuffled across processes before the key
    encoder and the keys shuffled back afterwards (MoCo's "shuffle BN", as the official MoCo and
    SSLight code), so the key encoder's BatchNorm statistics mix images of every process.  The
    permutation comes from the task's generator, which the trainer reseeds every step; rank 0's
    draw is broadcast (as the official code does), so it depends only on the run seed and the step
    and a resumed run draws the same one.  On one process nothing is shuffled and the generator is
    not used: the official code permutes there too, but a permutation within the one batch leaves
    BatchNorm's statistics unchanged (up to rounding), so the keys are those of the unshuffled batch.
    """

    method = "mocov2"

    def __init__(
        self,
        student: Student,
        head: MLPHead,
        loss: nn.Module,
        key_momentum: float = 0.999,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.online = Online(student, head, channels_last)
        self.key_encoder = momentum_copy(self.online)
        self.loss = loss
        self.key_momentum = key_momentum

    def forward(self, views: list[torch.Tensor], epoch: float) -> tuple[torch.Tensor, dict[str, Any]]:
        """Views ``[B, 3, H, W]`` -> ``(loss, parts)``: view 0 keys, the rest queries; ``epoch`` unused."""
        with torch.no_grad():
            self._momentum_update()  # MoCo updates the key encoder inside the forward, before the keys
            k = self._keys(views[0])
        q = self.run_online(views[1:])
        return self.loss(q, k)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key encoder outputs for this process's images ``x``, computed on a cross-process shuffle."""
        shuffled, perm = dist_utils.batch_shuffle(x, self._gen)
        return dist_utils.batch_unshuffle(self.key_encoder([shuffled]), perm)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        # Parameters only: the key encoder keeps its own BatchNorm statistics, as in MoCo.
        ema_update_(momentum_pairs(self.key_encoder, self.online), self.key_momentum)
