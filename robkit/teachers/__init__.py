"""The teacher zoo: official DINO, iBOT, MSN and SwAV checkpoints with their heads, any timm or
torchvision backbone from a local file, and the headless DINOv2 and DINOv3 backbones.

``load(name_or_path)`` returns a frozen :class:`Teacher` (or, for a backbone without a head, a
:class:`~robkit.teachers.backbone.BackboneTeacher`); names come from the catalog in the top-level
``teachers/`` folder (``robkit teachers list``), paths may be any checkpoint in one of the official
layouts or a robkit checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robkit.teachers.backbone import BackboneTeacher
from robkit.teachers.teacher import Teacher, TeacherLoadError, TeacherOutput
from robkit.utils.errors import RobkitError

if TYPE_CHECKING:
    from robkit.catalog import Record, Registry

__all__ = [
    "BackboneTeacher",
    "Teacher",
    "TeacherOutput",
    "TeacherLoadError",
    "load",
    "catalog",
    "resolve_file",
]


class TeacherFileMissing(RobkitError, FileNotFoundError):
    """``--teacher`` names a path that is not a file."""


def catalog() -> Registry:
    """The teacher registry (``robkit.catalog.registry('teachers')``)."""
    from robkit.catalog import registry

    return registry("teachers")


def _looks_like_path(s: str) -> bool:
    return (
        os.sep in s
        or "/" in s
        or s.endswith((".pth", ".pt", ".tar", ".ckpt", ".bin", ".safetensors"))
        or s.startswith("~")
    )


def _existing_file(file: str | os.PathLike, what: str) -> Path:
    p = Path(file).expanduser()
    if p.is_dir():
        raise TeacherFileMissing(f"--teacher-file {p} is a folder; give the weights file inside it ({what})")
    if not p.is_file():
        raise TeacherFileMissing(f"--teacher-file {p} does not exist ({what}); check the path")
    return p


def resolve_file(
    name_or_path: str | os.PathLike,
    download: bool = True,
    progress: bool = True,
    file: str | os.PathLike | None = None,
) -> tuple[Path, Record | None]:
    """``(path, record | None)`` for a catalog name or a file path (downloading a named teacher if needed).

    ``file``: the weights of a catalog teacher (e.g. a gated DINOv3 file) or of a ``timm:``/``torchvision:``
    architecture, used instead of the cache; a catalog teacher's published hash is still checked.
    """
    from robkit.teachers import download as dl
    from robkit.teachers.libraries import parse_spec

    s = os.fspath(name_or_path)
    library = parse_spec(s)
    if library is not None:
        if file is None:
            raise TeacherFileMissing(
                f"teacher {s!r} loads a {library[0]} backbone from a local file (robkit downloads no {library[0]} "
                f"weights): add --teacher-file PATH"
            )
        return _existing_file(file, s), None
    if file is not None:
        if Path(s).expanduser().is_file() or _looks_like_path(s):
            raise TeacherFileMissing(
                f"--teacher is already a file ({s}); --teacher-file is for a catalog name or timm:/torchvision: "
                "architecture: drop one of them"
            )
        record = catalog().get(s)
        return _existing_file(file, f"the weights of {s}"), record
    p = Path(s).expanduser()
    if p.is_file():
        return p, None
    if isinstance(name_or_path, Path) or _looks_like_path(s):
        if p.exists():
            raise TeacherFileMissing(f"{p} is a folder; give the checkpoint file inside it")
        raise TeacherFileMissing(
            f"teacher file {p} does not exist (and {s!r} is not a catalog name); check the path, or see "
            "`robkit teachers list` for names"
        )
    record = catalog().get(s)  # CatalogError with close names on a typo
    return dl.resolve(record, download=download, progress=progress), record


def load(
    name_or_path: str | os.PathLike,
    device: str | Any = "cpu",
    *,
    checkpoint_key: str | None = None,
    arch: dict[str, Any] | None = None,
    head: dict[str, Any] | None = None,
    download: bool = True,
    progress: bool = True,
    file: str | os.PathLike | None = None,
) -> Teacher | BackboneTeacher:
    """A frozen teacher by catalog name or by file (a headless DINOv2 backbone gives a
    :class:`~robkit.teachers.backbone.BackboneTeacher`: features, no logits).

    ``checkpoint_key`` picks the network in a multi-network file (default: the catalog's, else
    ``teacher`` for DINO/iBOT, ``target_encoder`` for MSN).  ``arch`` / ``head`` declare
    hyper-parameters that the weights cannot show (e.g. ``{"num_heads": 3}`` for a ViT whose
    width is not a multiple of 64); everything else is inferred from tensor shapes.

    ``file``: the weights for a catalog name (instead of the cache) or for ``timm:ARCH`` /
    ``torchvision:ARCH`` (:mod:`robkit.teachers.libraries`: any backbone as a headless teacher).
    """
    from robkit.models.checkpoint import safe_load
    from robkit.teachers import download as dl
    from robkit.teachers.layouts import detect_family, parse_checkpoint
    from robkit.teachers.libraries import parse_spec
    from robkit.teachers.teacher import teacher_from_robkit, teacher_from_spec

    path, record = resolve_file(name_or_path, download=download, progress=progress, file=file)
    digest = dl.sha256_file(path)
    spec = os.fspath(name_or_path)
    if parse_spec(spec) is not None:  # timm:ARCH / torchvision:ARCH from a local file
        from robkit.teachers.libraries import library_teacher

        return library_teacher(spec, path, safe_load(path), sha256=digest).to(device)
    if record is not None:
        expected, where = dl.expected_sha256(record)
        if expected and digest != expected:
            raise dl.DownloadError(
                f"{path} has sha256 {digest}, but {expected} is expected ({where}) for teacher {record.name!r}. "
                "The file is corrupt or not the published one: delete it and load again to re-download."
            )
        if expected is None and file is None:  # a user's own file never becomes the reference
            dl.record_sha256(record["file_name"], digest)
    obj = safe_load(path)
    name = record.name if record is not None else path.name
    family = detect_family(obj)
    if record is not None and family != record.family:
        raise TeacherLoadError(
            f"{path} holds a {family} checkpoint, but catalog entry {name!r} is {record.family}"
        )
    teacher: Teacher | BackboneTeacher
    if family == "robkit":
        teacher = teacher_from_robkit(obj, name=name, sha256=digest, source=str(path))
    elif family == "dinov2":
        from robkit.teachers.dinov2 import dinov2_teacher

        norm = (record.get("normalization") or {}) if record is not None else {}
        teacher = dinov2_teacher(
            obj.get("state_dict", obj),
            name,
            declared={**_declared(record, "arch"), **(arch or {})},
            meta={"resolution": record.get("resolution") if record is not None else None, **norm},
            sha256=digest,
            source=str(path),
        )
    elif family == "dinov3":
        from robkit.teachers.dinov3 import dinov3_teacher

        norm = (record.get("normalization") or {}) if record is not None else {}
        teacher = dinov3_teacher(
            obj.get("state_dict", obj),
            name,
            declared={**_declared(record, "arch"), **(arch or {})},
            meta={
                "resolution": record.get("resolution") if record is not None else None,
                "sha256_prefix": record.get("sha256_prefix") if record is not None else None,
                **norm,
            },
            sha256=digest,
            source=str(path),
        )
    else:
        key = checkpoint_key or (record.get("checkpoint_key") if record is not None else None)
        spec = parse_checkpoint(obj, key)
        # A file loaded by path: its ViT position grid tells the native resolution.
        meta = {"resolution": spec.backbone["img_size"]} if spec.backbone.get("img_size") else {}
        if record is not None:
            norm = record.get("normalization") or {}
            meta = {
                k: v
                for k, v in {
                    "mean": norm.get("mean"),
                    "std": norm.get("std"),
                    "resolution": record.get("resolution"),
                    "default_temperature": record.get("default_temperature"),
                }.items()
                if v is not None
            }
        declared_arch = {**_declared(record, "arch"), **(arch or {})}
        declared_head = {**_declared(record, "head"), **(head or {})}
        teacher = teacher_from_spec(
            spec,
            name=name,
            arch=declared_arch,
            head=declared_head,
            meta=meta,
            sha256=digest,
            source=str(path),
        )
    del obj
    return teacher.to(device)


def _declared(record: Any, key: str) -> dict[str, Any]:
    if record is None:
        return {}
    value = record.get(key) or {}
    return {k: v for k, v in value.items() if k not in ("name", "description", "note")}
