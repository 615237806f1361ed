"""One protocol for every file format: convert, embed metadata, run the file, read it back.

:func:`robkit.export.exporter.export_model` drives a :class:`Backend` through the same steps for
every format: ``convert`` writes the file, ``embed`` puts the standard and robkit metadata inside
it, ``run`` executes the very file that ships on the held-out parity images, the exporter compares
those outputs with PyTorch and writes the card. ``runner`` is what ``robkit bench`` and
``ExportedFileModel`` time and evaluate; ``read_back`` returns the metadata the file carries, as an
app's loader would see it.

Each format module implements its backend (``onnx_format.OnnxBackend``, ``tflite_format.TFLiteBackend``,
``coreml_format.CoreMLBackend``, ``executorch_format.ExecuTorchBackend``); :func:`backend_for` finds it
without importing the other formats' converters.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from robkit.export.qat import QATRun
from robkit.export.quantize import MixedPrecisionPlan
from robkit.export.targets import FORMATS, ExportTarget


@dataclass
class ConvertJob:
    """Everything a backend needs to convert one wrapped module for one target."""

    module: torch.nn.Module  # the student in the target's input contract (``wrappers.build_export_module``)
    target: ExportTarget
    out: Path  # the file to write
    tmp: Path  # a scratch folder, removed after the export
    example: torch.Tensor  # one input in the file's own layout and dtype
    cal_x: torch.Tensor  # calibration inputs (training images)
    par_x: torch.Tensor  # parity inputs (held-out test images)
    search_x: torch.Tensor | None  # int8 only: training images the mixed-precision search scores on
    is_vit: bool
    labels: list[str] | None = None
    qat: QATRun | None = None  # int8 only: quantisation-aware distillation before conversion


@dataclass
class Converted:
    """What ``convert`` reports: conversion facts for the card, the int8 plan, and (for PT2E int8)
    the quantised graph's own outputs on the parity images, to tell conversion from quantisation error.
    """

    conversion: dict[str, Any]
    plan: MixedPrecisionPlan | None = None
    simulated: torch.Tensor | None = None


class FileRunner(Protocol):
    """A loaded exported file: ``runner(x)`` runs one input, ``run_batches(x)`` a stack of them."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The file's output on one input ``x`` (in the file's layout and dtype)."""
        ...

    def run_batches(self, x: np.ndarray) -> np.ndarray:
        """The file's outputs on a stack of inputs ``x``, concatenated along the batch axis."""
        ...


class Backend(Protocol):
    """A file format's four steps (see the module docstring)."""

    format: str
    runtime: str  # the client that runs the file (onnxruntime, ai-edge-litert, ...)

    def convert(self, job: ConvertJob) -> Converted:
        """Write ``job.out`` for ``job.target``."""
        ...

    def embed(self, path: Path, card: dict[str, Any], labels: list[str] | None) -> bool:
        """Put the metadata of ``card`` (and ``labels``) inside the file; whether anything was embedded."""
        ...

    def run(
        self, path: Path, job: ConvertJob, converted: Converted
    ) -> tuple[np.ndarray, str, dict[str, Any]]:
        """The file's outputs on ``job.par_x``, a note on how they were obtained, and facts that update
        the card's conversion record.
        """
        ...

    def runner(self, path: Path, threads: int) -> FileRunner:
        """The file loaded in its runtime at ``threads`` threads."""
        ...

    def read_back(self, path: Path) -> dict[str, Any]:
        """The metadata the file carries, read the way its runtime reads it (empty if none)."""
        ...


_MODULES = {
    "onnx": ("robkit.export.onnx_format", "OnnxBackend"),
    "tflite": ("robkit.export.tflite_format", "TFLiteBackend"),
    "coreml": ("robkit.export.coreml_format", "CoreMLBackend"),
    "executorch": ("robkit.export.executorch_format", "ExecuTorchBackend"),
}
assert set(_MODULES) == set(FORMATS)


def backend_for(fmt: str) -> Backend:
    """The backend of format ``fmt`` (one of :data:`robkit.export.targets.FORMATS`)."""
    if fmt not in _MODULES:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(_MODULES)}")
    module, name = _MODULES[fmt]
    cls: Callable[[], Backend] = getattr(importlib.import_module(module), name)
    return cls()
