"""Projection heads with the official implementations' parameter names.

Key names follow the released checkpoints so that a teacher's head loads with
``load_state_dict(strict=True)`` after its prefix is stripped:

* DINO / iBOT ``DINOHead``: ``mlp.{0,2,4}`` (``mlp.{0,1,3,4,6}`` with BatchNorm),
  ``last_layer.weight_g`` ``[K, 1]`` / ``last_layer.weight_v`` ``[K, bottleneck]``.
* SwAV: ``projection_head.{0,1,3}`` and ``prototypes.weight`` ``[K, 128]``.
* MSN: ``fc.{fc1,bn1,fc2,bn2,fc3}`` and a ``prototypes`` matrix ``[K, 256]``.

Every head is built by name through :func:`build_head` (recipes, teacher declarations, checkpoint
records): ``head_from_record`` rebuilds the ``{"type", "kwargs", "state_dict"}`` record a robkit
checkpoint stores.
"""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from robkit.utils.errors import RobkitError
from robkit.utils.suggest import did_you_mean


class WeightNormLinear(nn.Module):
    """Bias-free linear layer ``W[i] = g[i] * v[i] / ||v[i]||`` (Salimans & Kingma weight norm).

    Stored as ``weight_g [out, 1]`` and ``weight_v [out, in]`` like ``torch.nn.utils.weight_norm``
    wrote them in the official DINO/iBOT checkpoints.  ``norm_last_layer=True`` in DINO freezes
    ``g`` at 1, so every logit is a cosine similarity.
    """

    def __init__(self, in_features: int, out_features: int, fix_g: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_g)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``[out, in]``: each row of ``weight_v`` rescaled to norm ``weight_g``."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features] -> [..., out_features]``."""
        return F.linear(x, self.weight)


def _init_args(loc: dict) -> dict:
    """The constructor arguments (from its ``locals()``): a checkpoint rebuilds the head from them."""
    args = {k: v for k, v in loc.items() if k not in ("self", "__class__", "kwargs")}
    return {**args, **loc.get("kwargs", {})}


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _mlp(
    in_dim: int, hidden_dim: int, out_dim: int, nlayers: int, use_bn: bool, act: type[nn.Module]
) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(nlayers - 1):
        layers.append(nn.Linear(dim, hidden_dim))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(act())
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021, sec. 3.1 and its ``DINOHead``).

    ``mlp`` (``nlayers`` Linear layers, GELU, optional BatchNorm) → L2 normalisation →
    weight-normalised ``last_layer`` over ``out_dim`` prototypes, without bias.
    ``logits: [B, out_dim]`` before any temperature.  ``weight_norm=False`` gives the plain
    last Linear of the released DINO ResNet-50 head.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        weight_norm: bool = True,
        l2_norm: bool = True,
    ) -> None:
        super().__init__()
        self.init_kwargs = _init_args(locals())
        self.in_dim, self.out_dim = in_dim, out_dim
        self.l2_norm = l2_norm
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn, nn.GELU)
        self.mlp.apply(_init_linear)
        if weight_norm:
            self.last_layer: nn.Module = WeightNormLinear(bottleneck_dim, out_dim, fix_g=norm_last_layer)
        else:
            self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
            _init_linear(self.last_layer)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck embedding ``[..., in_dim] -> [..., bottleneck_dim]``, L2-normalised if ``l2_norm``."""
        x = self.mlp(x)
        return F.normalize(x, dim=-1, p=2) if self.l2_norm else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim] -> logits [B, out_dim]``."""
        return self.last_layer(self.project(x))


