"""Weighted k-nearest-neighbour classification on frozen features (DINO, Caron et al. 2021, §4.1).

DINO's ``eval_knn.py`` protocol, which RoB and most SSL papers report:

1. L2-normalise train and test features; similarity is the cosine ``s_ij = <x_i, t_j>``.
2. For each test image keep the top ``k`` (=20) training neighbours by similarity.
3. Each neighbour votes for its class with weight ``exp(s_ij / T)`` (``T`` = 0.07).
4. Votes are summed per class; the prediction is the class with the largest sum.

Test images are processed in chunks so the ``[chunk, N_train]`` similarity matrix stays small.
Ties between classes go to the smallest class index (``argmax`` returns the first maximum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def _check(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"kNN needs train features [N, D] and test features [M, D] with the same D, got "
            f"{tuple(train_feats.shape)} and {tuple(test_feats.shape)}"
        )
    if train_labels.ndim != 1 or train_labels.shape[0] != train_feats.shape[0]:
        raise ValueError(f"train labels must be [N={train_feats.shape[0]}], got {tuple(train_labels.shape)}")
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    if int(train_labels.min()) < 0:
        raise ValueError(
            f"train labels must be class indices >= 0, found {int(train_labels.min())} (unlabelled images?). "
            "kNN needs a data set with one sub-folder per class."
        )


@torch.inference_mode()
def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Summed neighbour votes ``[M, num_classes]``: ``sum_{j in topk(i)} exp(s_ij / T) * onehot(y_j)``."""
    _check(train_feats, train_labels, test_feats)
    if k < 1 or temperature <= 0 or chunk < 1:
        raise ValueError(
            f"k and chunk must be >= 1 and temperature > 0, got k={k}, T={temperature}, chunk={chunk}"
        )
    # A class absent from the training subset still gets a (zero) column.
    c = max(int(num_classes or 0), int(train_labels.max()) + 1)
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    scores = torch.zeros(test_feats.shape[0], c, dtype=torch.float32, device=train.device)
    for i in range(0, test_feats.shape[0], chunk):
        test = F.normalize(test_feats[i : i + chunk].float().to(train.device), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1, largest=True, sorted=True)
        # Weight in float32: exp(1 / 0.07) ≈ 1.6e6 is fine, but keep the sum exact enough for ties.
        weights = (sim / temperature).exp()
        scores[i : i + chunk].scatter_add_(1, labels[idx], weights)
    return scores


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class ``[M]`` (int64) for each test feature by DINO's weighted kNN."""
    scores = knn_scores(train_feats, train_labels, test_feats, k, temperature, num_classes, chunk)
    return scores.argmax(dim=1)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of :func:`knn_classify` against ``test_labels``."""
    if test_labels.ndim != 1 or test_labels.shape[0] != test_feats.shape[0]:
        raise ValueError(f"test labels must be [M={test_feats.shape[0]}], got {tuple(test_labels.shape)}")
    if test_labels.numel() == 0:
        raise ValueError("kNN accuracy needs at least one test image")
    pred = knn_classify(train_feats, train_labels, test_feats, k, temperature, num_classes, chunk)
    return float((pred.cpu() == test_labels.long().cpu()).float().mean())
