"""RoB (Duval et al. 2023): a frozen self-supervised teacher replaces one branch of the method.

The teacher's input (the student's global views re-normalised for it), the fresh student head of
each teacher family and the task itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from robkit.engine.hardware import TEACHER_PRECISIONS, teacher_autocast
from robkit.engine.tasks.base import Online, Task
from robkit.models.heads import build_head
from robkit.models.students import Student
from robkit.objectives import masking
from robkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from robkit.teachers.teacher import TeacherOutput


def teacher_input(
    views: list[torch.Tensor],
    student_mean: Sequence[float],
    student_std: Sequence[float],
    teacher: Any,
    resolution: int | None = None,
) -> torch.Tensor:
    """The student's global views re-normalised (and resized) for the teacher: identical views."""
    x = torch.cat(views)
    # Compared as Python floats, not tensors: no host-device sync, and the statistics are made
    # only where they are used, on the views' device and dtype.
    same = [float(v) for v in (*student_mean, *student_std)] == [
        float(v) for v in (*teacher.mean, *teacher.std)
    ]
    if not same:
        sm, ss, tm, ts = (
            torch.as_tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            for v in (student_mean, student_std, teacher.mean, teacher.std)
        )
        x = (x * ss + sm - tm) / ts
    res = int(resolution or getattr(teacher, "resolution", 0) or x.shape[-1])
    if x.shape[-1] != res:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
    return x


def rob_student_head(
    family: str, in_dim: int, num_prototypes: int, head_type: str = "teacher", **overrides: Any
) -> nn.Module:
    """A fresh student head for RoB (rob-official.md "Student heads"): the teacher's kind, same K.

    ``head_type="mlp"`` gives Table 6's MLP head ``[d, 2048, K]``.  Built by
    :func:`robkit.models.heads.build_head`.
    """
    hidden = overrides.get("hidden_dim", 2048)
    if head_type == "mlp":
        return build_head("MLPHead", dims=[in_dim, hidden, num_prototypes], act=overrides.get("act"))
    if family in ("dino", "ibot"):
        dino_keys = ("hidden_dim", "bottleneck_dim", "nlayers", "norm_last_layer", "use_bn")
        kw = {
            "hidden_dim": 2048,
            "bottleneck_dim": 256,
            "nlayers": 3,
            "norm_last_layer": False,
            **{k: v for k, v in overrides.items() if k in dino_keys},
        }
        if family == "dino":
            return build_head("DINOHead", in_dim=in_dim, out_dim=num_prototypes, **kw)
        return build_head("iBOTHead", in_dim=in_dim, out_dim=num_prototypes, shared_head=True, **kw)
    if family == "msn":
        return build_head(
            "MLPHead",
            dims=[in_dim, hidden, num_prototypes],
            act=overrides.get("act", "gelu"),
            use_bn=overrides.get("use_bn", False),
        )
    if family == "swav":
        return build_head(
            "SwAVHead",
            in_dim=in_dim,
            hidden_dim=hidden,
            out_dim=overrides.get("out_dim", 128),
            n_prototypes=num_prototypes,
            use_bn=True,
        )
    raise ValueError(f"no RoB student head for teacher family {family!r}; expected dino, ibot, msn or swav")


