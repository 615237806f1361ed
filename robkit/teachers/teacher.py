"""The frozen ``Teacher`` module and the builders that turn a :class:`TeacherSpec` into one.

A teacher maps images normalised with its own ``mean``/``std`` to a :class:`TeacherOutput`:
the backbone's evaluation representation and the head's logits over its prototypes, computed
as the official code computes them:

* DINO / iBOT: ``mlp`` → L2-normalise → weight-normalised ``last_layer`` (iBOT: the patch
  tokens through ``last_layer2``).  RoB uses ``softmax(logits / 0.07)``.
* MSN: projector ``fc`` on the CLS token → cosine with the L2-normalised prototypes.
  RoB uses ``softmax(cos / 0.025)`` (MSN's τ=0.1 target sharpened by T=0.25).
* SwAV: projection → L2-normalise → ``prototypes`` (stored rows, as the official forward).
  RoB uses ``softmax(scores / 0.03)``.

``embed`` / ``head_forward`` split the forward so that a training loop can cache backbone
outputs: ``forward(x) == head_forward(embed(x))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
import torchvision
from torch import nn

from robkit.models import heads as heads_mod
from robkit.teachers.backbone import BackboneTeacher
from robkit.teachers.layouts import StateDict, TeacherSpec, backbone_dim
from robkit.teachers.resnet_wide import WideResNet
from robkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD
from robkit.utils.errors import RobkitError

# Per-family defaults for files loaded by path (catalog records override them).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "dino": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resolution": 224, "default_temperature": 0.07},
    "ibot": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resolution": 224, "default_temperature": 0.07},
    "msn": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resolution": 224, "default_temperature": 0.025},
    # SwAV normalises with std 0.228 for the red channel, in training and evaluation.
    "swav": {
        "mean": IMAGENET_MEAN,
        "std": (0.228, 0.224, 0.225),
        "resolution": 224,
        "default_temperature": 0.03,
    },
}


class TeacherLoadError(RobkitError, RuntimeError):
    """A checkpoint's tensors do not fit the architecture built for it."""


@dataclass
class TeacherOutput:
    """What a teacher gives a distiller.

    ``features``: backbone evaluation representation ``[B, D]`` (CLS token / pooled map).
    ``logits``: head output over the prototypes ``[B, K]``, before temperature or softmax.
    ``patch_logits``: iBOT's per-patch logits ``[B, N, K_p]``; ``None`` for other families.
    """

    features: torch.Tensor
    logits: torch.Tensor
    patch_logits: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# builders

_VIT_KEYS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "init_values",
)
_XCIT_KEYS = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "cls_attn_layers",
    "tokens_norm",
    "eta",
)
_STANDARD_RN50: dict[str, Any] = {
    "layers": [3, 4, 6, 3],
    "stem_width": 64,
    "stage_widths": [64, 128, 256, 512],
    "expansion": 4,
}


def build_backbone(arch: dict[str, Any]) -> nn.Module:
    """A backbone from its hyper-parameters: timm ViT/XCiT, torchvision or SwAV-wide ResNet."""
    kind = arch.get("type")
    if kind == "vit":
        from timm.models.vision_transformer import VisionTransformer

        kw = {k: arch[k] for k in _VIT_KEYS if arch.get(k) is not None}
        kw.setdefault("img_size", 224)
        return VisionTransformer(
            num_classes=0, dynamic_img_size=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw
        )
    if kind == "xcit":
        from timm.models.xcit import Xcit

        kw = {k: arch[k] for k in _XCIT_KEYS if arch.get(k) is not None}
        return Xcit(img_size=arch.get("img_size", 224), num_classes=0, **kw)
    if kind == "swin":
        from timm.models.swin_transformer import SwinTransformer

        return SwinTransformer(
            img_size=arch.get("img_size", 224),
            patch_size=arch.get("patch_size", 4),
            embed_dim=arch["embed_dim"],
            depths=tuple(arch["depths"]),
            num_heads=tuple(arch["num_heads"]),
            window_size=arch.get("window_size", 7),
            mlp_ratio=arch.get("mlp_ratio", 4.0),
            num_classes=0,
            drop_path_rate=0.0,
            # iBOT's Swin uses eps 1e-6, timm's default 1e-5; timm's hint omits callables it accepts
            norm_layer=partial(nn.LayerNorm, eps=1e-6),  # type: ignore[arg-type]
        )
    if kind == "resnet":
        cfg = {
            k: list(arch[k]) if isinstance(arch[k], (list, tuple)) else arch[k]
            for k in _STANDARD_RN50
            if k in arch
        }
        if {**_STANDARD_RN50, **cfg} == _STANDARD_RN50:
            net = torchvision.models.resnet50(weights=None)
            net.fc = nn.Identity()
            return net
        return WideResNet(**{**_STANDARD_RN50, **cfg})
    raise TeacherLoadError(f"unknown backbone type {kind!r}; expected 'vit', 'xcit' or 'resnet'")


