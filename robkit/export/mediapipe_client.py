"""The exported TFLite file in MediaPipe Tasks, the client Android, iOS and web apps load it with.

Used by the demo to show that its classifier file is labelled correctly by the app's own client,
and by the tests. MediaPipe is an optional dependency (the ``export`` extra).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from robkit.export.filemodel import ExportError


def _vision() -> tuple[Any, Any, Any]:
    try:
        import mediapipe as mp
        from mediapipe.tasks.python import vision
        from mediapipe.tasks.python.core import base_options
    except ImportError as e:
        raise ExportError(
            f"MediaPipe is not installed ({e}); `pip install mediapipe` (robkit's `export` extra) to run "
            "exported TFLite files in MediaPipe Tasks"
        ) from None
    return mp, vision, base_options


def _images(mp: Any, images_u8: torch.Tensor) -> list[Any]:
    """``uint8 [N, 3, H, W]`` RGB → MediaPipe images (at the model's resolution: MediaPipe would resize)."""
    arr = images_u8.permute(0, 2, 3, 1).contiguous().numpy()
    return [mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(a)) for a in arr]


def classify(path: str | os.PathLike, images_u8: torch.Tensor) -> list[tuple[int, str, float]]:
    """Top-1 ``(index, label name, score)`` of each image from MediaPipe's ``ImageClassifier``."""
    mp, vision, base = _vision()
    options = vision.ImageClassifierOptions(
        base_options=base.BaseOptions(model_asset_path=str(path)), max_results=1
    )
    out = []
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for im in _images(mp, images_u8):
            top = classifier.classify(im).classifications[0].categories[0]
            out.append((int(top.index), str(top.category_name), float(top.score)))
    return out


def embed(path: str | os.PathLike, images_u8: torch.Tensor) -> np.ndarray:
    """Embeddings ``[N, D]`` from MediaPipe's ``ImageEmbedder`` (not L2-normalised)."""
    mp, vision, base = _vision()
    options = vision.ImageEmbedderOptions(base_options=base.BaseOptions(model_asset_path=str(path)))
    with vision.ImageEmbedder.create_from_options(options) as embedder:
        return np.stack([embedder.embed(im).embeddings[0].embedding for im in _images(mp, images_u8)])
