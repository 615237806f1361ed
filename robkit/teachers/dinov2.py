"""DINOv2 backbones (Oquab et al. 2024) in the released key layout, and the frozen headless teacher.

The released files (``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``) are bare state dicts of
facebookresearch/dinov2's ``DinoVisionTransformer`` with ``block_chunks=0``:

``patch_embed.proj`` (conv, patch 14), ``cls_token`` ``[1, 1, D]``, ``pos_embed`` ``[1, 1 + 37², D]``
(trained at 518 px), ``register_tokens`` ``[1, 4, D]`` (``_reg4`` files), ``mask_token`` ``[1, D]``,
``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2 | mlp.w12, mlp.w3,
ls2.gamma}`` (SwiGLU for ViT-g) and the final ``norm``; LayerNorm eps 1e-6; no head.

What the official code does and this module matches:

* the position table is resized at every resolution other than its own, bicubic, with the hub's
  settings: ``interpolate_offset=0.1`` (a scale factor of ``(n + 0.1) / 37``), no antialiasing, for
  the original models; ``interpolate_offset=0`` (an output size) with antialiasing for ``_reg4``;
* the CLS token gets ``pos_embed[0]`` and the registers are inserted after it, with no position;
* the hub model returns the final-normed CLS token; ``forward_features`` gives the normed CLS, register
  and patch tokens.

DINOv2 publishes no projection head or prototypes, so it cannot be a RoB teacher as is: the teacher
gives features (:class:`~robkit.teachers.backbone.BackboneTeacher`), not logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robkit.teachers.backbone import BackboneTeacher
from robkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD
from robkit.utils.errors import RobkitError

Tensor = torch.Tensor

# The hub's position-embedding resize settings per variant (dinov2/hub/backbones.py).
ORIGINAL_INTERPOLATION = {"interpolate_offset": 0.1, "interpolate_antialias": False}
REGISTERS_INTERPOLATION = {"interpolate_offset": 0.0, "interpolate_antialias": True}
HEAD_DIM = 64  # every released DINOv2 ViT has 64 channels per attention head


class DINOv2LayoutError(RobkitError, ValueError):
    """A state dict that is not a DINOv2 backbone in the released layout."""


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    """DINOv2's ``SwiGLUFFNFused``: hidden ``(int(4D · 2/3) + 7) // 8 * 8``, ``w3(silu(a) * b)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn: str, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _SwiGLU(dim, hidden) if ffn == "swiglu" else _Mlp(dim, hidden)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """The hidden width of DINOv2's fused SwiGLU for a ``dim``-wide ViT."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class DINOv2Backbone(nn.Module):
    """``DinoVisionTransformer`` with the released parameter names (see the module docstring)."""

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        patch_size: int = 14,
        img_size: int = 518,
        num_register_tokens: int = 0,
        ffn: str = "mlp",
        mlp_hidden: int | None = None,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ) -> None:
        super().__init__()
        if ffn not in ("mlp", "swiglu"):
            raise DINOv2LayoutError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        self.embed_dim, self.patch_size, self.num_heads = embed_dim, patch_size, num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset, self.interpolate_antialias = interpolate_offset, interpolate_antialias
        grid = img_size // patch_size
        hidden = mlp_hidden or (swiglu_hidden(embed_dim) if ffn == "swiglu" else 4 * embed_dim)
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, ffn, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, n_tokens: int, h: int, w: int, dtype: torch.dtype) -> Tensor:
        """The position table for an ``h × w`` image (DINOv2's ``interpolate_pos_encoding``)."""
        n_table = self.pos_embed.shape[1] - 1
        if n_tokens - 1 == n_table and h == w:
            return self.pos_embed
        pos = self.pos_embed.float()
        side = int(math.sqrt(n_table))
        h0, w0 = h // self.patch_size, w // self.patch_size
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            # the official "historical kludge": a scale factor slightly above n / side
            scale = ((h0 + self.interpolate_offset) / side, (w0 + self.interpolate_offset) / side)
            grid = F.interpolate(
                grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias
            )
        else:
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (h0, w0):
            raise DINOv2LayoutError(f"position grid resized to {tuple(grid.shape[-2:])}, expected {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def tokens(self, x: Tensor) -> Tensor:
        """All final-normed tokens ``[B, 1 + R + N, D]``: CLS, registers, patches."""
        h, w = x.shape[-2:]
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.interpolate_pos_encoding(t.shape[1], h, w, t.dtype)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """The official ``forward_features`` keys: normed CLS ``[B, D]``, registers ``[B, R, D]``, patches ``[B, N, D]``."""
        t = self.tokens(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": t[:, 0],
            "x_norm_regtokens": t[:, 1 : r + 1],
            "x_norm_patchtokens": t[:, r + 1 :],
        }

    def forward(self, x: Tensor) -> Tensor:
        """What the hub model returns: the final-normed CLS token ``[B, D]``."""
        return self.tokens(x)[:, 0]


def is_dinov2_state(sd: dict[str, Any]) -> bool:
    """Whether a bare state dict has DINOv2's backbone keys (LayerScale, mask token, patch conv)."""
    return {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "blocks.0.ls1.gamma"} <= set(
        sd
    )


def arch_from_state(sd: dict[str, Tensor]) -> dict[str, Any]:
    """The hyper-parameters of a released DINOv2 state dict, inferred from its shapes.

    Heads are ``embed_dim / 64`` (every release); the registers decide the hub's interpolation
    settings, as ``dinov2/hub/backbones.py`` pairs them.
    """
    if not is_dinov2_state(sd):
        raise DINOv2LayoutError(
            "not a DINOv2 backbone: expected cls_token, pos_embed, mask_token, patch_embed.proj.weight and "
            "blocks.N.ls1.gamma (a dinov2_vit*14*_pretrain.pth file)"
        )
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    n_table = sd["pos_embed"].shape[1] - 1
    side = int(math.isqrt(n_table))
    if side * side != n_table:
        raise DINOv2LayoutError(f"pos_embed holds {n_table} patch positions, not a square grid")
    regs = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = int(
        sd["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[1 if swiglu else 0]
    )
    if dim % HEAD_DIM:
        raise DINOv2LayoutError(f"embed_dim {dim} is not a multiple of {HEAD_DIM}; pass num_heads explicitly")
    return {
        "type": "dinov2",
        "embed_dim": int(dim),
        "depth": depth,
        "num_heads": int(dim) // HEAD_DIM,
        "patch_size": int(patch),
        "img_size": side * int(patch),
        "num_register_tokens": regs,
        "ffn": "swiglu" if swiglu else "mlp",
        "mlp_hidden": hidden,
        **(REGISTERS_INTERPOLATION if regs else ORIGINAL_INTERPOLATION),
    }


def build_backbone(arch: dict[str, Any]) -> DINOv2Backbone:
    """A :class:`DINOv2Backbone` from :func:`arch_from_state`'s (or a catalog record's) fields."""
    keys = (
        "embed_dim",
        "depth",
        "num_heads",
        "patch_size",
        "img_size",
        "num_register_tokens",
        "ffn",
        "mlp_hidden",
        "interpolate_offset",
        "interpolate_antialias",
    )
    return DINOv2Backbone(**{k: arch[k] for k in keys if arch.get(k) is not None})


def dinov2_teacher(
    sd: dict[str, Tensor],
    name: str,
    declared: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    sha256: str | None = None,
    source: str = "",
) -> BackboneTeacher:
    """A frozen :class:`BackboneTeacher` from a released DINOv2 state dict (strict key match).

    ``declared``: a catalog record's ``arch``, which must agree with the shapes of the file.
    """
    from robkit.teachers.teacher import load_exact

    arch = arch_from_state(sd)
    for k, v in (declared or {}).items():
        if k in arch and k != "type" and v is not None and v != arch[k]:
            raise DINOv2LayoutError(f"{name}: the catalog declares {k}={v!r}, the file has {arch[k]!r}")
    arch = {**arch, **{k: v for k, v in (declared or {}).items() if v is not None}}
    net = build_backbone(arch)
    load_exact(net, sd, f"{name} backbone")
    m = meta or {}
    return BackboneTeacher(
        net,
        name=name,
        family="dinov2",
        arch=arch,
        resolution=int(m.get("resolution") or 224),
        mean=tuple(m.get("mean") or IMAGENET_MEAN),
        std=tuple(m.get("std") or IMAGENET_STD),
        sha256=sha256,
        source=source,
    )
