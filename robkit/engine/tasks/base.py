"""What every training task shares: the online student + head, the base ``Task`` and the EMA step.

A task owns the networks of a method (the online student + head, and an EMA teacher, a
momentum key encoder or a frozen distillation teacher) and its objective.  The engine calls
``task(views, epoch)`` for the loss (``epoch``: fractional epochs elapsed),
``before_optimizer_step`` / ``after_optimizer_step`` around the optimiser step, and never
special-cases a method.  Each method's task lives in its own module of this package.

``online`` (student + head) is the only module the optimiser updates and the only one the
engine wraps in DistributedDataParallel.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from robkit.models.students import Student


def size_groups(views: list[torch.Tensor]) -> list[list[int]]:
    """Indices of consecutive views with the same resolution (one forward per group)."""
    groups: list[list[int]] = []
    for i, v in enumerate(views):
        if groups and views[groups[-1][-1]].shape[-2:] == v.shape[-2:]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class Online(nn.Module):
    """Student backbone + head applied to a crop-major list of views (DINO's MultiCropWrapper).

    Backbone features of every view are concatenated (crop-major ``[S·B, D]``) and the head runs
    once on all of them, so BatchNorm in the head sees every crop, as in the official code.
    """

    def __init__(self, student: Student, head: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.student, self.head = student, head
        self.channels_last = channels_last

    def features(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Student features of every view, crop-major ``[S·B, D]`` (one forward per resolution group)."""
        feats = []
        for g in size_groups(views):
            x = torch.cat([views[i] for i in g]) if len(g) > 1 else views[g[0]]
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(self.student(x))
        return torch.cat(feats)

    def forward(
        self,
        views: list[torch.Tensor],
        n_global: int = 0,
        masks: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        spatial: bool = False,
    ) -> Any:
        """Plain multi-crop forward, or (``masks``/``keep`` given, ViT students) the first ``n_global``
        views through ``forward_tokens`` with iBOT masks or MSN patch drop, or (``spatial``) the head's
        outputs plus its projection of the global views' spatial maps (feature distillation's patch
        term).  Everything goes through this one forward so DistributedDataParallel sees every
        parameter use.
        """
        if spatial:
            g = torch.cat(views[:n_global])
            if self.channels_last and not self.student.is_vit:
                g = g.contiguous(memory_format=torch.channels_last)
            pooled_g, map_g = self.student.forward_map(g)
            locals_ = views[n_global:]
            feats = torch.cat([pooled_g, self.features(locals_)]) if locals_ else pooled_g
            head: Any = self.head
            return head(feats), head.project_map(map_g)
        if masks is None and keep is None:
            return self.head(self.features(views))
        g = torch.cat(views[:n_global])
        locals_ = views[n_global:]
        if masks is not None:
            cls_g, patch_g = self.head(self.student.forward_tokens(g, mask=masks, mask_token=self.mask_token))
            cls_l = self.head(self.features(locals_)) if locals_ else cls_g[:0]
            return torch.cat([cls_g, cls_l]), patch_g
        feats_g = self.student.forward_tokens(g, keep=keep)[:, 0]
        feats = torch.cat([feats_g, self.features(locals_)]) if locals_ else feats_g
        return self.head(feats)

    def add_mask_token(self) -> None:
        """Add the learnable iBOT mask token ``[embed_dim]`` (truncated normal, std 0.02)."""
        self.mask_token = nn.Parameter(torch.zeros(self.student.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` for an EMA teacher or a momentum key encoder.

    Without stochastic depth (DINO builds its teacher with none, MoCo's key encoder likewise) and
    with ``requires_grad=False``, so only :func:`ema_update_` changes it.
    """
    target = copy.deepcopy(online)
    for m in target.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0  # type: ignore[assignment]  # torch types unknown attributes Tensor | Module
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def momentum_pairs(target: nn.Module, online: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(target parameter, online parameter)`` pairs of a :func:`momentum_copy` and its source."""
    return list(zip(target.parameters(), online.parameters()))


@torch.no_grad()
def ema_update_(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * source`` for every pair, in place.

    The one EMA step of DINO's teacher (DINO sec. 3.1) and MoCo's key encoder (MoCo eq. 2), as
    one fused ``lerp`` towards the source with weight ``1 - momentum`` (equal to the papers'
    ``mul_(m).add_(source, alpha=1 - m)`` up to float rounding).
    Buffers are the caller's business: DINO copies the student's, MoCo keeps the key encoder's own.
    """
    pairs = list(pairs)
    if not pairs:
        return
    targets, sources = zip(*pairs)
    torch._foreach_lerp_(list(targets), list(sources), 1.0 - momentum)


class Task(nn.Module):
    """Base class: subclasses set ``online`` and ``loss`` and implement ``forward``."""

    method: str = ""
    online: Online
    _online_ref: nn.Module | None

    def __init__(self) -> None:
        super().__init__()
        # The DDP wrapper, when distributed; kept out of the module tree (and the state_dict).
        object.__setattr__(self, "_online_ref", None)
        self._gen = torch.Generator()

    def wrap_online(self, wrapped: nn.Module) -> None:
        """Run ``online`` through ``wrapped`` (its DDP wrapper), kept out of the module tree."""
        object.__setattr__(self, "_online_ref", wrapped)

    def reseed(self, seed: int) -> None:
        """Seed the task's own randomness (masks, patch drop) for this step: exact resume."""
        self._gen.manual_seed(seed)

    def run_online(self, views: list[torch.Tensor], **kwargs: Any) -> Any:
        """The online forward of ``views`` (through the DDP wrapper, if any) with ``kwargs``."""
        return (self._online_ref or self.online)(views, **kwargs)

    @property
    def student(self) -> Student:
        """The online student backbone."""
        return self.online.student

    @property
    def head(self) -> nn.Module:
        """The online head."""
        return self.online.head

    def before_optimizer_step(self, epoch: float) -> None:
        """Hook after the backward pass, before the optimiser step (``epoch``: fractional); none here."""
        pass

    def after_optimizer_step(self, ema_momentum: float) -> None:
        """Hook after the optimiser step (EMA updates with ``ema_momentum``); none here."""
        pass

    def eval_backbone(self) -> nn.Module:
        """The network that is evaluated and exported: the online student."""
        return self.online.student
