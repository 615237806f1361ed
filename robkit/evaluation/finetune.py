"""``finetune``: from a pre-trained or distilled student to an app's classifier.

The protocol is SSLight's semi-supervised evaluation (appendix B, Table 9), which follows SimCLR:

* a class-balanced labelled subset (``labels_fraction`` 0.01 / 0.1, or all labels);
* random resized crops (scale 0.08–1) and horizontal flips only;
* SGD with Nesterov momentum 0.9, learning rate 0.03 × batch / 256, cosine decay to 1e-6;
* 60 epochs on 1 % of the labels, 30 on 10 % (and on all of them).

Where robkit differs, and why:

* The classifier sits on the backbone's pooled features, not on the second layer of the pre-training
  MLP head as in the paper: the exported file is the backbone, so an app's classifier must be too.
* The paper's batch is 1,024; the default here is 256 (the learning rate follows the same linear
  scaling rule), capped at the subset size for tiny subsets.
* Weight decay is not stated in the paper; it is 0 here.
* Evaluation resizes the whole image to the student's resolution, as the exported file does, instead
  of the paper's resize-256 / centre-crop-224.

``mode="linear"`` freezes the backbone (and its BatchNorm statistics) and fits ``robkit eval linear``'s
probe (RoB's input BatchNorm + linear layer, 100 epochs) on the clean features of the labelled subset. The run goes through the engine's
:class:`~robkit.engine.trainer.Trainer`: progress bar, atomic checkpoints, exact ``resume``. It ends
with the classifier's test accuracy and a probe file that ``robkit export --probe`` turns into a
labelled classifier (the checkpoint alone also exports as one).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from robkit.data.datasets import data_fingerprint, select, stratified_sample
from robkit.data.views import MultiCropViews
from robkit.engine.bn import has_batchnorm, precise_bn_from_dataset
from robkit.engine.recipe import EMASpec, OptimSpec
from robkit.engine.tasks.finetune import FinetuneTask
from robkit.engine.trainer import CheckpointMeta, Trainer, TrainOptions
from robkit.evaluation.api import _require_labels, open_eval_splits, untrained_student
from robkit.evaluation.features import extract_features
from robkit.evaluation.linear import probe_accuracy, save_probe, train_linear_probe
from robkit.models.checkpoint import CheckpointError, atomic_save, load_student, make_checkpoint
from robkit.models.heads import LinearProbe
from robkit.utils.errors import RecipeError, RunExistsError
from robkit.utils.files import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MODES = ("full", "linear")


@dataclass(frozen=True)
class FinetuneProtocol:
    """SSLight's semi-supervised fine-tuning (appendix B); keyword defaults are the paper's values."""

    base_lr: float = 0.03  # per 256 images
    # mode="linear" (not in the paper): `robkit eval linear`'s probe (RoB's BN + linear head, DINO's
    # SGD schedule) on the labelled subset's features, 100 epochs at 0.1.
    linear_lr: float = 0.1
    linear_epochs: int = 100
    min_lr: float = 1e-6  # absolute, the end of the cosine decay
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0  # not stated in the paper
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's defaults
    flip_p: float = 0.5
    epochs_1pct: int = 60
    epochs_10pct: int = 30
    label_smoothing: float = 0.0

    def epochs_for(self, fraction: float) -> int:
        """The paper's length for a labelled fraction: 60 epochs up to 1 %, else 30."""
        return self.epochs_1pct if fraction <= 0.01 + 1e-9 else self.epochs_10pct


