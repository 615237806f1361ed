"""Optimisers and parameter groups for SSL pre-training (SSLight sec. 4, Table 8; appendix A).

* CNN students: LARS (You et al. 2017, "Large Batch Training of Convolutional Networks") with
  momentum 0.9 and trust coefficient 0.001, as SSLight's (and DINO's) implementation;
* ViT students: AdamW.

Parameters are split into three groups as SSLight's ``param_utils.get_params``: regular weights,
depthwise convolutions and "bias-like" tensors.  Each group carries ``name`` and ``wd_factor`` so a
weight-decay schedule sets ``group["weight_decay"] = wd * group["wd_factor"]``, and
``lars_exclude`` which LARS reads (AdamW and SGD ignore it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robkit.utils.errors import RecipeError
from robkit.utils.suggest import did_you_mean

OPTIMIZERS = ("lars", "adamw", "sgd")
# ViT tensors that are embeddings rather than weights: never decayed, never LARS-adapted
# (timm's ``no_weight_decay`` set plus the masked-image-modelling token).
TOKEN_PARAMS = ("cls_token", "pos_embed", "dist_token", "reg_token", "mask_token", "masked_embed")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling, SSLight's/DINO's variant.

    Per tensor ``p`` with gradient ``g``:

    1. ``g <- g + weight_decay * p`` (the group's decay: 0 for depthwise and bias groups);
    2. unless the group has ``lars_exclude=True``: ``g <- g * trust_coefficient * ||p|| / ||g||``
       when both norms are positive (otherwise unchanged);
    3. heavy-ball momentum ``mu <- momentum * mu + g`` (``mu = g`` on the first step) and
       ``p <- p - lr * mu``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1, trust_coefficient > 0; got lr={lr}, "
                f"weight_decay={weight_decay}, momentum={momentum}, trust_coefficient={trust_coefficient}"
            )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One LARS update of every parameter with a gradient; returns ``closure()``'s loss, or ``None``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(
                            update_norm > 0.0, group["trust_coefficient"] * param_norm / update_norm, one
                        ),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])
        return loss


def _is_token(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in TOKEN_PARAMS


def param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude_depthwise_from_lars: bool = True,
    depthwise_wd_factor: float = 0.0,
    bias_wd_factor: float = 0.0,
) -> list[dict[str, Any]]:
    """SSLight's three parameter groups (empty groups are left out), trainable parameters only.

    1. ``"weights"``: tensors with >= 2 dims except depthwise convs -- full decay, LARS-adapted;
    2. ``"depthwise"``: 4-D conv weights with ``shape[1] == 1`` (one input channel per group, the
       SSLight test) -- decay x ``depthwise_wd_factor``, ``lars_exclude=exclude_depthwise_from_lars``
       (the paper excludes them, SSLight's code default ``LARS_EXCLUDE_DW False`` adapts them);
    3. ``"no_decay"``: 1-D tensors (biases, BatchNorm/LayerNorm affine) and ViT tokens/position
       embeddings -- decay x ``bias_wd_factor``, never LARS-adapted.
    """
    buckets: dict[str, list[nn.Parameter]] = {"weights": [], "depthwise": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or _is_token(name):
            buckets["no_decay"].append(p)
        elif p.ndim == 4 and p.shape[1] == 1:
            buckets["depthwise"].append(p)
        else:
            buckets["weights"].append(p)
    spec = {
        "weights": (1.0, False),
        "depthwise": (depthwise_wd_factor, exclude_depthwise_from_lars),
        "no_decay": (bias_wd_factor, True),
    }
    groups = []
    for name, params in buckets.items():
        if params:
            factor, exclude = spec[name]
            groups.append(
                {
                    "params": params,
                    "name": name,
                    "wd_factor": factor,
                    "weight_decay": weight_decay * factor,
                    "lars_exclude": exclude,
                }
            )
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")
    return groups


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    trust_coefficient: float = 0.001,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """``"lars"`` (CNNs), ``"adamw"`` (ViTs) or ``"sgd"`` (``nesterov`` for fine-tuning) over ``groups``
    from :func:`param_groups`.

    ``weight_decay`` is the default for groups that do not set their own; groups built by
    :func:`param_groups` already carry ``weight_decay * wd_factor``.
    """
    key = name.lower()
    if key == "lars":
        return LARS(
            groups, lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    hint = did_you_mean(key, OPTIMIZERS, n=1)
    raise RecipeError(f"unknown optimiser {name!r}; expected one of {', '.join(OPTIMIZERS)}.{hint}")
