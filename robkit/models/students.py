"""Student backbones: small networks that map images to one embedding per image.

Every student returns the representation used for evaluation: the globally average-pooled
last feature map for CNNs, the CLS token after the final LayerNorm for ViTs.  ViTs take any
input size (timm's dynamic position-embedding resampling), which multi-crop needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from robkit.catalog import CatalogError
from robkit.utils.suggest import did_you_mean


@dataclass(frozen=True)
class StudentSpec:
    """How to build one student architecture."""

    builder: Callable[..., nn.Module]
    embed_dim: int
    kind: str  # "cnn" or "vit"
    description: str


def _torchvision_cnn(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(**kw: Any) -> nn.Module:
        net: Any = fn(weights=None, **kw)
        if hasattr(net, "fc"):  # ResNet
            net.fc = nn.Identity()
            return net
        # MobileNets: features -> avgpool -> classifier; keep the pooled features only.
        return nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))

    return build


def _timm_vit(arch: str) -> Callable[..., nn.Module]:
    def build(
        drop_path_rate: float = 0.0, img_size: int = 224, patch_size: int | None = None, **kw: Any
    ) -> nn.Module:
        extra: dict[str, Any] = {"patch_size": patch_size} if patch_size else {}
        return timm.create_model(
            arch,
            pretrained=False,
            num_classes=0,
            dynamic_img_size=True,
            dynamic_img_pad=True,  # any multi-crop size: pad to a multiple of the patch size
            img_size=img_size,
            drop_path_rate=drop_path_rate,
            **extra,
            **kw,
        )

    return build


STUDENTS: dict[str, StudentSpec] = {
    "mobilenet_v2": StudentSpec(
        _torchvision_cnn(torchvision.models.mobilenet_v2), 1280, "cnn", "MobileNetV2 1.0"
    ),
    "mobilenet_v3": StudentSpec(
        _torchvision_cnn(torchvision.models.mobilenet_v3_large), 960, "cnn", "MobileNetV3-Large 1.0"
    ),
    "mobilenet_v3_small": StudentSpec(
        _torchvision_cnn(torchvision.models.mobilenet_v3_small), 576, "cnn", "MobileNetV3-Small 1.0"
    ),
    "resnet18": StudentSpec(_torchvision_cnn(torchvision.models.resnet18), 512, "cnn", "ResNet-18"),
    "resnet34": StudentSpec(_torchvision_cnn(torchvision.models.resnet34), 512, "cnn", "ResNet-34"),
    "resnet50": StudentSpec(_torchvision_cnn(torchvision.models.resnet50), 2048, "cnn", "ResNet-50"),
    "vit_tiny": StudentSpec(_timm_vit("vit_tiny_patch16_224"), 192, "vit", "ViT-Tiny/16"),
    "vit_tiny_patch32": StudentSpec(_timm_vit("vit_tiny_patch16_224"), 192, "vit", "ViT-Tiny/32"),
    "vit_small": StudentSpec(_timm_vit("vit_small_patch16_224"), 384, "vit", "ViT-Small/16"),
}
_DEFAULT_KW = {"vit_tiny_patch32": {"patch_size": 32}}


class Student(nn.Module):
    """A backbone with a declared embedding size: ``forward(x [B,3,H,W]) -> [B, embed_dim]``."""

    def __init__(self, arch: str, **kwargs: Any) -> None:
        super().__init__()
        if arch not in STUDENTS:
            hint = did_you_mean(arch, STUDENTS, cutoff=0.4)
            raise CatalogError(f"unknown student {arch!r}.{hint} Known students: {', '.join(STUDENTS)}.")
        spec = STUDENTS[arch]
        self.arch = arch
        self.kind = spec.kind
        self.build_kwargs = {**_DEFAULT_KW.get(arch, {}), **kwargs}
        self.backbone = spec.builder(**self.build_kwargs)
        self.embed_dim = spec.embed_dim

    @property
    def is_vit(self) -> bool:
        """Whether the backbone is a (timm) ViT."""
        return self.kind == "vit"

    @property
    def patch_size(self) -> int | None:
        """The ViT's patch size in px; ``None`` for a CNN."""
        backbone: Any = self.backbone
        return backbone.patch_embed.patch_size[0] if self.is_vit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, embed_dim]``."""
        return self.backbone(x)

    def forward_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W] -> (embedding [B, embed_dim], spatial map [B, embed_dim, h, w])`` in one pass.

        The embedding equals :meth:`forward`'s; the map is what it pools: the last feature map of a
        CNN, the final-normed patch tokens of a ViT on its patch grid.
        """
        backbone: Any = self.backbone
        if self.is_vit:
            tokens = self.forward_tokens(x)
            p = self.patch_size or 1
            h, w = -(-x.shape[-2] // p), -(-x.shape[-1] // p)  # the ViT pads to whole patches
            patches = tokens[:, backbone.num_prefix_tokens :]
            return backbone.forward_head(tokens, pre_logits=True), patches.transpose(1, 2).reshape(
                x.shape[0], -1, h, w
            )
        if isinstance(backbone, nn.Sequential):  # MobileNets: features -> pool -> flatten
            m = backbone[0](x)
            return backbone[2](backbone[1](m)), m
        m = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))  # torchvision ResNet
        m = backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(m))))
        return torch.flatten(backbone.avgpool(m), 1), m

    def forward_tokens(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ViT only: all output tokens ``[B, 1+N', D]`` after the final norm.

        ``mask`` ``[B, H/p, W/p]`` (bool) replaces those patch embeddings by ``mask_token``
        before position embeddings (iBOT).  ``keep`` ``[N']`` (long) keeps only those patch
        tokens after position embeddings, the class token always kept (MSN patch drop).
        """
        if not self.is_vit:
            raise TypeError(f"forward_tokens needs a ViT student, got {self.arch}")
        vit: Any = self.backbone
        x = vit.patch_embed(x)  # [B, h, w, D] with dynamic_img_size
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask needs a mask_token")
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype).view(1, 1, 1, -1), x)
        x = vit._pos_embed(x)
        if keep is not None:
            npre = vit.num_prefix_tokens
            x = torch.cat([x[:, :npre], x[:, npre:].index_select(1, keep + 0)], dim=1)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)


def build_student(arch: str, **kwargs: Any) -> Student:
    """Build a freshly initialised student by name (see ``STUDENTS``)."""
    return Student(arch, **kwargs)
