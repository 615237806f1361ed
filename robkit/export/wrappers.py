"""The module that gets exported: input contract (layout, dtype, normalisation) + student (+ probe).

Mobile runtimes disagree on what an app hands them: Android bitmaps are NHWC uint8, Core ML
``ImageType`` gives RGB pixels scaled by a single scalar (a per-channel scale list is rejected by
coremltools for NCHW inputs), ONNX consumers expect normalised NCHW floats.  Rather than asking
every app to reproduce the training normalisation, the wrapper folds ``(x / 255 - mean) / std``
into the graph when the input is raw pixels, as one multiply-add that converters const-fold.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robkit.export.targets import ExportTarget


class ExportModule(nn.Module):
    """``input [B,3,H,W] or [B,H,W,3] -> embedding [B,D] or logits/probabilities [B,C]``.

    ``pixel_scale`` is what one input unit is worth in [0, 1] pixels: ``1/255`` for uint8
    pixels, ``1.0`` for images (Core ML's ImageType applies the 1/255; TFLite image inputs are
    RGB in [0, 1], what MediaPipe feeds with mean 0, std 255), ``None`` when the
    input is already normalised (the normalisation is then the app's job, as in training).
    """

    in_mul: torch.Tensor
    in_add: torch.Tensor

    def __init__(
        self,
        student: nn.Module,
        probe: nn.Module | None = None,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        layout: str = "NCHW",
        pixel_scale: float | None = None,
        softmax: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        self.probe = probe
        self.channels_last = layout.upper() == "NHWC"
        self.fold = pixel_scale is not None
        self.softmax = softmax
        m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        scale = pixel_scale if pixel_scale is not None else 1.0
        # (x * scale - mean) / std == x * (scale / std) + (-mean / std): one mul + one add.
        self.register_buffer("in_mul", scale / s, persistent=False)
        self.register_buffer("in_add", -m / s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Input ``[B, 3, H, W]`` (``[B, H, W, 3]`` if NHWC) → embedding ``[B, D]`` or class scores ``[B, C]``."""
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        if self.fold:
            x = x * self.in_mul + self.in_add
        y = self.student(x)
        if self.probe is not None:
            y = self.probe(y)
            if self.softmax:
                y = F.softmax(y, dim=-1)
        return y


def freeze_input_size(student: nn.Module, size: int) -> nn.Module:
    """A copy of ``student`` specialised to ``size``×``size`` inputs.

    robkit's ViT students resample their position embeddings on every call (timm's
    ``dynamic_img_size``, bicubic with antialiasing), an op Core ML and TFLite do not support
    and a waste on a fixed-size mobile input.  The resampling is done once here, with the same
    function, so the exported graph holds the already-resampled table.  CNNs are returned as is.
    """
    vit: Any = getattr(student, "backbone", student)
    if not getattr(vit, "dynamic_img_size", False):
        return student
    frozen = copy.deepcopy(student)
    vit = frozen.backbone
    vit.set_input_size(img_size=(size, size))
    vit.dynamic_img_size = False
    vit.patch_embed.flatten = True  # dynamic mode emits NHWC patches; fixed mode expects tokens [B, N, D]
    vit.patch_embed.strict_img_size = True
    return frozen


def build_export_module(
    student: nn.Module,
    target: ExportTarget,
    mean: Sequence[float],
    std: Sequence[float],
    probe: nn.Module | None = None,
    resolution: int | None = None,
) -> ExportModule:
    """The wrapper for ``target``'s input contract, in eval mode (ViTs fixed to ``resolution``)."""
    if target.input_dtype == "uint8":
        pixel_scale: float | None = 1.0 / 255.0
    elif target.input == "image":
        pixel_scale = 1.0
    else:
        pixel_scale = None
    # Core ML's ClassifierConfig reads the output as class probabilities.
    softmax = probe is not None and target.format == "coreml" and target.input == "image"
    if resolution is not None:
        student = freeze_input_size(student, resolution)
    return ExportModule(
        student, probe, mean=mean, std=std, layout=target.layout, pixel_scale=pixel_scale, softmax=softmax
    ).eval()


def make_inputs(
    images_u8: torch.Tensor, target: ExportTarget, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Real images ``uint8 [N,3,S,S]`` (already at the export resolution) as the target's input tensor."""
    if target.input_dtype == "uint8":
        x = images_u8.clone()
    elif target.input == "image":
        x = images_u8.float() / 255.0  # Core ML: after ImageType's scale=1/255; TFLite: MediaPipe's (x-0)/255
    else:
        m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        x = (images_u8.float() / 255.0 - m) / s
    if target.layout == "NHWC":
        x = x.permute(0, 2, 3, 1).contiguous()
    return x
