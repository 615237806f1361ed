"""SwAV-style bottleneck ResNet with a widen factor, with torchvision's parameter names.

SwAV's RN50-w2/w4/w5 widen *every* stage including the 7×7 stem (``widen × 64`` channels,
Caron et al. 2020, appendix; ``swav/src/resnet50.py``), which torchvision's and timm's ResNets
cannot express (their stem is fixed at 64).  This builder takes the stem width, the inner
(bottleneck) width of each stage and the number of blocks per stage, so it also builds the
plain ResNet-50 (``widen=1``) and the tiny configurations the tests generate.

Keys are torchvision's (``conv1``, ``bn1``, ``layer{1-4}.{i}.conv{1,2,3}``/``bn{1,2,3}``,
``downsample.{0,1}``), the names the official SwAV and DINO files use after ``module.`` /
``backbone.`` are stripped.  The stride sits on the 3×3 convolution (ResNet v1.5), as in
torchvision and SwAV.  SwAV pads the input by 1 and uses ``padding=2`` in ``conv1``; that is
numerically identical to torchvision's ``padding=3``, which we use.

``forward(x [B, 3, H, W]) -> [B, stage_widths[-1] * expansion]``: global-average-pooled features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride) → 1×1 bottleneck with identity or projection shortcut."""

    def __init__(self, inplanes: int, width: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, inplanes, H, W] -> [B, out_planes, H/stride, W/stride]``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class WideResNet(nn.Module):
    """Bottleneck ResNet: ``stem_width`` 7×7 stem, four stages of ``stage_widths`` inner widths.

    ``resnet50_wide(widen)`` gives SwAV's RN50-w{widen}: stem ``64·widen``, inner widths
    ``64·widen·(1, 2, 4, 8)``, blocks (3, 4, 6, 3), output ``2048·widen`` channels.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        stem_width: int = 64,
        stage_widths: Sequence[int] = (64, 128, 256, 512),
        expansion: int = 4,
    ) -> None:
        super().__init__()
        if len(layers) != len(stage_widths):
            raise ValueError(
                f"layers {tuple(layers)} and stage_widths {tuple(stage_widths)} differ in length"
            )
        self.layers_cfg = tuple(int(n) for n in layers)
        self.stem_width = int(stem_width)
        self.stage_widths = tuple(int(w) for w in stage_widths)
        self.expansion = int(expansion)
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = stem_width
        for i, (n, w) in enumerate(zip(self.layers_cfg, self.stage_widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(inplanes, w, w * expansion, stride))
                inplanes = w * expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map ``[B, num_features, H/32, W/32]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(len(self.layers_cfg)):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, num_features]`` (global-average-pooled)."""
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


def resnet50_wide(widen: int = 1) -> WideResNet:
    """SwAV's ``resnet50w{widen}`` (``widen=1`` is the plain torchvision ResNet-50 backbone)."""
    return WideResNet((3, 4, 6, 3), 64 * widen, tuple(64 * widen * m for m in (1, 2, 4, 8)))