def parse_fraction(text: str | float) -> float:
    """``"1%"``, ``"10%"``, ``"0.1"`` or ``1`` → a fraction in (0, 1]; a clear error otherwise."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise RecipeError(
            f"--labels must be a fraction of the labelled images in (0, 1] or a percentage, got {text!r}; "
            "e.g. --labels 1% or --labels 10% (SSLight's semi-supervised protocol), or --labels 100%"
        )
    return value


def _views(
    resolution: int, protocol: FinetuneProtocol, mean: list[float], std: list[float]
) -> MultiCropViews:
    """One crop per image: random resized crop + flip, no colour, blur or solarisation."""
    return MultiCropViews(
        n_global=1,
        n_local=0,
        global_size_px=resolution,
        global_scale=protocol.crop_scale,
        flip_p=protocol.flip_p,
        jitter_p=0.0,
        grayscale_p=0.0,
        global_blur_p=0.0,
        local_blur_p=0.0,
        global_solarize_p=0.0,
        mean=cast("tuple[float, float, float]", tuple(mean)),
        std=cast("tuple[float, float, float]", tuple(std)),
    )


def finetune(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike = "fashion-mnist",
    out: str | os.PathLike | None = None,
    mode: str = "full",
    labels_fraction: float = 1.0,
    epochs: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    resume: bool = False,
    untrained: bool = False,
    protocol: FinetuneProtocol | None = None,
    **engine: Any,
) -> tuple[dict[str, Any], Path]:
    """Fine-tune the student of ``checkpoint`` on the labelled ``data`` → ``(results, run folder)``.

    ``mode``: ``full`` (every weight) or ``linear`` (frozen backbone + linear head). ``untrained``:
    start from the checkpoint architecture's seeded initial weights instead (the from-scratch
    baseline beside a fine-tuned figure). ``engine``: :class:`TrainOptions` fields (``max_steps``,
    ``precision``, ``progress``, ``device`` …). The folder gets ``checkpoint.pt`` (exports as a
    labelled classifier), ``probe.pt`` (for ``robkit export --probe``) and ``finetune.json``.
    """
    protocol = protocol or FinetuneProtocol()
    if mode not in MODES:
        raise RecipeError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0 < labels_fraction <= 1:
        raise RecipeError(f"the labelled fraction must be in (0, 1], got {labels_fraction}")
    if not Path(checkpoint).is_file():
        raise CheckpointError(
            f"checkpoint {checkpoint} not found; pass RUN/checkpoint.pt from `robkit pretrain` or `robkit distill`"
        )
    student, meta = load_student(checkpoint)
    arch = meta["student"]["arch"]
    if untrained:
        student = cast(
            Any, untrained_student(arch, meta["student"].get("kwargs", {}), int(meta.get("seed", seed)))
        )
    resolution = int(meta.get("resolution") or 224)
    norm = meta.get("normalization") or {}
    mean, std = list(norm["mean"]), list(norm["std"])

    train, test = open_eval_splits(data, train_limit, test_limit, canvas_px=resolution)
    labels = _require_labels(train, "training")
    n_classes = int(labels.max()) + 1
    classes = list(getattr(train, "classes", ()) or [str(c) for c in range(n_classes)])
    if labels_fraction < 1:
        train = select(train, stratified_sample(labels, seed, fraction=labels_fraction))
    if len(train) < batch_size:
        log.info("batch %d capped at the %d labelled images", batch_size, len(train))
        batch_size = len(train)
    default_epochs = protocol.linear_epochs if mode == "linear" else protocol.epochs_for(labels_fraction)
    n_epochs = int(epochs if epochs is not None else default_epochs)

    out_dir = Path(out) if out else Path("runs") / f"finetune-{arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out_dir / "checkpoint.pt").exists() and not resume:
        raise RunExistsError(
            f"{out_dir} already holds a run (checkpoint.pt). Continue it with --resume or choose another --out."
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    source_sha = sha256_file(checkpoint)
    record = {
        "name": f"finetune-{mode}",
        "method": "finetune",
        "mode": mode,
        "labels_fraction": labels_fraction,
        "epochs": n_epochs,
        "batch_size": batch_size,
        "untrained": untrained,
        "protocol": {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(protocol).items()
        },
    }
    data_rec = {
        "spec": str(data),
        "images": len(train),
        "name": getattr(train, "name", str(data)),
        "classes": classes,
    }
    init_rec = {
        "path": str(checkpoint),
        "sha256": source_sha,
        "method": meta.get("method"),
        "untrained": untrained,
    }
    atomic_write_text(out_dir / "config.yaml", json.dumps(record, indent=2))
    progress = bool(engine.get("progress", True))
    ckpt_path = out_dir / "checkpoint.pt"
    if mode == "linear":
        train_metrics = _fit_linear(
            student,
            train,
            resolution,
            mean,
            std,
            n_epochs,
            batch_size,
            seed,
            protocol,
            progress,
            untrained,
            ckpt_path,
            {
                "student": meta["student"],
                "config": record,
                "data": data_rec,
                "init": init_rec,
                "teacher": meta.get("teacher"),
            },
        )
    else:
        with torch.random.fork_rng(devices=[]):  # the same seed gives the same classifier (exact resume)
            torch.manual_seed(seed)
            head = LinearProbe(student.embed_dim, len(classes), bn=False)
        task = FinetuneTask(
            student, head, label_smoothing=protocol.label_smoothing, channels_last=not student.is_vit
        )
        optim = OptimSpec(
            name="sgd",
            base_lr=protocol.base_lr,
            min_lr=protocol.min_lr,
            momentum=protocol.momentum,
            nesterov=protocol.nesterov,
            weight_decay=protocol.weight_decay,
            freeze_last_layer_epochs=0,
            freeze_prototypes_epochs=0,
        )
        ckpt_meta = CheckpointMeta(
            kind="finetune",
            method="finetune",
            student=meta["student"],
            config=record,
            normalization={"mean": mean, "std": std},
            resolution=resolution,
            teacher=meta.get("teacher"),
            data=data_rec,
            identity={"data": data_fingerprint(train)},
            init=init_rec,
        )
        opts = TrainOptions(
            out_dir=out_dir,
            epochs=n_epochs,
            batch_size=batch_size,
            seed=seed,
            channels_last=not student.is_vit,
            **engine,
        )
        trainer = Trainer(
            task, _views(resolution, protocol, mean, std), train, optim, EMASpec(), opts, ckpt_meta
        )
        if resume:
            trainer.check_resume()
        train_metrics = trainer.fit(resume=resume)

    # The test accuracy of what ships: the checkpoint's backbone (BatchNorm as saved) and classifier.
    ft_student, ft_head, _ = load_student(ckpt_path, with_head=True)
    classifier = cast(LinearProbe, ft_head)
    feats, y = extract_features(ft_student, test, resolution, mean, std, progress=progress)
    accuracy = probe_accuracy(classifier, feats, y)
    results = {
        "checkpoint": str(ckpt_path),
        "source": str(checkpoint),
        "arch": arch,
        "mode": mode,
        "untrained": untrained,
        "labels_fraction": labels_fraction,
        "num_train": len(train),
        "num_test": int(y.shape[0]),
        "num_classes": len(classes),
        "epochs": n_epochs,
        "batch_size": batch_size,
        "accuracy": accuracy,
        "train": train_metrics,
    }
    probe_path = save_probe(
        out_dir / "probe.pt",
        classifier,
        classes,
        {"checkpoint": str(ckpt_path), "metrics": {"accuracy": accuracy}},
    )
    results["probe"] = str(probe_path)
    atomic_write_text(out_dir / "finetune.json", json.dumps(results, indent=2, default=str))
    return results, out_dir


def _fit_linear(
    student: Any,
    train: Any,
    resolution: int,
    mean: list[float],
    std: list[float],
    epochs: int,
    batch_size: int,
    seed: int,
    protocol: FinetuneProtocol,
    progress: bool,
    untrained: bool,
    ckpt_path: Path,
    rec: dict[str, Any],
) -> dict[str, Any]:
    """Frozen backbone: the linear probe of ``robkit eval linear`` on the labelled subset's clean
    features, saved as a finetune checkpoint (backbone unchanged, the probe as its head).
    """
    if untrained and has_batchnorm(student):  # as `robkit eval --untrained`: statistics of the data
        student = precise_bn_from_dataset(student, train, resolution, mean, std, seed=seed).eval()
    t0 = time.time()
    feats, y = extract_features(
        student, train, resolution, mean, std, batch_size=batch_size, progress=progress
    )
    probe, metrics = train_linear_probe(
        feats,
        y,
        epochs=epochs,
        lr=protocol.linear_lr,
        batch_size=batch_size,
        bn=True,
        seed=seed,
        num_classes=len(rec["data"]["classes"]),
    )
    metrics = {**metrics, "seconds": round(time.time() - t0, 1), "finished": True}
    ckpt = make_checkpoint(
        kind="finetune",
        method="finetune",
        student=rec["student"],
        backbone={k: v.detach().cpu() for k, v in student.backbone.state_dict().items()},
        head={"type": "LinearProbe", "kwargs": probe.init_kwargs, "state_dict": probe.state_dict()},
        teacher=rec["teacher"],
        normalization={"mean": mean, "std": std},
        resolution=resolution,
        config=rec["config"],
        data=rec["data"],
        metrics=metrics,
        init=rec["init"],
        seed=seed,
        progress={"finished": True},
    )
    atomic_save(ckpt, ckpt_path)
    return metrics
