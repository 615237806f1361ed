"""An exported file (ONNX, TFLite, ExecuTorch) as a module, so frozen-feature evaluation can measure
what the *file* computes: ``robkit eval knn model.tflite`` gives the accuracy an app will see,
int8 rounding included, next to the PyTorch checkpoint's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from torch import nn

from robkit.export import card as cards
from robkit.export.targets import FORMATS
from robkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD
from robkit.utils.errors import RobkitError

SUFFIXES = {".onnx": "onnx", ".ort": "onnx", ".tflite": "tflite", ".pte": "executorch"}


class ExportError(RobkitError, ValueError):
    """An exported file that cannot be run here (no card, or a runtime this machine lacks)."""


def is_exported_file(path: Any) -> TypeGuard[str | os.PathLike]:
    """Whether ``path`` names an existing ONNX (or ORT-format), TFLite or ExecuTorch file (by its suffix)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix in SUFFIXES and Path(path).is_file()


def open_runner(path: str | os.PathLike, card: dict[str, Any], threads: int) -> tuple[Any, str]:
    """``(runner, runtime name)``; ``runner(x)`` runs one input, ``runner.run_batches(x)`` many."""
    from robkit.export.backends import backend_for

    fmt = card.get("format")
    if fmt not in FORMATS:
        raise ExportError(f"{path}: its card names format {fmt!r}; expected one of {', '.join(FORMATS)}")
    backend = backend_for(fmt)
    return backend.runner(Path(path), threads), backend.runtime


class ExportedFileModel(nn.Module):
    """``normalised float [B, 3, R, R] -> the file's output [B, D]``, through the file's own runtime.

    The input is converted to the file's contract (its card): NHWC layout, and for files that
    take pixels (uint8 0..255, or float RGB in [0, 1] as MediaPipe feeds TFLite files) the
    normalisation is undone and rounded to whole pixels, as an app would feed them.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        card = cards.read_card(self.path)
        if card is None:
            raise ExportError(
                f"{self.path} has no card ({cards.card_path(self.path).name}) saying how to feed it; "
                "export it with `robkit export`, which writes the card next to the file."
            )
        self.card = card
        self.runner, self.runtime = open_runner(self.path, card, threads or torch.get_num_threads())
        spec = card["input"]
        self.resolution = int(spec["resolution"])
        self.nhwc = spec["layout"] == "NHWC"
        self.uint8 = spec["dtype"] == "uint8"
        self.unit_range = spec.get("range") == "0-1"  # float pixels / 255
        norm = card.get("normalization") or {}
        self.mean = list(norm.get("mean", IMAGENET_MEAN))
        self.std = list(norm.get("std", IMAGENET_STD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float ``[B, 3, R, R]`` → the file's output ``[B, D]`` (float32, CPU)."""
        if self.uint8 or self.unit_range:
            m = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
            s = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
            x = ((x * s + m) * 255).round().clamp(0, 255)
            x = x.to(torch.uint8) if self.uint8 else x / 255
        if self.nhwc:
            x = x.permute(0, 2, 3, 1)
        y = self.runner.run_batches(np.ascontiguousarray(x.cpu().numpy()))
        return torch.from_numpy(np.asarray(y, dtype=np.float32))