class iBOTHead(DINOHead):  # noqa: N801 - the method's own spelling
    """iBOT head: a DINO head whose patch tokens go through ``last_layer2`` (Zhou et al. 2022).

    ``forward(tokens [B, 1+N, D]) -> (cls_logits [B, K], patch_logits [B, N, K_p])``; on a 2-D
    input it behaves like a DINO head.  With ``shared_head=True`` ``last_layer2`` *is*
    ``last_layer`` (the released files still list both key groups, with equal values).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        patch_out_dim: int | None = None,
        shared_head: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_dim, out_dim, **kwargs)
        self.init_kwargs = _init_args(locals())
        bottleneck = cast(
            int, self.mlp[-1].out_features if isinstance(self.mlp, nn.Sequential) else self.mlp.out_features
        )
        patch_out_dim = patch_out_dim or out_dim
        if shared_head:
            if patch_out_dim != out_dim:
                raise ValueError("shared_head=True needs patch_out_dim == out_dim")
            self.last_layer2 = self.last_layer
        else:
            fix_g = (
                not self.last_layer.weight_g.requires_grad
                if isinstance(self.last_layer, WeightNormLinear)
                else True
            )
            self.last_layer2 = WeightNormLinear(bottleneck, patch_out_dim, fix_g=fix_g)
        self.shared_head = shared_head

    def forward(  # type: ignore[override]
        self, x: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``[B, D] -> [B, K]`` like a DINO head; ``[B, 1+N, D] -> ([B, K], [B, N, K_p])``."""
        if x.dim() == 2:
            return super().forward(x)
        z = self.project(x)
        return self.last_layer(z[:, 0]), self.last_layer2(z[:, 1:])


class SwAVHead(nn.Module):
    """SwAV projection + prototypes (Caron et al. 2020).

    ``projection_head``: Linear → BatchNorm → ReLU → Linear (``hidden_dim`` → ``out_dim``),
    L2-normalised, then ``prototypes`` (bias-free Linear).  ``forward`` returns
    ``(embedding [B, out_dim], scores [B, n_prototypes])``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        n_prototypes: int = 3000,
        use_bn: bool = True,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.init_kwargs = _init_args(locals())
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else [nn.Identity()]
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        self.projection_head = nn.Sequential(*layers)
        self.normalize = normalize
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """SwAV re-normalises every prototype row to unit norm before each iteration."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1, p=2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, in_dim] -> (embedding [B, out_dim], scores [B, n_prototypes])``."""
        z = self.projection_head(x)
        if self.normalize:
            z = F.normalize(z, dim=1, p=2)
        return z, self.prototypes(z)


class MLPHead(nn.Module):
    """A plain MLP head (MoCo-v2 projector, RoB-MSN student head, Table 6 "MLP head").

    ``dims`` lists the layer widths, e.g. ``[d, 2048, 128]``; ``act`` inserts an activation
    between layers (the VISSL ``mlp`` inserts none unless asked).
    """

    def __init__(self, dims: list[int], use_bn: bool = False, act: str | None = "relu") -> None:
        super().__init__()
        self.init_kwargs = {"dims": list(dims), "use_bn": use_bn, "act": act}
        acts = {"relu": nn.ReLU, "gelu": nn.GELU, None: None}
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                act_cls = acts[act]
                if act_cls is not None:
                    layers.append(act_cls())
        self.layers = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, dims[0]] -> [B, dims[-1]]``."""
        return self.layers(x)


class _MSNProjector(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, use_bn: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.bn2 = nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity()
        self.fc3 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim] -> [B, out_dim]``."""
        x = F.gelu(self.bn1(self.fc1(x)))
        x = F.gelu(self.bn2(self.fc2(x)))
        return self.fc3(x)


