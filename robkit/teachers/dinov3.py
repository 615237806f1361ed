"""DINOv3 backbones (Siméoni et al. 2025) in the released key layout, and the frozen headless teacher.

The released files (``dinov3_<arch>_pretrain_<lvd1689m|sat493m>-<hash>.pth``) are bare state dicts of
facebookresearch/dinov3's ``DinoVisionTransformer`` or ``ConvNeXt``, which its hub loads with
``strict=True``.

**ViT** (patch 16, every size): ``patch_embed.proj`` (conv, no norm), ``cls_token`` ``[1, 1, D]``,
``storage_tokens`` ``[1, 4, D]``, ``mask_token`` ``[1, D]``, the ``rope_embed.periods`` buffer
``[head_dim / 4]`` (no position table), ``blocks.{i}.{norm1, attn.qkv (+ attn.qkv.bias_mask), attn.proj,
ls1.gamma, norm2, mlp.fc1, mlp.fc2 | mlp.w1, mlp.w2, mlp.w3, ls2.gamma}``, the final ``norm`` and, in the
satellite ViT-L and both ViT-7B files, ``local_cls_norm`` (a training-only norm of the local crops'
CLS token). What the official code does at evaluation and this module matches:

* LayerNorm eps 1e-5 everywhere (the hub's ``norm_layer="layernormbf16"``);
* ``qkv`` is a ``LinearKMaskedBias``: its bias is multiplied by the ``bias_mask`` buffer of the file
  (1 for q and v, 0 for k) before use; ViT-7B has no qkv bias at all;
* axial RoPE with the file's ``periods``, computed in float32 (``pos_embed_rope_dtype="fp32"``): patch
  centres ``(i + 0.5) / H`` and ``(j + 0.5) / W`` (``normalize_coords="separate"``) mapped to
  ``[-1, 1]``, angles ``2π · coord / period`` for the row then the column coordinate, tiled twice over the
  head; rotation ``x·cos + rotate_half(x)·sin`` of q and k of the patch tokens only, never of the CLS
  and storage tokens. The coordinate shift / jitter / rescale augmentations run only in training;
* SwiGLU (ViT-S+, H+, 7B) is ``w3(silu(w1 x) · w2 x)`` with the hidden width ``int(2/3 · ffn_ratio · D)``
  rounded up to 8 (64 for 7B);
* ``forward_features`` normalises all tokens with ``norm`` (``cls_norm`` for the CLS and storage tokens
  where a model unties them) and returns ``x_norm_clstoken``, ``x_storage_tokens``,
  ``x_norm_patchtokens`` and ``x_prenorm``; the hub model returns ``x_norm_clstoken``.

**ConvNeXt** (tiny, small, base, large): ``downsample_layers.{0..3}`` (stem conv 4/4 + channels-first
LayerNorm; then LayerNorm + conv 2/2), ``stages.{s}.{j}.{dwconv, norm, pwconv1, pwconv2, gamma}`` and the
final ``norm``, saved a second time as ``norms.3`` (the same module in the official ``norms`` list).
``forward_features`` averages the last map into a CLS-equivalent token, puts it before the ``H/32 · W/32``
patch tokens and applies ``norm`` (eps 1e-6) to all of them.

DINOv3 publishes no projection head, so the teacher gives features
(:class:`~robkit.teachers.backbone.BackboneTeacher`), not logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robkit.teachers.backbone import BackboneTeacher
from robkit.teachers.dinov2 import _LayerScale  # the same per-channel gamma in both releases
from robkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD
from robkit.utils.errors import RobkitError

Tensor = torch.Tensor

# The hub's settings shared by every released ViT (dinov3/hub/backbones.py), none of which the
# weights show: norm_layer "layernormbf16" (eps 1e-5), RoPE base 100 with "separate" normalisation,
# computed in float32.
VIT_NORM_EPS = 1e-5
ROPE_DEFAULTS: dict[str, Any] = {
    "rope_base": 100.0,
    "rope_normalize_coords": "separate",
    "rope_dtype": "fp32",
}
CONVNEXT_NORM_EPS = 1e-6
CONVNEXT_STRIDE = 32  # the patch tokens of ConvNeXt's last stage are 32 x 32 pixels
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DINOv3LayoutError(RobkitError, ValueError):
    """A state dict that is not a DINOv3 backbone in the released layout."""


# --------------------------------------------------------------------------------------------
# ViT


class _MaskedBiasLinear(nn.Linear):
    """The official ``LinearKMaskedBias``: the bias times the ``bias_mask`` buffer (q and v kept, k zeroed)."""

    bias_mask: Tensor  # a buffer, registered only with a bias

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if bias:
            mask = torch.ones(out_features)
            mask[out_features // 3 : 2 * out_features // 3] = 0
            self.register_buffer("bias_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, mask_k_bias: bool, proj_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = (
            _MaskedBiasLinear(dim, 3 * dim, qkv_bias) if mask_k_bias else nn.Linear(dim, 3 * dim, qkv_bias)
        )
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    @staticmethod
    def _rope(t: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        """Rotate the last ``sin.shape[0]`` tokens (the patches) in RoPE's dtype; the prefix is left as is."""
        n_prefix = t.shape[-2] - sin.shape[-2]
        r = t.to(sin.dtype)
        patches = r[..., n_prefix:, :]
        rotated = patches * cos + _rotate_half(patches) * sin
        return torch.cat([r[..., :n_prefix, :], rotated], dim=-2).to(t.dtype)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            sin, cos = rope
            q, k = self._rope(q, sin, cos), self._rope(k, sin, cos)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden, bias=bias), nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    """DINOv3's ``SwiGLUFFN``: separate ``w1`` (gate) and ``w2`` (value), ``w3(silu(w1 x) * w2 x)``."""

    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, arch: dict[str, Any]) -> None:
        super().__init__()
        eps = arch["norm_eps"]
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads, arch["qkv_bias"], arch["mask_k_bias"], arch["proj_bias"])
        self.ls1: nn.Module = _LayerScale(dim) if arch["layerscale"] else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        ffn = _SwiGLU if arch["ffn"] == "swiglu" else _Mlp
        self.mlp = ffn(dim, arch["ffn_hidden"], arch["ffn_bias"])
        self.ls2: nn.Module = _LayerScale(dim) if arch["layerscale"] else nn.Identity()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)  # [B, D, H/p, W/p]


