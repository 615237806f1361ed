"""Frozen-feature extraction: one embedding per image, computed once and reused by every evaluation.

Images are resized to the student's resolution and normalised with its training statistics
(``to_model_input``), then embedded under ``torch.inference_mode``: no autograd state and no
BatchNorm statistic updates (the model is put in eval mode and restored afterwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robkit.data.datasets import to_model_input

# The raw-pixel floor uses pixels scaled to [0, 1] (no centring), the usual "kNN on pixels"
# baseline: cosine kNN (k=20, T=0.07) on full Fashion-MNIST at 28 px gives 84.6 % top-1.
# (Centring with 0.5/0.5 changes cosine similarity and gives 85.1 %.)
PIXEL_MEAN = (0.0, 0.0, 0.0)
PIXEL_STD = (1.0, 1.0, 1.0)


def dataset_labels(dataset: Any) -> torch.Tensor:
    """Labels ``[N]`` (int64, -1 for unlabelled images) without decoding the images when possible."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor) and labels.shape[0] == len(dataset):
        return labels.long().clone()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def _uint8_batches(
    dataset: Any, batch_size: int, num_workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(uint8 [B, 3, S, S], labels [B])`` in data-set order."""
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if (
        isinstance(images, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and images.shape[0] == len(dataset)
    ):
        # In-memory tensors (Fashion-MNIST): slicing is far cheaper than per-item collation.
        for i in range(0, len(dataset), batch_size):
            x = images[i : i + batch_size]
            yield (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x), labels[i : i + batch_size].long()
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    for x, y in loader:
        yield x, torch.as_tensor(y).long()


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def extract_features(
    model: nn.Module,
    dataset: Any,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    amp: bool = False,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every image of ``dataset`` → ``(features [N, D] float32 on CPU, labels [N] int64)``.

    ``model`` maps normalised float ``[B, 3, R, R]`` to ``[B, D]`` (a robkit ``Student``).
    ``amp=True`` runs the forward under bfloat16 autocast; features are returned in float32.
    """
    if resolution < 1 or batch_size < 1:
        raise ValueError(f"resolution and batch_size must be >= 1, got {resolution} and {batch_size}")
    if len(dataset) == 0:
        raise ValueError("cannot extract features from an empty data set")
    dev = torch.device(device) if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    # The statistics as tensors on the model's device: to_model_input's as_tensor keeps their
    # device, so the normalisation runs next to the model instead of mixing devices.
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=dev)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=dev)
    bar = tqdm(total=len(dataset), desc="features", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode(), autocast:
            for images, y in _uint8_batches(dataset, batch_size, num_workers):
                x = to_model_input(images.to(dev, non_blocking=True), resolution, mean_t, std_t)
                out = model(x)
                if out.ndim != 2:
                    raise ValueError(
                        f"the model must return one embedding per image [B, D], got {tuple(out.shape)}; "
                        "pass the student backbone, not a model that returns tokens or feature maps."
                    )
                feats.append(out.float().cpu())
                labels.append(y.cpu())
                bar.update(images.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def raw_pixel_features(
    dataset: Any,
    resolution: int,
    mean: Sequence[float] = PIXEL_MEAN,
    std: Sequence[float] = PIXEL_STD,
    batch_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The floor baseline: pixels at ``resolution`` (in [0, 1] by default) flattened to ``[N, 3·R·R]``.

    kNN L2-normalises them, so this is cosine similarity between images.
    """
    return extract_features(
        nn.Flatten(1), dataset, resolution, mean, std, batch_size=batch_size, progress=False, device="cpu"
    )
