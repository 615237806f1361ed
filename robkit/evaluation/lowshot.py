"""Low-shot classification on frozen features (RoB §4.3 and appendix C.4).

Protocol, as in RoB (which follows MSN, Assran et al. 2022):

* ``shots`` labelled training images per class (1 and 5), several class-balanced splits drawn
  with different seeds (RoB averages 5 splits for 1 shot and 3 for 5 shots; we default to 3);
* features L2-normalised, then centred with the training-set mean (appendix C.4: "normalize the
  features and subtract the mean, using the training set statistics for both train and test");
  the mean is taken over all training images' features, which needs no labels;
* scikit-learn ``LogisticRegression`` over a log-spaced sweep of regularisation; RoB sweeps
  λ from 1e4 to 1e-2, i.e. sklearn's ``C = 1/λ`` from 1e-4 to 1e2.

RoB reports the best λ on the test set.  We never look at the test set to choose: ``C`` is picked
on a class-balanced validation sample drawn from the *other* training images, and only the chosen
model is scored on the test set.  Results are mean ± std (over splits) of test top-1 accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from robkit.data.datasets import stratified_sample

DEFAULT_SHOTS = (1, 5)
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))  # λ = 1e4 … 1e-2 (RoB appendix C.4)


def sample_lowshot(
    labels: torch.Tensor, shots: int, seed: int, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of exactly ``shots`` images of every class present in ``labels``, drawn with ``seed``.

    Images in ``exclude`` (indices) are never drawn.  Raises if a class has too few images.
    """
    return stratified_sample(labels, seed, shots=shots, exclude=exclude)


def _preprocess(x: torch.Tensor, mean: torch.Tensor) -> np.ndarray:
    x = torch.nn.functional.normalize(x.float(), dim=1)
    return (x - mean).numpy().astype(np.float64)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)


def lowshot_split(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    shots: int,
    seed: int,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    val_per_class: int = 10,
) -> dict[str, Any]:
    """One split: fit on ``shots`` images per class, choose ``C`` on held-out train images, score on test."""
    if len(c_grid) == 0:
        raise ValueError("c_grid must hold at least one regularisation value")
    mean = torch.nn.functional.normalize(train_feats.float(), dim=1).mean(dim=0, keepdim=True)
    train_idx = sample_lowshot(train_labels, shots, seed)
    # Validation shots per class: as many as the rest of the training set allows, up to val_per_class.
    counts = torch.bincount(train_labels[train_labels >= 0].long())
    spare = int(counts[counts > 0].min()) - shots
    val_idx = (
        sample_lowshot(train_labels, min(val_per_class, spare), seed + 1_000_003, train_idx)
        if spare
        else None
    )

    x_tr, y_tr = _preprocess(train_feats[train_idx], mean), train_labels[train_idx].numpy()
    best: tuple[float, float, Any] = (-1.0, float(c_grid[0]), None)
    for c in c_grid:
        clf = _fit(x_tr, y_tr, float(c), seed)
        if val_idx is None:  # no spare image to validate on: keep the first (strongest) regularisation
            best = (0.0, float(c), clf)
            break
        val_acc = float(
            (clf.predict(_preprocess(train_feats[val_idx], mean)) == train_labels[val_idx].numpy()).mean()
        )
        if val_acc > best[0]:
            best = (val_acc, float(c), clf)
    val_acc, c_best, clf = best
    test_acc = float((clf.predict(_preprocess(test_feats, mean)) == test_labels.long().numpy()).mean())
    return {"accuracy": test_acc, "C": c_best, "val_accuracy": val_acc, "train_indices": train_idx.tolist()}


def lowshot_eval(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    shots: Sequence[int] = DEFAULT_SHOTS,
    n_splits: int = 3,
    seed: int = 0,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    val_per_class: int = 10,
) -> dict[str, dict[str, Any]]:
    """Low-shot top-1 on the test set → ``{"1": {"mean", "std", "accuracies", "C"}, "5": {...}}``.

    Split ``s`` of every shot count uses seed ``seed + s``; accuracies are fractions in [0, 1].
    """
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError(
            "low-shot evaluation needs labelled images (found label -1); use a data set with one sub-folder per class."
        )
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    out: dict[str, dict[str, Any]] = {}
    for k in shots:
        runs = [
            lowshot_split(
                train_feats, train_labels, test_feats, test_labels, k, seed + s, c_grid, val_per_class
            )
            for s in range(n_splits)
        ]
        accs = [r["accuracy"] for r in runs]
        out[str(k)] = {
            "mean": float(np.mean(accs)),
            "std": float(np.std(accs)),
            "accuracies": accs,
            "C": [r["C"] for r in runs],
        }
    return out