class _RopePositionEmbedding(nn.Module):
    """Axial RoPE without learnable weights: ``(sin, cos)`` ``[H·W, head_dim]`` for an ``H × W`` patch grid.

    ``periods`` ``[head_dim / 4]`` is a persistent buffer (the released files hold it); built from
    ``base`` (``base ** (4i / head_dim)``) or from ``min_period`` / ``max_period`` (log-spaced).
    """

    periods: Tensor

    def __init__(
        self,
        head_dim: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: str = "separate",
        dtype: str = "fp32",
    ) -> None:
        super().__init__()
        if head_dim % 4:
            raise DINOv3LayoutError(f"RoPE needs a head width divisible by 4, got {head_dim}")
        if normalize_coords not in ("separate", "min", "max"):
            raise DINOv3LayoutError(
                f"rope_normalize_coords must be separate, min or max, got {normalize_coords!r}"
            )
        if dtype not in _DTYPES:
            raise DINOv3LayoutError(f"rope_dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.normalize_coords, self.dtype = normalize_coords, _DTYPES[dtype]
        n = head_dim // 4
        i = torch.arange(n, dtype=torch.float64)
        if min_period is not None and max_period is not None:
            ratio = max_period / min_period
            periods = ratio ** torch.linspace(0, 1, n, dtype=torch.float64) / ratio * max_period
        elif base is not None:
            periods = base ** (4 * i / head_dim)
        else:
            raise DINOv3LayoutError("RoPE needs rope_base or both rope_min_period and rope_max_period")
        self.register_buffer("periods", periods.to(self.dtype))

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        kw: dict[str, Any] = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "separate":
            den_h, den_w = h, w
        else:
            den_h = den_w = max(h, w) if self.normalize_coords == "max" else min(h, w)
        ys = torch.arange(0.5, h, **kw) / den_h
        xs = torch.arange(0.5, w, **kw) / den_w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2) * 2.0 - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods.to(self.dtype)[None, None, :]
        angles = angles.reshape(h * w, -1).repeat(1, 2)  # [HW, head_dim]: (rows, cols) twice
        return torch.sin(angles), torch.cos(angles)