class RoBTask(Task):
    """RoB (Duval et al. 2023): a frozen SSL teacher replaces one branch; identical-view targets.

    The teacher sees only the global views, re-normalised with its own statistics, in
    inference mode under ``teacher_precision`` (:func:`robkit.engine.hardware.teacher_autocast`:
    ``auto`` is bf16 on CUDA, else the engine's autocast); it is never wrapped by DDP and never
    saved.  It computes iBOT patch logits only when the student uses them (a ViT student with
    masks), and ``compile_teacher`` runs it through ``torch.compile`` (``compile_backend``).
    ViT students get iBOT block masks on global views (RoB-iBOT) or MSN patch drop (RoB-MSN)
    when the recipe asks for them.
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
        student_mean: Sequence[float] = IMAGENET_MEAN,
        student_std: Sequence[float] = IMAGENET_STD,
        mask_ratio_range: tuple[float, float] = (0.1, 0.5),
        mask_p_zero: float = 0.5,
        patch_drop: float = 0.0,
        teacher_resolution: int | None = None,
        channels_last: bool = False,
        teacher_precision: str = "auto",
        compile_teacher: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        if teacher_precision not in TEACHER_PRECISIONS:
            raise ValueError(
                f"teacher_precision must be one of {TEACHER_PRECISIONS}, got {teacher_precision!r}"
            )
        self.teacher_precision = teacher_precision
        self.compile_teacher, self.compile_backend = compile_teacher, compile_backend
        self._compiled_teacher: Callable[..., TeacherOutput] | None = None
        self.online = Online(student, head, channels_last)
        self.family = family
        self.teacher_resolution = teacher_resolution
        self.method = f"rob-{family}"
        self.loss = loss
        self.n_global = n_global
        self.student_mean, self.student_std = tuple(student_mean), tuple(student_std)
        # A list hides the frozen teacher from state_dict() and parameters() (it is rebuilt from
        # its catalog entry, never saved or optimised); _apply still moves it with the task.
        self.teacher = [teacher]
        self.use_masks = family == "ibot" and student.is_vit
        self.mask_ratio_range, self.mask_p_zero = mask_ratio_range, mask_p_zero
        self.patch_drop = patch_drop if student.is_vit else 0.0
        if self.use_masks:
            self.online.add_mask_token()

    @property
    def frozen_teacher(self) -> nn.Module:
        """The frozen teacher (not a registered submodule)."""
        return self.teacher[0]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RoBTask:
        # .to() / .cuda() / .half() reach modules through _apply: the teacher follows the task's
        # device (and dtype, where asked) although it is not a registered submodule.
        super()._apply(fn, recurse)
        if recurse:
            self.frozen_teacher._apply(fn)
        return self

    def teacher_targets(self, views: list[torch.Tensor]) -> Any:
        """The frozen teacher's outputs on the global views, re-normalised for it (inference mode)."""
        x = teacher_input(
            views[: self.n_global],
            self.student_mean,
            self.student_std,
            self.frozen_teacher,
            self.teacher_resolution,
        )
        with torch.inference_mode(), teacher_autocast(self.teacher_precision, x.device):
            out = self._teacher_fn()(x, **self.teacher_options())
        return out

    @property
    def needs_patch_targets(self) -> bool:
        """Whether the loss uses the teacher's per-patch outputs (iBOT patch logits for a masked ViT)."""
        return self.use_masks

    def teacher_options(self) -> dict[str, bool]:
        """Keywords of the teacher's forward: iBOT patch logits only when the loss uses them."""
        return {"patch_logits": self.use_masks}

    def _teacher_fn(self) -> Callable[..., TeacherOutput]:
        """The teacher's forward, compiled on first use when asked (after ``.to()`` placed it)."""
        if not self.compile_teacher:
            return self.frozen_teacher
        if self._compiled_teacher is None:
            self._compiled_teacher = cast(
                "Callable[..., TeacherOutput]",
                torch.compile(self.frozen_teacher, backend=self.compile_backend, dynamic=False),
            )
        return self._compiled_teacher

    def forward(
        self, views: list[torch.Tensor], epoch: int, teacher_out: TeacherOutput | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Crop-major views ``[B, 3, H, W]`` -> ``(loss, parts)``; ``teacher_out``: cached targets, if any."""
        t = teacher_out if teacher_out is not None else self.teacher_targets(views)
        t_logits = t.logits.clone().float()
        if self.use_masks or self.patch_drop > 0:
            return self._forward_vit(views, t, t_logits)
        s = self.run_online(views)
        if self.family == "swav":
            s = s[1]  # the student's own prototype scores
        return self.loss(s, t_logits)

    def _forward_vit(
        self, views: list[torch.Tensor], t: TeacherOutput, t_logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        student = self.online.student
        g0 = views[0]
        p = student.patch_size
        assert p is not None  # masks and patch drop are for ViT students only
        grid = (-(-g0.shape[-2] // p), -(-g0.shape[-1] // p))  # ceil: the ViT pads to whole patches
        n = g0.shape[0] * self.n_global
        # Masks and kept indices are drawn on the host from the task's CPU generator (the same
        # draws on every device, so a resumed run repeats them) and then moved to the views' device.
        if self.use_masks:
            masks = masking.block_masks(
                n, grid, ratio_range=self.mask_ratio_range, p_zero=self.mask_p_zero, generator=self._gen
            ).to(g0.device, non_blocking=True)
            s_cls, patch_g = self.run_online(views, n_global=self.n_global, masks=masks)
            if t.patch_logits is None:
                return self.loss(s_cls, t_logits)
            t_patch = _match_patch_grid(t.patch_logits.float(), grid)
            return self.loss(s_cls, t_logits, patch_g, t_patch, masks.flatten(1))
        keep = masking.patch_keep_index(grid[0] * grid[1], self.patch_drop, generator=self._gen).to(
            g0.device, non_blocking=True
        )
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
