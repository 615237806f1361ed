"""robkit checkpoints: the student they describe (written atomically and read without running code,
by :mod:`robkit.utils.files`).

A robkit checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(weights_only=True)``:

``robkit``      {"format": 1, "version": str}
``kind``        "pretrain" | "distill"
``method``      "dino" | "swav" | "mocov2" | "rob-dino" | ...
``student``     {"arch": str, "kwargs": dict}           — rebuilt with ``build_student``
``backbone``    state_dict of the evaluation network's backbone
``head``        {"type": str, "kwargs": dict, "state_dict": dict} | None
``teacher``     {"name": str, "sha256": str} | None      — never the teacher's weights
``normalization`` {"mean": [3], "std": [3]}; ``resolution`` int (global crop size)
``config``      the resolved run configuration; ``metrics`` dict
``train_state`` only in resume files: model, optimizer, objective, scheduler and RNG states
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, overload

from robkit import __version__
from robkit.utils.files import CheckpointError, atomic_save, safe_load

if TYPE_CHECKING:
    from torch import nn

    from robkit.models.students import Student

__all__ = [
    "CheckpointError",
    "atomic_save",
    "safe_load",
    "is_robkit_checkpoint",
    "make_checkpoint",
    "build_head",
    "load_student",
    "checkpoint_classifier",
]

FORMAT = 1


def is_robkit_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` is a robkit checkpoint dict (a ``robkit`` header and a ``backbone``)."""
    return isinstance(obj, dict) and isinstance(obj.get("robkit"), dict) and "backbone" in obj


def make_checkpoint(**fields: Any) -> dict[str, Any]:
    """A checkpoint dict with the format header filled in."""
    return {"robkit": {"format": FORMAT, "version": __version__}, **fields}


def build_head(spec: dict[str, Any] | None) -> nn.Module | None:
    """Rebuild a head from its ``{"type", "kwargs", "state_dict"}`` record
    (:func:`robkit.models.heads.head_from_record`); ``None`` for an empty record.
    """
    from robkit.models import heads

    try:
        return heads.head_from_record(spec)
    except heads.UnknownHeadError as e:
        raise CheckpointError(f"{e} (the checkpoint's head record)") from e


@overload
def load_student(
    path_or_obj: str | os.PathLike | dict[str, Any], with_head: Literal[False] = False
) -> tuple[Student, dict[str, Any]]: ...
@overload
def load_student(
    path_or_obj: str | os.PathLike | dict[str, Any], with_head: Literal[True]
) -> tuple[Student, nn.Module | None, dict[str, Any]]: ...
@overload
def load_student(
    path_or_obj: str | os.PathLike | dict[str, Any], with_head: bool = False
) -> tuple[Student, dict[str, Any]] | tuple[Student, nn.Module | None, dict[str, Any]]: ...
def load_student(
    path_or_obj: str | os.PathLike | dict[str, Any], with_head: bool = False
) -> tuple[Student, dict[str, Any]] | tuple[Student, nn.Module | None, dict[str, Any]]:
    """Rebuild the student of a robkit checkpoint, in eval mode.

    Returns ``(student, meta)`` or ``(student, head, meta)`` with ``with_head=True``; ``meta``
    is the checkpoint without its tensors (method, teacher, normalisation, config, metrics).
    """
    from robkit.models.students import build_student

    ckpt = path_or_obj if isinstance(path_or_obj, dict) else safe_load(path_or_obj)
    if not is_robkit_checkpoint(ckpt):
        raise CheckpointError(
            f"{path_or_obj if not isinstance(path_or_obj, dict) else 'object'} is not a robkit checkpoint "
            "(no 'robkit' header); make one with `robkit pretrain` or `robkit distill`."
        )
    student = build_student(ckpt["student"]["arch"], **ckpt["student"].get("kwargs", {}))
    missing, unexpected = student.backbone.load_state_dict(ckpt["backbone"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match {ckpt['student']['arch']}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    student.eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("backbone", "head", "train_state")}
    if with_head:
        head = build_head(ckpt.get("head"))
        if head is not None:
            head.eval()
        return student, head, meta
    return student, meta


def checkpoint_classifier(
    path_or_obj: str | os.PathLike | dict[str, Any],
) -> tuple[nn.Module, list[str]] | None:
    """The classifier head and label names of a ``robkit finetune`` checkpoint (``None`` for others).

    A fine-tuned checkpoint stores its classifier as a ``LinearProbe`` head and the class names in
    ``data.classes``; export puts both into the file.
    """
    ckpt = path_or_obj if isinstance(path_or_obj, dict) else safe_load(path_or_obj)
    if not is_robkit_checkpoint(ckpt) or ckpt.get("method") != "finetune" or not ckpt.get("head"):
        return None
    head = build_head(ckpt["head"])
    classes = [str(c) for c in (ckpt.get("data") or {}).get("classes") or []]
    if (
        head is None
        or type(head).__name__ != "LinearProbe"
        or len(classes) != getattr(head, "num_classes", -1)
    ):
        return None
    return head.eval(), classes
