"""Training tasks: what one step computes for each method, on top of a shared engine.

A task owns the networks of a method (the online student + head, and an EMA teacher, a
momentum key encoder or a frozen distillation teacher) and its objective.  The engine calls
``task(views, epoch)`` for the loss (``epoch``: fractional epochs elapsed), ``before_optimizer_step`` / ``after_optimizer_step``
around the optimiser step, and never special-cases a method.

``online`` (student + head) is the only module the optimiser updates and the only one the
engine wraps in DistributedDataParallel.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robkit.models.heads import DINOHead, MLPHead, SwAVHead, iBOTHead
from robkit.models.students import Student

log = logging.getLogger(__name__)


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
    ):
        """Plain multi-crop forward, or (``masks``/``keep`` given, ViT students) the first ``n_global``
        views through ``forward_tokens`` with iBOT masks or MSN patch drop.  Everything goes through
        this one forward so DistributedDataParallel sees every parameter use."""
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
        self.mask_token = nn.Parameter(torch.zeros(self.student.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)


def _disable_drop_path(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0


class Task(nn.Module):
    """Base class: subclasses set ``online`` and ``loss`` and implement ``forward``."""

    method: str = ""
    online: nn.Module

    def __init__(self) -> None:
        super().__init__()
        # The DDP wrapper, when distributed; kept out of the module tree (and the state_dict).
        object.__setattr__(self, "_online_ref", None)
        self._gen = torch.Generator()

    def wrap_online(self, wrapped: nn.Module) -> None:
        object.__setattr__(self, "_online_ref", wrapped)

    def reseed(self, seed: int) -> None:
        """Seed the task's own randomness (masks, patch drop) for this step: exact resume."""
        self._gen.manual_seed(seed)

    def run_online(self, views: list[torch.Tensor], **kwargs):
        return (self._online_ref or self.online)(views, **kwargs)

    @property
    def student(self) -> Student:
        return self.online.student

    @property
    def head(self) -> nn.Module:
        return self.online.head

    def before_optimizer_step(self, epoch: float) -> None:
        pass

    def after_optimizer_step(self, ema_momentum: float) -> None:
        pass

    def eval_backbone(self) -> nn.Module:
        return self.online.student


class DINOTask(Task):
    """DINO self-distillation (Caron et al. 2021) with an EMA teacher; SSLight re-balancing via the loss."""

    method = "dino"

    def __init__(
        self,
        student: Student,
        head: DINOHead,
        loss: nn.Module,
        n_global: int = 2,
        freeze_last_layer_epochs: float = 1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.online = Online(student, head, channels_last)
        self.teacher = copy.deepcopy(self.online)
        _disable_drop_path(self.teacher)  # DINO builds its teacher without stochastic depth
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.loss = loss
        self.n_global = n_global
        self.freeze_last_layer_epochs = freeze_last_layer_epochs

    def forward(self, views: list[torch.Tensor], epoch: float):
        with torch.no_grad():
            t = self.teacher(views[: self.n_global])
        s = self.run_online(views)
        return self.loss(s, t, epoch)

    def before_optimizer_step(self, epoch: float) -> None:
        # DINO cancels the last layer's gradients during the first epoch(s): it stabilises training.
        if epoch < self.freeze_last_layer_epochs:
            for p in self.online.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, ema_momentum: float) -> None:
        for pt, ps in zip(self.teacher.parameters(), self.online.parameters()):
            pt.mul_(ema_momentum).add_(ps.detach(), alpha=1 - ema_momentum)
        for bt, bs in zip(self.teacher.buffers(), self.online.buffers()):
            bt.copy_(bs)


