"""``evaluate``: frozen-feature evaluation of a checkpoint, a module or raw pixels in one call.

Used by ``robkit eval``, by the training engine at the end of a run and by the demo.  Features
are extracted once per split and shared by kNN, the linear probe and low-shot.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from robkit.data.datasets import DataError, ImageFolder, open_dataset
from robkit.engine.bn import has_batchnorm, precise_bn_from_dataset
from robkit.evaluation.features import dataset_labels, extract_features, raw_pixel_features
from robkit.evaluation.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_accuracy
from robkit.evaluation.linear import save_probe, train_linear_probe
from robkit.evaluation.lowshot import DEFAULT_SHOTS, lowshot_eval
from robkit.models.checkpoint import CheckpointError, load_student
from robkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD

EVALUATIONS = ("knn", "linear", "lowshot")
PIXELS = "pixels"
UNTRAINED = "untrained:"  # ``untrained:ARCH``: the architecture at its seeded initial weights
FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")


def _is_folder_of_images(data: str) -> bool:
    p = Path(data)
    return data not in FASHION_MNIST_NAMES and p.is_dir() and not any(p.glob("*-idx3-ubyte*"))


def open_eval_splits(
    data: str | os.PathLike, train_limit: int | None, test_limit: int | None, canvas_px: int
) -> tuple[Any, Any]:
    """``(train, test)`` data sets: Fashion-MNIST train/test, or a folder's ``train/`` and ``test/`` (or ``val/``)."""
    data = str(data)
    if not _is_folder_of_images(data):
        if data not in FASHION_MNIST_NAMES and not Path(data).is_dir():
            raise DataError(
                f"data set {data!r} not found: pass `fashion-mnist` or a folder with train/ and test/ (or val/) "
                "sub-folders, each holding one sub-folder of images per class."
            )
        return open_dataset(data, "train", train_limit), open_dataset(data, "test", test_limit)
    root = Path(data)
    test_split = next((s for s in ("test", "val") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or test_split is None:
        raise DataError(
            f"{root} needs train/ and test/ (or val/) sub-folders for evaluation, found "
            f"{sorted(d.name for d in root.iterdir() if d.is_dir()) or 'none'}. Lay it out as "
            "ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg."
        )
    splits = []
    for split, limit in (("train", train_limit), (test_split, test_limit)):
        ds = ImageFolder(root / split, canvas_px=canvas_px)
        if limit is not None and limit < len(ds):
            # Folder files are sorted by class: a prefix would drop whole classes, so sample instead.
            keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:limit].sort().values
            ds.files = [ds.files[i] for i in keep.tolist()]
        splits.append(ds)
    train, test = splits
    if train.classes != test.classes:
        raise DataError(
            f"train and {test_split} class folders differ: {list(train.classes)} vs {list(test.classes)}; "
            "both splits need the same class sub-folders."
        )
    return train, test


class NoLabelsError(DataError):
    """The data set has no class labels (a flat folder), so it cannot be evaluated."""


def _require_labels(ds: Any, what: str) -> torch.Tensor:
    labels = dataset_labels(ds)
    if labels.numel() == 0 or bool((labels < 0).any()):
        raise NoLabelsError(
            f"the {what} images of {getattr(ds, 'name', ds)} have no labels (a flat folder?); kNN, linear and "
            "low-shot evaluation need one sub-folder per class, e.g. ROOT/train/cat/*.jpg."
        )
    return labels


def untrained_student(arch: str, kwargs: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """The student a run with ``seed`` starts from: the same seeding and builder as training."""
    from robkit.models.students import build_student

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_student(arch, **(kwargs or {})).eval()


def _resolve_untrained(
    spec: Any,
    resolution: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    seed: int,
) -> tuple[nn.Module, dict[str, Any]]:
    """``untrained:ARCH`` or a checkpoint whose architecture, size and normalisation are kept."""
    kwargs: dict[str, Any]
    meta: dict[str, Any]
    if isinstance(spec, str) and spec.startswith(UNTRAINED):
        arch, kwargs, meta = spec[len(UNTRAINED) :], {}, {}
        if not arch:
            raise ValueError(f"{spec!r}: name the architecture, e.g. untrained:resnet18")
    else:
        if not isinstance(spec, dict) and not Path(spec).is_file():
            raise CheckpointError(f"checkpoint {spec} not found; --untrained needs the run's checkpoint.pt")
        _, meta = load_student(spec)
        arch, kwargs = meta["student"]["arch"], meta["student"].get("kwargs", {})
        seed = int(meta.get("seed", seed))
    norm = meta.get("normalization") or {}
    info = {
        "checkpoint": f"{UNTRAINED}{arch}",
        "resolution": int(resolution if resolution is not None else meta.get("resolution") or 32),
        "mean": list(mean if mean is not None else norm.get("mean", IMAGENET_MEAN)),
        "std": list(std if std is not None else norm.get("std", IMAGENET_STD)),
        "arch": arch,
        "method": "untrained",
        "seed": seed,
    }
    return untrained_student(arch, kwargs, seed), info


def _resolve_model(
    model_or_ckpt: str | os.PathLike | dict | nn.Module,
    resolution: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    device: torch.device,
) -> tuple[nn.Module | None, dict[str, Any]]:
    """``(model or None for pixels, info)`` with ``info``: checkpoint, resolution, mean, std."""
    if isinstance(model_or_ckpt, nn.Module):
        if resolution is None or mean is None or std is None:
            raise ValueError(
                "evaluating a module needs resolution, mean and std (its training normalisation)"
            )
        return model_or_ckpt, {
            "checkpoint": "",
            "resolution": int(resolution),
            "mean": list(mean),
            "std": list(std),
        }
    if isinstance(model_or_ckpt, str) and model_or_ckpt == PIXELS:
        return None, {"checkpoint": PIXELS, "resolution": resolution, "mean": mean, "std": std}
    from robkit.export.filemodel import ExportedFileModel, is_exported_file

    if isinstance(model_or_ckpt, (str, os.PathLike)) and Path(model_or_ckpt).suffix in (
        ".mlpackage",
        ".mlmodel",
    ):
        raise ValueError(
            f"{model_or_ckpt} is a Core ML model, which only runs on macOS/iOS; evaluate its checkpoint "
            "here, or an ONNX/TFLite export of the same student to see the effect of export."
        )
    if is_exported_file(model_or_ckpt):
        # The file's card fixes the input; evaluating it at another size or normalisation would
        # not measure what the app computes.
        model = ExportedFileModel(model_or_ckpt)
        card = model.card
        if resolution is not None and int(resolution) != model.resolution:
            raise ValueError(
                f"{model_or_ckpt} takes {model.resolution} px inputs (fixed at export); drop --resolution "
                f"or export again at {resolution} px."
            )
        return model, {
            "checkpoint": str(model_or_ckpt),
            "resolution": model.resolution,
            "mean": model.mean,
            "std": model.std,
            "arch": card.get("arch"),
            "method": card.get("method"),
            "exported": {
                "format": card.get("format"),
                "precision": card.get("precision"),
                "target": card.get("target"),
                "runtime": model.runtime,
                "status": card.get("status"),
            },
        }
    if not isinstance(model_or_ckpt, dict) and not Path(model_or_ckpt).is_file():
        raise CheckpointError(
            f"checkpoint {model_or_ckpt} not found; pass a robkit checkpoint (e.g. RUN/checkpoint.pt from "
            "`robkit pretrain` or `robkit distill`), a file from `robkit export` (.onnx, .tflite, .pte) "
            "or `pixels` for the raw-pixel baseline."
        )
    student, meta = load_student(model_or_ckpt)
    norm = meta.get("normalization") or {}
    info = {
        "checkpoint": "" if isinstance(model_or_ckpt, dict) else str(model_or_ckpt),
        "resolution": int(resolution if resolution is not None else meta.get("resolution") or 224),
        "mean": list(mean if mean is not None else norm.get("mean", IMAGENET_MEAN)),
        "std": list(std if std is not None else norm.get("std", IMAGENET_STD)),
        "arch": meta.get("student", {}).get("arch"),
        "method": meta.get("method"),
    }
    return student.to(device), info


def evaluate(
    checkpoint_or_model: str | os.PathLike | dict | nn.Module,
    data: str | os.PathLike = "fashion-mnist",
    which: Sequence[str] = ("knn", "linear"),
    train_limit: int | None = None,
    test_limit: int | None = None,
    resolution: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 256,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    bn: bool = True,
    epochs: int = 100,
    lr: float = 0.1,
    shots: Sequence[int] = DEFAULT_SHOTS,
    n_splits: int = 3,
    seed: int = 0,
    amp: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    probe_path: str | os.PathLike | None = None,
    untrained: bool = False,
) -> dict[str, Any]:
    """Evaluate frozen features on ``data`` → a JSON-ready dict of results (accuracies in [0, 1]).

    ``checkpoint_or_model``: a robkit checkpoint path or dict (resolution and normalisation come
    from it unless given), a file from ``robkit export`` (.onnx/.tflite/.pte, run in its own
    runtime: the accuracy the app gets, int8 rounding included), a module mapping ``[B, 3, R, R]`` → ``[B, D]`` (give ``resolution``,
    ``mean``, ``std``), or ``"pixels"`` for the raw-pixel floor.  ``which`` ⊆ {knn, linear, lowshot}.
    With ``probe_path`` the linear probe is saved there (:func:`save_probe`).

    ``untrained=True`` (or ``"untrained:ARCH"``) evaluates the checkpoint's architecture at the
    initial weights of its run (same seed, same builder), with BatchNorm re-estimated exactly as
    the trainer does for trained checkpoints (:func:`robkit.engine.bn.precise_bn_from_dataset`):
    the baseline every trained figure needs beside it.
    """
    unknown = [w for w in which if w not in EVALUATIONS]
    if unknown or not which:
        raise ValueError(
            f"unknown evaluation(s) {unknown or list(which)}; choose from {', '.join(EVALUATIONS)}"
        )
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    untrained = untrained or (
        isinstance(checkpoint_or_model, str) and checkpoint_or_model.startswith(UNTRAINED)
    )
    model: nn.Module | None
    if untrained:
        model, info = _resolve_untrained(checkpoint_or_model, resolution, mean, std, seed)
    else:
        model, info = _resolve_model(checkpoint_or_model, resolution, mean, std, dev)
    canvas = info["resolution"] or 32
    train_ds, test_ds = open_eval_splits(data, train_limit, test_limit, canvas_px=canvas)
    if untrained:
        assert model is not None  # _resolve_untrained always builds a module
        if has_batchnorm(model):
            model = precise_bn_from_dataset(
                model, train_ds, info["resolution"], info["mean"], info["std"], seed=info["seed"]
            ).eval()
        model = model.to(dev)
    # Checked before the (slow) feature pass so an unlabelled folder fails at once.
    max_label = int(max(_require_labels(train_ds, "train").max(), _require_labels(test_ds, "test").max()))
    classes = list(getattr(train_ds, "classes", ()) or [str(c) for c in range(max_label + 1)])

    t0 = time.perf_counter()
    if model is None:
        # Raw pixels at the data's native size unless asked otherwise (28 px for Fashion-MNIST).
        info["resolution"] = int(resolution or cast(int, getattr(train_ds, "canvas_px", 32)))
        px: dict[str, Any] = {"mean": mean, "std": std} if mean is not None and std is not None else {}
        x_tr, train_labels = raw_pixel_features(train_ds, info["resolution"], **px)
        x_te, test_labels = raw_pixel_features(test_ds, info["resolution"], **px)
    else:
        kw: dict[str, Any] = {"batch_size": batch_size, "progress": progress, "amp": amp, "device": dev}
        # Labels come from the batches: a folder replaces an unreadable image by the next one.
        x_tr, train_labels = extract_features(
            model, train_ds, info["resolution"], info["mean"], info["std"], **kw
        )
        x_te, test_labels = extract_features(
            model, test_ds, info["resolution"], info["mean"], info["std"], **kw
        )
    results: dict[str, Any] = {
        **{key: info[key] for key in ("checkpoint", "resolution") if key in info},
        "arch": info.get("arch"),
        "method": info.get("method"),
        **({"seed": info["seed"]} if untrained else {}),
        **({"exported": info["exported"]} if "exported" in info else {}),
        "data": str(data),
        "num_train": int(x_tr.shape[0]),
        "num_test": int(x_te.shape[0]),
        "num_classes": len(classes),
        "feature_dim": int(x_tr.shape[1]),
        "feature_seconds": round(time.perf_counter() - t0, 3),
    }
    if "knn" in which:
        acc = knn_accuracy(
            x_tr, train_labels, x_te, test_labels, k=k, temperature=temperature, num_classes=len(classes)
        )
        results["knn"] = {"accuracy": acc, "k": k, "temperature": temperature}
    if "linear" in which:
        probe, metrics = train_linear_probe(
            x_tr,
            train_labels,
            x_te,
            test_labels,
            epochs=epochs,
            lr=lr,
            bn=bn,
            seed=seed,
            num_classes=len(classes),
        )
        results["linear"] = {**metrics, "bn": bn}
        if probe_path is not None:
            save_probe(probe_path, probe, classes, {"checkpoint": info["checkpoint"], "metrics": metrics})
            results["linear"]["probe"] = str(probe_path)
    if "lowshot" in which:
        results["lowshot"] = lowshot_eval(
            x_tr, train_labels, x_te, test_labels, shots=shots, n_splits=n_splits, seed=seed
        )
    return results
