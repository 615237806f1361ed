"""robkit checkpoints: atomic writes, code-free loading, and the student they describe.

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

import argparse
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from robkit import __version__

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not describe what was asked."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old file or the new one.

    Temp file in the same folder, flush + fsync, then ``os.replace`` (atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# Harmless classes that official checkpoints pickle (DINO/iBOT store their argparse.Namespace).
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint without executing code from it (``weights_only=True`` + an allow-list)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it contains Python objects that could run code when unpickled "
            f"({str(e).splitlines()[0]}). robkit only loads tensors, numbers, strings and containers. "
            "If you trust the file, re-save its state_dict with plain tensors."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"could not read checkpoint {path}: {e}. Is the file complete?") from e


def is_robkit_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("robkit"), dict) and "backbone" in obj


def make_checkpoint(**fields: Any) -> dict[str, Any]:
    """A checkpoint dict with the format header filled in."""
    return {"robkit": {"format": FORMAT, "version": __version__}, **fields}


def build_head(spec: dict[str, Any] | None):
    """Rebuild a head from its ``{"type", "kwargs", "state_dict"}`` record."""
    if not spec:
        return None
    from robkit.models import heads

    cls = getattr(heads, spec["type"], None)
    if cls is None:
        raise CheckpointError(f"unknown head type {spec['type']!r} in checkpoint")
    head = cls(**spec["kwargs"])
    head.load_state_dict(spec["state_dict"])
    return head


def load_student(path_or_obj: str | os.PathLike | dict[str, Any], with_head: bool = False):
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