class SwAVTask(Task):
    """SwAV (Caron et al. 2020): swapped prediction of Sinkhorn codes; prototypes kept on the sphere."""

    method = "swav"

    def __init__(
        self,
        student: Student,
        head: SwAVHead,
        loss: nn.Module,
        freeze_prototypes_epochs: float = 1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.online = Online(student, head, channels_last)
        self.loss = loss
        self.freeze_prototypes_epochs = freeze_prototypes_epochs

    def forward(self, views: list[torch.Tensor], epoch: float):
        self.online.head.normalize_prototypes()
        emb, scores = self.run_online(views)
        return self.loss(emb, scores, self.online.head.prototypes.weight, epoch)

    def before_optimizer_step(self, epoch: float) -> None:
        if epoch < self.freeze_prototypes_epochs:
            self.online.head.prototypes.weight.grad = None


class MoCoTask(Task):
    """MoCo-v2* (SSLight sec. 3.2): key = global view 0 through the momentum encoder; queries = the rest.

    On several processes the key images are batch-shuffled across processes before the key
    encoder and the keys shuffled back afterwards (MoCo's "shuffle BN", as the official MoCo and
    SSLight code), so the key encoder's BatchNorm statistics mix images of every process.  The
    permutation comes from the task's generator, which the trainer reseeds every step; rank 0's
    draw is broadcast (as the official code does), so it depends only on the run seed and the step
    and a resumed run draws the same one.  On one process nothing is shuffled and the generator is
    not used: the official code permutes there too, but a permutation within the one batch leaves
    BatchNorm's statistics unchanged (up to rounding), so the keys are those of the unshuffled batch.
    """

    method = "mocov2"

    def __init__(
        self,
        student: Student,
        head: MLPHead,
        loss: nn.Module,
        key_momentum: float = 0.999,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.online = Online(student, head, channels_last)
        self.key_encoder = copy.deepcopy(self.online)
        _disable_drop_path(self.key_encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.loss = loss
        self.key_momentum = key_momentum

    def forward(self, views: list[torch.Tensor], epoch: float):
        with torch.no_grad():
            self._momentum_update()  # MoCo updates the key encoder inside the forward, before the keys
            k = self._keys(views[0])
        q = self.run_online(views[1:])
        return self.loss(q, k)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key encoder outputs for this process's images ``x``, computed on a cross-process shuffle."""
        from robkit.engine import distributed as dist_utils

        shuffled, perm = dist_utils.batch_shuffle(x, self._gen)
        return dist_utils.batch_unshuffle(self.key_encoder([shuffled]), perm)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.key_momentum
        for pk, pq in zip(self.key_encoder.parameters(), self.online.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)


# ---------------------------------------------------------------------------------------- RoB


def teacher_input(
    views: list[torch.Tensor], student_mean, student_std, teacher, resolution: int | None = None
) -> torch.Tensor:
    """The student's global views re-normalised (and resized) for the teacher: identical views."""
    x = torch.cat(views)
    sm = torch.as_tensor(student_mean, dtype=x.dtype).view(1, 3, 1, 1)
    ss = torch.as_tensor(student_std, dtype=x.dtype).view(1, 3, 1, 1)
    tm = torch.as_tensor(teacher.mean, dtype=x.dtype).view(1, 3, 1, 1)
    ts = torch.as_tensor(teacher.std, dtype=x.dtype).view(1, 3, 1, 1)
    if not (torch.equal(sm, tm) and torch.equal(ss, ts)):
        x = (x * ss + sm - tm) / ts
    res = int(resolution or getattr(teacher, "resolution", 0) or x.shape[-1])
    if x.shape[-1] != res:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
    return x


def rob_student_head(
    family: str, in_dim: int, num_prototypes: int, head_type: str = "teacher", **overrides: Any
) -> nn.Module:
    """A fresh student head for RoB (rob-official.md "Student heads"): the teacher's kind, same K.

    ``head_type="mlp"`` gives Table 6's MLP head ``[d, 2048, K]``.
    """
    if head_type == "mlp":
        return MLPHead([in_dim, overrides.get("hidden_dim", 2048), num_prototypes], act=overrides.get("act"))
    dino_keys = ("hidden_dim", "bottleneck_dim", "nlayers", "norm_last_layer", "use_bn")
    if family in ("dino", "ibot"):
        kw = {
            "hidden_dim": 2048,
            "bottleneck_dim": 256,
            "nlayers": 3,
            "norm_last_layer": False,
            **{k: v for k, v in overrides.items() if k in dino_keys},
        }
        if family == "dino":
            return DINOHead(in_dim, num_prototypes, **kw)
        return iBOTHead(in_dim, num_prototypes, shared_head=True, **kw)
    if family == "msn":
        return MLPHead(
            [in_dim, overrides.get("hidden_dim", 2048), num_prototypes],
            act=overrides.get("act", "gelu"),
            use_bn=overrides.get("use_bn", False),
        )
    if family == "swav":
        return SwAVHead(
            in_dim,
            overrides.get("hidden_dim", 2048),
            overrides.get("out_dim", 128),
            num_prototypes,
            use_bn=True,
        )
    raise ValueError(f"no RoB student head for teacher family {family!r}; expected dino, ibot, msn or swav")


class RoBTask(Task):
    """RoB (Duval et al. 2023): a frozen SSL teacher replaces one branch; identical-view targets.

    The teacher sees only the global views, re-normalised with its own statistics, in
    inference mode (bf16 where the engine's autocast is on); it is never wrapped by DDP and
    never saved.  ViT students get iBOT block masks on global views (RoB-iBOT) or MSN patch
    drop (RoB-MSN) when the recipe asks for them.
    """

    method = "rob"

    def __init__(
        self,
        student: Student,
        head: nn.Module,
        loss: nn.Module,
        teacher: nn.Module,
        family: str,
        n_global: int = 2,
        student_mean=(0.485, 0.456, 0.406),
        student_std=(0.229, 0.224, 0.225),
        mask_ratio_range: tuple[float, float] = (0.1, 0.5),
        mask_p_zero: float = 0.5,
        patch_drop: float = 0.0,
        teacher_resolution: int | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.online = Online(student, head, channels_last)
        self.family = family
        self.teacher_resolution = teacher_resolution
        self.method = f"rob-{family}"
        self.loss = loss
        self.n_global = n_global
        self.student_mean, self.student_std = tuple(student_mean), tuple(student_std)
        self.teacher = [teacher]  # a list hides it from state_dict(), parameters() and .to()
        self.use_masks = family == "ibot" and student.is_vit
        self.mask_ratio_range, self.mask_p_zero = mask_ratio_range, mask_p_zero
        self.patch_drop = patch_drop if student.is_vit else 0.0
        if self.use_masks:
            self.online.add_mask_token()

    @property
    def frozen_teacher(self) -> nn.Module:
        return self.teacher[0]

    def teacher_targets(self, views: list[torch.Tensor]):
        x = teacher_input(
            views[: self.n_global],
            self.student_mean,
            self.student_std,
            self.frozen_teacher,
            self.teacher_resolution,
        )
        with torch.inference_mode():
            out = self.frozen_teacher(x)
        return out

    def forward(self, views: list[torch.Tensor], epoch: int, teacher_out=None):
        t = teacher_out if teacher_out is not None else self.teacher_targets(views)
        t_logits = t.logits.clone().float()
        if self.use_masks or self.patch_drop > 0:
            return self._forward_vit(views, t, t_logits)
        s = self.run_online(views)
        if self.family == "swav":
            s = s[1]  # the student's own prototype scores
        return self.loss(s, t_logits)

    def _forward_vit(self, views, t, t_logits):
        from robkit.objectives import masking

        student = self.online.student
        g0 = views[0]
        p = student.patch_size
        grid = (-(-g0.shape[-2] // p), -(-g0.shape[-1] // p))  # ceil: the ViT pads to whole patches
        n = g0.shape[0] * self.n_global
        if self.use_masks:
            masks = masking.block_masks(
                n, grid, ratio_range=self.mask_ratio_range, p_zero=self.mask_p_zero, generator=self._gen
            )
            s_cls, patch_g = self.run_online(views, n_global=self.n_global, masks=masks)
            if t.patch_logits is None:
                return self.loss(s_cls, t_logits)
            t_patch = _match_patch_grid(t.patch_logits.float(), grid)
            return self.loss(s_cls, t_logits, patch_g, t_patch, masks.flatten(1))
        keep = masking.patch_keep_index(grid[0] * grid[1], self.patch_drop, generator=self._gen)
        return self.loss(self.run_online(views, n_global=self.n_global, keep=keep), t_logits)


def _match_patch_grid(patch_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample teacher patch logits ``[B, N, K]`` to the student's patch grid (differing patch sizes)."""
    b, n, k = patch_logits.shape
    side = int(round(n**0.5))
    if (side, side) == grid:
        return patch_logits
    x = patch_logits.transpose(1, 2).reshape(b, k, side, side)
    x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
    return x.reshape(b, k, -1).transpose(1, 2)
