"""The frozen teacher of a backbone released without a head (DINOv2, DINOv3, any timm network).

It gives features, not logits: the final-normed CLS (or pooled) embedding and the patch tokens, which
feature distillation (:mod:`robkit.objectives.feature`) regresses. The backbone module provides
``forward_features(x) -> dict`` with the official DINOv2/DINOv3 keys ``x_norm_clstoken`` ``[B, D]``
and ``x_norm_patchtokens`` ``[B, N, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from robkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD

Tensor = torch.Tensor


@dataclass
class BackboneOutput:
    """What a headless teacher gives: final-normed CLS ``[B, D]`` and patch tokens ``[B, N, D]``
    (``None`` when not asked for).
    """

    features: Tensor
    patch_features: Tensor | None = None


class BackboneTeacher(nn.Module):
    """A frozen backbone without a released head: ``forward(x) -> BackboneOutput``.

    Images are normalised with the teacher's ``mean``/``std`` (ImageNet's for DINOv2) at any size that is
    a multiple of the patch; ``resolution`` is the size the distiller feeds it (224, DINOv2's evaluation size).
    """

    def __init__(
        self,
        backbone: nn.Module,
        name: str,
        family: str,
        arch: dict[str, Any],
        resolution: int = 224,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        sha256: str | None = None,
        source: str = "",
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.name, self.family, self.arch = name, family, dict(arch)
        self.resolution, self.mean, self.std = resolution, tuple(mean), tuple(std)
        self.sha256, self.source = sha256, source
        self.embed_dim = int(cast(Any, backbone).embed_dim)
        self.patch_size = getattr(backbone, "patch_size", None)
        self.headless = True
        self.num_prototypes = 0  # no head, no prototypes

    def train(self, mode: bool = True) -> BackboneTeacher:  # noqa: ARG002 - a teacher never trains
        """Always eval mode: the teacher is frozen."""
        return super().train(False)

    def embed(self, x: Tensor) -> Tensor:
        """Normalised images → CLS and patch tokens ``[B, 1 + N, D]`` (registers / storage tokens
        dropped): what the target cache stores, and :meth:`head_forward` splits again.
        """
        backbone: Any = self.backbone
        out = backbone.forward_features(x)
        return torch.cat([out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]], dim=1)

    def head_forward(self, embedding: Tensor) -> BackboneOutput:
        """Targets from :meth:`embed`'s tokens ``[B, 1 + N, D]`` or a CLS-only cache ``[B, D]``."""
        if embedding.dim() == 2:
            return BackboneOutput(embedding, None)
        return BackboneOutput(embedding[:, 0], embedding[:, 1:])

    @torch.no_grad()
    def forward(self, x: Tensor, patch_features: bool = True) -> BackboneOutput:
        """Normalised images ``[B, 3, H, W]`` → normed CLS and (``patch_features``) patch tokens."""
        backbone: Any = self.backbone
        out = backbone.forward_features(x)
        return BackboneOutput(out["x_norm_clstoken"], out["x_norm_patchtokens"] if patch_features else None)

    def extra_repr(self) -> str:
        """Name, family, width and resolution for ``repr``."""
        return f"name={self.name!r}, family={self.family!r}, embed_dim={self.embed_dim}, resolution={self.resolution}"