class MSNHead(nn.Module):
    """MSN projector and prototypes (Assran et al. 2022).

    ``fc``: Linear-BN-GELU-Linear-BN-GELU-Linear (``hidden_dim`` → ``out_dim`` 256); the
    logits are cosine similarities between the L2-normalised projection and the L2-normalised
    ``prototypes [K, out_dim]``: ``logits: [B, K]`` in [-1, 1], before the temperature.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 256,
        n_prototypes: int = 1024,
        use_bn: bool = True,
    ) -> None:
        super().__init__()
        self.init_kwargs = _init_args(locals())
        self.fc = _MSNProjector(in_dim, hidden_dim, out_dim, use_bn)
        self.prototypes = nn.Parameter(torch.empty(n_prototypes, out_dim))
        nn.init.uniform_(self.prototypes, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim] -> logits [B, K]`` (cosine similarities to the prototypes)."""
        z = F.normalize(self.fc(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).t()


class LinearProbe(nn.Module):
    """``logits [B, num_classes] = Linear(BN(features [B, in_dim]))``.

    ``bn=True`` is RoB's "batch normalization before the linear layer" head:
    ``BatchNorm1d(in_dim, affine=False)`` — no learnt scale/shift, the linear layer has them.
    """

    def __init__(self, in_dim: int, num_classes: int, bn: bool = True) -> None:
        super().__init__()
        self.init_kwargs = _init_args(locals())
        if in_dim < 1 or num_classes < 2:
            raise ValueError(
                f"LinearProbe needs in_dim >= 1 and num_classes >= 2, got {in_dim}, {num_classes}"
            )
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.bn = nn.BatchNorm1d(in_dim, affine=False) if bn else nn.Identity()
        self.linear = nn.Linear(in_dim, num_classes)
        # DINO's eval_linear.py initialises the probe this way (weights N(0, 0.01), zero bias).
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    @property
    def has_bn(self) -> bool:
        """Whether the probe normalises its input with ``BatchNorm1d``."""
        return isinstance(self.bn, nn.BatchNorm1d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``[B, in_dim]`` → logits ``[B, num_classes]``."""
        return self.linear(self.bn(features))


class FeatureProjector(nn.Module):
    """The student's projector for feature distillation from a headless teacher.

    ``forward(x [B, in_dim]) -> [B, out_dim]``: the pooled embedding through an MLP
    ``[in_dim, hidden_dim, out_dim]`` with GELU (``hidden_dim=0``: one Linear), regressing the
    teacher's CLS token (Proteus' token-level head). ``project_map(m [B, in_dim, h, w]) ->
    [B, out_dim, h, w]``: one Linear applied at every location of the spatial map, the projection of
    lightly-train's distillation v2 (``Linear(d, D)``, weights truncated-normal with std 0.02, zero bias),
    regressing the teacher's patch tokens. Both are discarded after training: the student alone is
    evaluated and exported.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, patch: bool = True) -> None:
        super().__init__()
        self.init_kwargs = _init_args(locals())
        self.in_dim, self.out_dim = in_dim, out_dim
        if hidden_dim:
            self.mlp: nn.Module = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
            )
        else:
            self.mlp = nn.Linear(in_dim, out_dim)
        self.mlp.apply(_init_linear)
        self.patch = nn.Linear(in_dim, out_dim) if patch else None
        if self.patch is not None:
            _init_linear(self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled student embeddings ``[B, in_dim]`` → predicted teacher CLS ``[B, out_dim]``."""
        return self.mlp(x)

    def project_map(self, m: torch.Tensor) -> torch.Tensor:
        """A student feature map ``[B, in_dim, h, w]`` → predicted teacher patch features ``[B, out_dim, h, w]``."""
        if self.patch is None:
            raise ValueError("this FeatureProjector was built with patch=False (no patch term)")
        return self.patch(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


HEADS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (DINOHead, iBOTHead, SwAVHead, MLPHead, MSNHead, LinearProbe, FeatureProjector)
}


class UnknownHeadError(RobkitError, ValueError):
    """A head type that is not one of :data:`HEADS`."""


def head_class(type_name: str) -> type[nn.Module]:
    """The head class called ``type_name`` (``"DINOHead"``, ...); :class:`UnknownHeadError` otherwise."""
    if type_name not in HEADS:
        raise UnknownHeadError(
            f"unknown head type {type_name!r}; expected one of {sorted(HEADS)}."
            + did_you_mean(str(type_name), HEADS)
        )
    return HEADS[type_name]


def head_keywords(type_name: str) -> set[str]:
    """The keyword arguments the head ``type_name`` accepts, its base classes' included where it
    forwards ``**kwargs`` (``iBOTHead`` takes every ``DINOHead`` keyword).
    """
    names: set[str] = set()
    for klass in head_class(type_name).__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def build_head(type_name: str, /, *, ignore_unknown: bool = False, **kwargs: Any) -> nn.Module:
    """The head ``type_name`` built with ``kwargs``, the one head builder of robkit.

    ``ignore_unknown=True`` drops keywords the head does not take (a teacher declaration's
    descriptions, ``in_dim`` for an ``MLPHead``); otherwise they raise ``TypeError`` as a direct call.
    """
    cls = head_class(type_name)
    if ignore_unknown:
        accepted = head_keywords(type_name)
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    return cls(**kwargs)


def head_from_record(record: dict[str, Any] | None) -> nn.Module | None:
    """Rebuild a head from a checkpoint's ``{"type", "kwargs", "state_dict"}`` record (``None`` if empty)."""
    if not record:
        return None
    head = build_head(record["type"], **record["kwargs"])
    head.load_state_dict(record["state_dict"])
    return head
