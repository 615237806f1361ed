"""Real images for calibration and parity (never random noise: int8 ranges and parity numbers
measured on noise say nothing about what the model computes on photos).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robkit.data.datasets import open_dataset
from robkit.engine.bn import recompute_bn_stats_


def load_images(
    data: str = "fashion-mnist", split: str = "train", n: int = 64, size: int = 224, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``data``/``split`` as ``uint8 [n, 3, size, size]`` and their labels ``[n]``.

    Images ``offset .. offset+n`` are taken in order so calibration (train split) and parity
    (test split) sets are disjoint and reproducible.  Resizing is bilinear with antialiasing,
    the same filter as training's ``to_model_input``; the result is rounded back to uint8 so
    that every runtime sees exactly the pixels an app would.
    """
    ds = open_dataset(data, split=split, limit=offset + n)
    if len(ds) <= offset:
        raise ValueError(f"{data}/{split} has {len(ds)} images; need more than {offset} to take {n}")
    idx = range(offset, min(len(ds), offset + n))
    imgs, labels = zip(*(ds[i] for i in idx))
    x = torch.stack([torch.as_tensor(i) for i in imgs]).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8), torch.as_tensor(labels, dtype=torch.long)


def reestimate_batchnorm(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> torch.nn.Module:
    """Re-estimate BatchNorm running statistics on ``x`` (model inputs) and return ``model`` in eval mode.

    Makes an untrained student compute non-degenerate features on real images, so that
    quantisation damage is measurable on it (used by the tests and the export benchmark).  The
    statistics are :func:`robkit.engine.bn.recompute_bn_stats_`'s exact average, as training's.
    """
    recompute_bn_stats_(model, (x[i : i + batch] for i in range(0, len(x), batch)))
    return model.eval()
