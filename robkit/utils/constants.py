"""Normalisation constants shared by the teachers, the views, evaluation and export."""

from __future__ import annotations

# torchvision's ImageNet statistics, which every official teacher was trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def imagenet_normalization() -> dict[str, list[float]]:
    """``{"mean": [3], "std": [3]}``, the form checkpoints and export cards store."""
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