def swiglu_hidden(dim: int, ffn_ratio: float, align_to: int = 8) -> int:
    """The hidden width of DINOv3's SwiGLU: ``int(2/3 · int(dim · ratio))`` rounded up to ``align_to``."""
    d = int(int(dim * ffn_ratio) * 2 / 3)
    return d + (-d % align_to)


VIT_KEYS = (
    "embed_dim",
    "depth",
    "num_heads",
    "patch_size",
    "n_storage_tokens",
    "ffn",
    "ffn_hidden",
    "qkv_bias",
    "mask_k_bias",
    "proj_bias",
    "ffn_bias",
    "layerscale",
    "norm_eps",
    "untie_cls_and_patch_norms",
    "untie_global_and_local_cls_norm",
    "rope_base",
    "rope_min_period",
    "rope_max_period",
    "rope_normalize_coords",
    "rope_dtype",
)


class DINOv3Backbone(nn.Module):
    """``DinoVisionTransformer`` with the released parameter names (see the module docstring)."""

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        patch_size: int = 16,
        n_storage_tokens: int = 4,
        ffn: str = "mlp",
        ffn_hidden: int | None = None,
        qkv_bias: bool = True,
        mask_k_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale: bool = True,
        norm_eps: float = VIT_NORM_EPS,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        rope_base: float | None = 100.0,
        rope_min_period: float | None = None,
        rope_max_period: float | None = None,
        rope_normalize_coords: str = "separate",
        rope_dtype: str = "fp32",
    ) -> None:
        super().__init__()
        if ffn not in ("mlp", "swiglu"):
            raise DINOv3LayoutError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        if embed_dim % num_heads:
            raise DINOv3LayoutError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.embed_dim, self.patch_size, self.num_heads = embed_dim, patch_size, num_heads
        self.n_storage_tokens = n_storage_tokens
        hidden = ffn_hidden or (swiglu_hidden(embed_dim, 4.0) if ffn == "swiglu" else 4 * embed_dim)
        block_arch = {
            "norm_eps": norm_eps,
            "qkv_bias": qkv_bias,
            "mask_k_bias": mask_k_bias,
            "proj_bias": proj_bias,
            "layerscale": layerscale,
            "ffn": ffn,
            "ffn_hidden": hidden,
            "ffn_bias": ffn_bias,
        }
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = (
            nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim)) if n_storage_tokens else None
        )
        self.rope_embed = _RopePositionEmbedding(
            embed_dim // num_heads,
            rope_base,
            rope_min_period,
            rope_max_period,
            rope_normalize_coords,
            rope_dtype,
        )
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, block_arch) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.cls_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if untie_cls_and_patch_norms else None
        # only ever applied to the local crops in training; loaded so that the file matches exactly
        self.local_cls_norm = (
            nn.LayerNorm(embed_dim, eps=norm_eps) if untie_global_and_local_cls_norm else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """The official ``forward_features`` keys: normed CLS ``[B, D]``, storage ``[B, R, D]``, patches
        ``[B, N, D]`` and the un-normed tokens ``x_prenorm`` ``[B, 1 + R + N, D]``.
        """
        grid = self.patch_embed(x)
        h, w = grid.shape[-2:]
        t = grid.flatten(2).transpose(1, 2)
        b, r = t.shape[0], self.n_storage_tokens
        cls = self.cls_token + 0 * self.mask_token  # as the official code writes it without masks
        prefix = [cls.expand(b, -1, -1)]
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens.expand(b, -1, -1))
        t = torch.cat([*prefix, t], dim=1)
        rope = self.rope_embed(h, w)
        for blk in self.blocks:
            t = blk(t, rope)
        if self.cls_norm is not None:
            cls_reg, patches = self.cls_norm(t[:, : r + 1]), self.norm(t[:, r + 1 :])
        else:
            normed = self.norm(t)
            cls_reg, patches = normed[:, : r + 1], normed[:, r + 1 :]
        return {
            "x_norm_clstoken": cls_reg[:, 0],
            "x_storage_tokens": cls_reg[:, 1:],
            "x_norm_patchtokens": patches,
            "x_prenorm": t,
        }

    def forward(self, x: Tensor) -> Tensor:
        """What the hub model returns: the final-normed CLS token ``[B, D]``."""
        return self.forward_features(x)["x_norm_clstoken"]


# --------------------------------------------------------------------------------------------
# ConvNeXt


