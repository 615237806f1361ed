"""What the export benchmarks share: a row is a target name, or ``TARGET+qat`` for the same target
after quantisation-aware distillation, and one row that fails to export is reported and skipped so
that a broken tool chain never hides the other rows."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from robkit.export.exporter import ExportResult, export_model
from robkit.export.qat import QATSettings
from robkit.export.targets import get_target


def split_row(row: str) -> tuple[str, bool]:
    """``"android-tflite-int8+qat"`` -> ``("android-tflite-int8", True)``."""
    target, _, mode = row.partition("+")
    if mode not in ("", "qat"):
        raise SystemExit(f"row {row!r}: the only suffix a row takes is +qat (e.g. {target}+qat)")
    return target, mode == "qat"


def add_qat_args(ap: argparse.ArgumentParser) -> None:
    """``--qat-steps/--qat-lr/--qat-images/--qat-batch-size/--qat-range-lr``, defaulting to
    ``robkit export --qat``'s."""
    ap.add_argument("--qat-steps", type=int, default=QATSettings.steps)
    ap.add_argument("--qat-lr", type=float, default=QATSettings.lr)
    ap.add_argument("--qat-images", type=int, default=QATSettings.images)
    ap.add_argument("--qat-batch-size", type=int, default=QATSettings.batch_size)
    ap.add_argument("--qat-range-lr", type=float, default=QATSettings.range_lr)


def qat_settings(args: argparse.Namespace) -> QATSettings:
    return QATSettings(
        steps=args.qat_steps,
        lr=args.qat_lr,
        images=args.qat_images,
        batch_size=args.qat_batch_size,
        range_lr=args.qat_range_lr,
    )


def export_row(
    student: torch.nn.Module, row: str, stem: Path, meta: dict[str, Any], qat: QATSettings | None, **kw: Any
) -> tuple[ExportResult | None, float]:
    """Export ``student`` for ``row`` to ``STEM-TARGET[-qat]``: ``(result or None, seconds)``."""
    target, with_qat = split_row(row)
    t0 = time.perf_counter()
    try:
        r = export_model(
            student,
            get_target(target),
            stem.with_name(f"{stem.name}-{target}{'-qat' if with_qat else ''}"),
            meta=meta,
            strict=False,
            qat=qat if with_qat else None,
            **kw,
        )
    except Exception as e:  # record and continue: an optional runtime missing must not hide the others
        print(f"  {row}: export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        return None, time.perf_counter() - t0
    return r, time.perf_counter() - t0


def float_units(r: ExportResult) -> int:
    """Modules the int8 file keeps in float (0 for a file that is not int8)."""
    return len((r.card.get("quantization") or {}).get("float_layers", []))


def _qat_card(r: ExportResult) -> dict[str, Any]:
    """The card's record of the file's quantisation-aware distillation (empty without one)."""
    return (r.card.get("quantization") or {}).get("qat") or {}


def qat_seconds(r: ExportResult) -> float | None:
    """Wall time of the file's quantisation-aware distillation, if it had one."""
    return _qat_card(r).get("seconds")


def qat_graph(r: ExportResult) -> str | None:
    """Which graph a ``--qat`` file holds: ``qat``, or ``ptq`` where the post-training plan won."""
    return _qat_card(r).get("graph")