def build_head(spec: dict[str, Any]) -> nn.Module:
    """The declared head (``{"type": "DINOHead", **kwargs}``) through :func:`robkit.models.heads.build_head`;
    unknown keys (descriptions) and undeclared (``None``) values are ignored.
    """
    kwargs = {k: v for k, v in spec.items() if k != "type" and v is not None}
    try:
        # a missing type (None) raises UnknownHeadError like any unknown name
        return heads_mod.build_head(cast(str, spec.get("type")), ignore_unknown=True, **kwargs)
    except heads_mod.UnknownHeadError as e:
        raise TeacherLoadError(str(e)) from e


def adapt_backbone_state(model: nn.Module, sd: StateDict) -> StateDict:
    """Official names → the built module's names (only XCiT differs from timm)."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.xcit import Xcit

    if isinstance(model, SwinTransformer):
        from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter

        return swin_filter(dict(sd), model)
    if isinstance(model, Xcit):
        from timm.models.xcit import checkpoint_filter_fn

        return checkpoint_filter_fn(dict(sd), model)
    return sd


def load_exact(module: nn.Module, sd: StateDict, what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists every difference with shapes."""
    expected = module.state_dict()
    # Old BatchNorm files lack num_batches_tracked; it does not affect eval-mode outputs.
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:

        def fmt(items: list[str]) -> str:
            shown = ", ".join(items[:12])
            return f"{shown} (+{len(items) - 12} more)" if len(items) > 12 else shown or "none"

        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        raise TeacherLoadError(
            f"the {what} weights do not fit the architecture built for them.\n"
            f"  missing keys ({len(missing)}): {fmt([f'{k} {tuple(expected[k].shape)}' for k in missing])}\n"
            f"  unexpected keys ({len(unexpected)}): {fmt([f'{k} {shapes[k]}' for k in unexpected])}\n"
            f"  shape mismatches ({len(mismatched)}): {fmt(mismatched)}\n"
            "Check the declared architecture / head (catalog record or load(..., arch=, head=)) "
            "against the file, or drop the declaration to infer it from the tensor shapes."
        )
    module.load_state_dict(sd, strict=False)


# --------------------------------------------------------------------------------------------
# the module