class _ChannelsLastLayerNorm(nn.LayerNorm):
    """The official channels-last LayerNorm inside a ConvNeXt block (``weight`` / ``bias``, eps 1e-6)."""

    def __init__(self, dim: int, eps: float = CONVNEXT_NORM_EPS) -> None:
        super().__init__(dim, eps=eps)


class _ChannelsFirstLayerNorm(_ChannelsLastLayerNorm):
    """The official channels-first LayerNorm of ConvNeXt's stem and downsampling layers: the same
    normalisation over the channel axis of ``[B, C, H, W]``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layerscale: bool) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = _ChannelsLastLayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim)) if layerscale else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class DINOv3ConvNeXt(nn.Module):
    """DINOv3's ``ConvNeXt`` with the released parameter names (see the module docstring).

    ``patch_size`` is the stride of the patch tokens (32); the official module leaves it ``None``.
    """

    def __init__(
        self, depths: list[int], dims: list[int], layerscale: bool = True, norm_eps: float = CONVNEXT_NORM_EPS
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise DINOv3LayoutError(f"a ConvNeXt has 4 stages; got depths {depths} and dims {dims}")
        self.embed_dim, self.patch_size, self.n_storage_tokens = int(dims[-1]), CONVNEXT_STRIDE, 0
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), _ChannelsFirstLayerNorm(dims[0]))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    _ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*(_ConvNeXtBlock(dims[i], layerscale) for _ in range(depths[i]))) for i in range(4)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=norm_eps)
        # the official per-stage norms list: the final norm is the same module, so it is saved twice
        self.norms = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Identity(), self.norm])

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """The official keys: normed pooled token ``[B, C]`` as CLS, no storage tokens, normed patches
        ``[B, H/32 · W/32, C]`` and the un-normed patches ``x_prenorm``.
        """
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        pooled = x.mean(dim=(-2, -1))
        patches = x.flatten(2).transpose(1, 2)
        normed = self.norm(torch.cat([pooled.unsqueeze(1), patches], dim=1))
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_storage_tokens": normed[:, 1:1],
            "x_norm_patchtokens": normed[:, 1:],
            "x_prenorm": patches,
        }

    def forward(self, x: Tensor) -> Tensor:
        """What the hub model returns: the normed pooled token ``[B, C]``."""
        return self.forward_features(x)["x_norm_clstoken"]


# --------------------------------------------------------------------------------------------
# layout detection and shape inference


def is_dinov3_vit_state(sd: dict[str, Any]) -> bool:
    """A DINOv3 ViT: RoPE ``periods`` buffer, CLS and mask tokens, patch conv, and no position table."""
    keys = set(sd)
    return {"cls_token", "mask_token", "rope_embed.periods", "patch_embed.proj.weight"} <= keys and (
        "pos_embed" not in keys
    )


def is_dinov3_convnext_state(sd: dict[str, Any]) -> bool:
    """A DINOv3 ConvNeXt: the official stem / stages layout with the ``norms.3`` copy of the final norm
    and no classifier ``head``.
    """
    keys = set(sd)
    return {
        "downsample_layers.0.0.weight",
        "stages.0.0.dwconv.weight",
        "norm.weight",
        "norms.3.weight",
    } <= keys and (not any(k.startswith("head.") for k in keys))


def is_dinov3_state(sd: dict[str, Any]) -> bool:
    """Whether a bare state dict is a DINOv3 backbone (ViT or ConvNeXt) in the released layout."""
    return is_dinov3_vit_state(sd) or is_dinov3_convnext_state(sd)


def _count(sd: dict[str, Any], prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def arch_from_state(sd: dict[str, Tensor]) -> dict[str, Any]:
    """The hyper-parameters of a released DINOv3 state dict, inferred from its shapes.

    ViT: the head width is ``4 · len(rope_embed.periods)``, so the heads are visible; the norm eps and
    RoPE settings, which the weights do not show, are those of every release (:data:`ROPE_DEFAULTS`).
    """
    if is_dinov3_convnext_state(sd):
        depths = [_count(sd, f"stages.{s}.") for s in range(4)]
        dims = [int(sd[f"stages.{s}.0.dwconv.weight"].shape[0]) for s in range(4)]
        return {
            "type": "dinov3_convnext",
            "depths": depths,
            "dims": dims,
            "layerscale": "stages.0.0.gamma" in sd,
            "norm_eps": CONVNEXT_NORM_EPS,
        }
    if not is_dinov3_vit_state(sd):
        raise DINOv3LayoutError(
            "not a DINOv3 backbone: expected a ViT with cls_token, mask_token, rope_embed.periods and "
            "patch_embed.proj.weight (and no pos_embed), or a ConvNeXt with downsample_layers.*, stages.* and "
            "norms.3 (a dinov3_*_pretrain_*.pth file)"
        )
    dim, _, patch, _ = (int(s) for s in sd["patch_embed.proj.weight"].shape)
    head_dim = 4 * int(sd["rope_embed.periods"].shape[0])
    if dim % head_dim:
        raise DINOv3LayoutError(
            f"rope_embed.periods implies heads {head_dim} wide, which do not divide {dim}"
        )
    swiglu = "blocks.0.mlp.w1.weight" in sd
    ffn_key = "blocks.0.mlp.w1" if swiglu else "blocks.0.mlp.fc1"
    return {
        "type": "dinov3",
        "embed_dim": dim,
        "depth": _count(sd, "blocks."),
        "num_heads": dim // head_dim,
        "patch_size": patch,
        "n_storage_tokens": int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0,
        "ffn": "swiglu" if swiglu else "mlp",
        "ffn_hidden": int(sd[ffn_key + ".weight"].shape[0]),
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "mask_k_bias": "blocks.0.attn.qkv.bias_mask" in sd,
        "proj_bias": "blocks.0.attn.proj.bias" in sd,
        "ffn_bias": ffn_key + ".bias" in sd,
        "layerscale": "blocks.0.ls1.gamma" in sd,
        "norm_eps": VIT_NORM_EPS,
        "untie_cls_and_patch_norms": "cls_norm.weight" in sd,
        "untie_global_and_local_cls_norm": "local_cls_norm.weight" in sd,
        **ROPE_DEFAULTS,
    }


def build_backbone(arch: dict[str, Any]) -> DINOv3Backbone | DINOv3ConvNeXt:
    """A backbone from :func:`arch_from_state`'s (or a catalog record's) fields."""
    if arch.get("type") == "dinov3_convnext":
        return DINOv3ConvNeXt(
            list(arch["depths"]),
            list(arch["dims"]),
            bool(arch.get("layerscale", True)),
            float(arch.get("norm_eps", CONVNEXT_NORM_EPS)),
        )
    return DINOv3Backbone(**{k: arch[k] for k in VIT_KEYS if arch.get(k) is not None})


def check_release_hash(digest: str, prefix: str | None, name: str) -> None:
    """The released file names end in ``-<first 8 hex digits of the file's sha256>`` (torch.hub's
    ``check_hash`` convention); a file whose hash does not start with them is not the release.
    """
    if prefix and not digest.lower().startswith(str(prefix).lower()):
        raise DINOv3LayoutError(
            f"{name}: the file has sha256 {digest}, but the released file's name says it starts with {prefix}. "
            "It is corrupt or not the published file: download it again from the link in the access e-mail."
        )


def dinov3_teacher(
    sd: dict[str, Tensor],
    name: str,
    declared: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    sha256: str | None = None,
    source: str = "",
) -> BackboneTeacher:
    """A frozen :class:`BackboneTeacher` from a released DINOv3 state dict (strict key match).

    ``declared``: a catalog record's ``arch``, which must agree with the shapes of the file.
    ``meta``: ``resolution``, ``mean``, ``std`` and the ``sha256_prefix`` of the released file name.
    """
    from robkit.teachers.teacher import load_exact

    m = meta or {}
    if sha256:
        check_release_hash(sha256, m.get("sha256_prefix"), name)
    arch = arch_from_state(sd)
    for k, v in (declared or {}).items():
        if k in arch and v is not None and v != arch[k]:
            raise DINOv3LayoutError(f"{name}: the catalog declares {k}={v!r}, the file has {arch[k]!r}")
    arch = {**arch, **{k: v for k, v in (declared or {}).items() if v is not None}}
    net = build_backbone(arch)
    load_exact(net, sd, f"{name} backbone")
    return BackboneTeacher(
        net,
        name=name,
        family="dinov3",
        arch=arch,
        resolution=int(m.get("resolution") or 224),
        mean=tuple(m.get("mean") or IMAGENET_MEAN),
        std=tuple(m.get("std") or IMAGENET_STD),
        sha256=sha256,
        source=source,
    )
