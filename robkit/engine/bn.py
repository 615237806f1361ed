"""Precise BatchNorm statistics for evaluation and export.

Training updates BatchNorm running statistics with an EMA over crops of several resolutions
(torchvision's MobileNetV3 uses momentum 0.01), so after a short run, or after multi-crop
training, the running statistics do not describe full images at the deployment resolution and
the eval-mode network can even output a constant.  Re-estimating them as an exact average over
a few thousand clean training images at the global resolution ("precise BN", Wu & Johnson 2021)
fixes the eval-mode network without touching any learned weight.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from robkit.data.datasets import ImageTensorDataset, to_model_input

PRECISE_BN_IMAGES = 2048  # clean training images for the BatchNorm re-estimate


def has_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` holds any BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn_stats_(net: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics of ``net`` to the exact average over ``batches``.

    ``batches``: model inputs, moved to ``net``'s device.  In place; ``net`` is returned.  This is
    ``torch.optim.swa_utils.update_bn``, which gives bitwise the statistics of the loop robkit had
    (statistics reset, ``momentum=None`` -- a cumulative average -- in train mode, then the momenta
    and the training mode restored).
    """
    first = next(net.parameters(), None)
    update_bn(batches, net, device=None if first is None else first.device)
    return net


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    images: torch.Tensor,
    resolution: int,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    batch_size: int = 256,
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) with BN running stats averaged over ``images``.

    ``images``: uint8 ``[N, 3, H, W]``; they are resized to ``resolution`` and normalised.
    """
    net = model if inplace else copy.deepcopy(model)
    if not has_batchnorm(net) or images.shape[0] == 0:
        return net
    batches = (
        to_model_input(images[i : i + batch_size], resolution, mean, std)
        for i in range(0, images.shape[0], batch_size)
    )
    # A batch of one image has no batch statistics after global pooling (BatchNorm raises): skip it.
    return recompute_bn_stats_(net, (x for x in batches if x.shape[0] > 1))


def precise_bn_images(dataset: Any, n: int = PRECISE_BN_IMAGES, seed: int = 0) -> torch.Tensor:
    """The uint8 ``[n, 3, H, W]`` images that re-estimate BatchNorm: a seeded random subset.

    One selection for trained runs (the trainer) and untrained baselines (evaluation), so both
    networks get their statistics the same way.
    """
    n = min(n, len(dataset))
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    if isinstance(dataset, ImageTensorDataset):
        imgs = dataset.images[idx]
        return imgs.expand(-1, 3, -1, -1) if imgs.shape[1] == 1 else imgs
    return torch.stack([dataset[int(i)][0] for i in idx])


def precise_bn_from_dataset(
    model: nn.Module,
    dataset: Any,
    resolution: int,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    n: int = PRECISE_BN_IMAGES,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics of ``n`` clean images of ``dataset``."""
    return precise_bn(model, precise_bn_images(dataset, n, seed), resolution, mean, std)