class Teacher(nn.Module):
    """A frozen self-supervised network with its projection head / prototypes.

    ``forward(x [B, 3, H, W]) -> TeacherOutput``; ``x`` normalised with ``self.mean`` /
    ``self.std`` (lists of 3 floats).  Always in eval mode: ``train()`` is a no-op, every
    parameter has ``requires_grad=False``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        name: str,
        family: str,
        arch: dict[str, Any],
        embed_dim: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        resolution: int = 224,
        default_temperature: float = 0.07,
        patch_size: int | None = None,
        sha256: str | None = None,
        source: str | None = None,
        embed_mode: str = "pooled",
        layout: str = "",
    ) -> None:
        super().__init__()
        if embed_mode not in ("pooled", "vit_tokens", "swin_tokens", "student_tokens"):
            raise ValueError(f"embed_mode {embed_mode!r}")
        self.backbone = backbone
        self.head = head
        self.name, self.family, self.arch, self.layout = name, family, dict(arch), layout
        self.embed_dim = int(embed_dim)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.resolution = int(resolution)
        self.default_temperature = float(default_temperature)
        self.patch_size = patch_size
        self.sha256, self.source = sha256, source
        self.embed_mode = embed_mode
        self.num_prototypes = _num_prototypes(head)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002 - a teacher never trains
        """Stay in eval mode whatever ``mode`` says; returns ``self``."""
        return super().train(False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """What the head consumes: ``[B, D]`` (CLS / pooled), or all tokens ``[B, 1+N, D]`` for iBOT."""
        backbone: Any = self.backbone
        if self.embed_mode == "swin_tokens":
            # iBOT's Swin: [average-pooled token, all tokens] after the final norm (no CLS token).
            x = backbone.forward_features(x).flatten(1, 2)  # [B, H*W, C]
            return torch.cat([x.mean(1, keepdim=True), x], dim=1)
        if self.embed_mode == "vit_tokens":
            return backbone.forward_features(x)  # after the final LayerNorm, as iBOT's teacher
        if self.embed_mode == "student_tokens":
            return backbone.forward_tokens(x)
        return backbone(x)

    def head_forward(self, embedding: torch.Tensor) -> TeacherOutput:
        """Head outputs from :meth:`embed`'s result (e.g. a cached one)."""
        features = embedding[:, 0] if embedding.dim() == 3 else embedding
        out = self.head(embedding)
        patch_logits = None
        if isinstance(self.head, heads_mod.SwAVHead):
            out = out[1]  # (L2-normalised projection, prototype scores)
        elif isinstance(out, tuple):  # iBOT on all tokens
            out, patch_logits = out
        return TeacherOutput(features=features, logits=out, patch_logits=patch_logits)

    def forward(self, x: torch.Tensor, patch_logits: bool = True) -> TeacherOutput:
        """``[B, 3, H, W] -> TeacherOutput`` (features, logits, iBOT patch logits).

        ``patch_logits=False`` runs an iBOT head on the CLS token only (``patch_logits`` is then
        ``None``): the head is per-token, so the CLS logits are the same, and a student that
        has no masked-patch term skips ``[B, N, K_p]`` of head work.
        """
        emb = self.embed(x)
        if not patch_logits and emb.dim() == 3:
            return self.head_forward(emb[:, 0])
        return self.head_forward(emb)

    def extra_repr(self) -> str:
        """Name, family, sizes and resolution for ``repr``."""
        return (
            f"name={self.name!r}, family={self.family!r}, embed_dim={self.embed_dim}, "
            f"num_prototypes={self.num_prototypes}, resolution={self.resolution}"
        )


def _num_prototypes(head: nn.Module) -> int:
    if isinstance(head, heads_mod.MSNHead):
        return int(head.prototypes.shape[0])
    if isinstance(head, heads_mod.SwAVHead):
        return int(head.prototypes.out_features)
    for attr in ("out_dim", "out_features"):
        if hasattr(head, attr):
            return int(getattr(head, attr))
    last = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return int(last[-1].out_features) if last else -1


def teacher_from_spec(
    spec: TeacherSpec,
    *,
    name: str,
    arch: dict[str, Any] | None = None,
    head: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    sha256: str | None = None,
    source: str | None = None,
) -> Teacher:
    """Build and load a :class:`Teacher`; ``arch``/``head`` (declared) override the inferred values."""
    arch_cfg = {**spec.backbone, **{k: v for k, v in (arch or {}).items() if v is not None}}
    if arch_cfg.get("type") != spec.backbone["type"]:
        raise TeacherLoadError(
            f"{name}: declared backbone type {arch_cfg.get('type')!r} but the file holds a {spec.backbone['type']!r}"
        )
    head_cfg = {**spec.head, **{k: v for k, v in (head or {}).items() if v is not None}}
    head_cfg["in_dim"] = backbone_dim(arch_cfg)
    if head_cfg.get("type") != spec.head["type"]:
        raise TeacherLoadError(
            f"{name}: declared head {head_cfg.get('type')!r} but the file holds a {spec.head['type']!r}"
        )
    backbone = build_backbone(arch_cfg)
    load_exact(backbone, adapt_backbone_state(backbone, spec.backbone_state), f"{name} backbone")
    head_mod = build_head(head_cfg)
    load_exact(head_mod, spec.head_state, f"{name} head")
    meta = {**FAMILY_DEFAULTS[spec.family], **(meta or {})}
    return Teacher(
        backbone,
        head_mod,
        name=name,
        family=spec.family,
        arch=arch_cfg,
        embed_dim=backbone_dim(arch_cfg),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        resolution=int(meta["resolution"]),
        default_temperature=float(meta["default_temperature"]),
        patch_size=arch_cfg.get("patch_size"),
        sha256=sha256,
        source=source,
        embed_mode=_EMBED_MODES.get((spec.family, arch_cfg["type"]), "pooled"),
        layout=spec.layout,
    )


