"""Supervised fine-tuning of a pre-trained student: backbone + linear classifier, cross-entropy.

The semi-supervised evaluation of SSLight (appendix B, Table 9) fine-tunes the whole network on a
labelled subset; :func:`robkit.evaluation.finetune.finetune` runs it through the engine.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from robkit.engine.tasks.base import Online, Task
from robkit.models.heads import LinearProbe
from robkit.models.students import Student


class FinetuneTask(Task):
    """``loss = CE(classifier(student(view)), labels)`` on one augmented view per image."""

    method = "finetune"
    uses_labels = True  # the trainer passes each batch's labels

    def __init__(
        self,
        student: Student,
        classifier: LinearProbe,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.online = Online(student, classifier, channels_last)
        self.label_smoothing = label_smoothing

    def forward(
        self, views: list[torch.Tensor], epoch: float, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Views (one per image, ``[B, 3, H, W]``) and ``labels`` ``int64 [B]`` -> ``(loss, parts)``."""
        if labels is None:
            raise ValueError("FinetuneTask needs the batch's labels")
        if (labels < 0).any():
            # An unlabelled image in a labelled run is a data error, not a class.
            raise ValueError(
                "fine-tuning needs a class for every image; found label -1 (a file outside class folders)"
            )
        logits = self.run_online(views)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        return loss, {"loss_ce": loss.detach(), "train_top1": acc}