# iBOT's head consumes every token (CLS → last_layer, patches → last_layer2).
_EMBED_MODES = {("ibot", "vit"): "vit_tokens", ("ibot", "swin"): "swin_tokens"}

# Teacher temperature used when a robkit checkpoint serves as a teacher, by training method.
_METHOD_TEMPERATURE = {"dino": 0.07, "ibot": 0.07, "msn": 0.025, "swav": 0.03}


PROTOTYPE_HEADS = (heads_mod.DINOHead, heads_mod.SwAVHead, heads_mod.MSNHead)  # iBOTHead is a DINOHead


class StudentFeatures(nn.Module):
    """A robkit student as a headless backbone: ``forward_features`` gives its pooled embedding (the
    one ``robkit eval`` scores) as ``x_norm_clstoken`` and the map it pools as patch tokens ``[B, h*w, D]``.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.embed_dim = int(cast(Any, student).embed_dim)
        self.patch_size = getattr(student, "patch_size", None) or 32

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x_norm_clstoken`` ``[B, D]`` and ``x_norm_patchtokens`` ``[B, h*w, D]``."""
        emb, fmap = cast(Any, self.student).forward_map(x)
        return {"x_norm_clstoken": emb, "x_norm_patchtokens": fmap.flatten(2).transpose(1, 2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled embedding."""
        return self.forward_features(x)["x_norm_clstoken"]


def teacher_from_robkit(
    ckpt: dict[str, Any], *, name: str, sha256: str | None = None, source: str | None = None
) -> Teacher | BackboneTeacher:
    """A robkit checkpoint (``robkit pretrain`` / ``robkit distill``) as a teacher.

    With a prototype head (DINO, iBOT, MSN, SwAV) it is a :class:`Teacher` that RoB distils. Without
    one (MoCo-v2's projector, or no head record) it is a headless :class:`BackboneTeacher` of the
    student's backbone, which ``--recipe auto`` distils by features (``rob-features``).
    """
    from robkit.models.checkpoint import load_student

    student, head, meta = load_student(ckpt, with_head=True)
    norm = meta.get("normalization") or {}
    method = str(meta.get("method", ""))
    arch = {"type": "robkit", "student": ckpt["student"]["arch"], **ckpt["student"].get("kwargs", {})}
    if not isinstance(head, PROTOTYPE_HEADS):
        return BackboneTeacher(
            StudentFeatures(student),
            name=name,
            family="robkit",
            arch={**arch, "head": type(head).__name__ if head is not None else None},
            resolution=int(meta.get("resolution") or 224),
            mean=tuple(norm.get("mean", IMAGENET_MEAN)),
            std=tuple(norm.get("std", IMAGENET_STD)),
            sha256=sha256,
            source=source or "",
        )
    temp = next((t for k, t in _METHOD_TEMPERATURE.items() if k in method.lower()), 0.07)
    is_vit = bool(getattr(student, "is_vit", False))
    tokens = is_vit and isinstance(head, heads_mod.iBOTHead)
    return Teacher(
        student,
        head,
        name=name,
        family="robkit",
        arch=arch,
        embed_dim=int(student.embed_dim),
        mean=tuple(norm.get("mean", IMAGENET_MEAN)),
        std=tuple(norm.get("std", IMAGENET_STD)),
        resolution=int(meta.get("resolution") or 224),
        default_temperature=temp,
        patch_size=student.patch_size if is_vit else None,
        sha256=sha256,
        source=source,
        embed_mode="student_tokens" if tokens else "pooled",
        layout=f"robkit checkpoint ({meta.get('kind', '?')}, method {method or '?'})",
    )
