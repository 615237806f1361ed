"""Quantisation-aware distillation: fine-tune the int8-simulated student to match its fp32 self.

Post-training int8 rounds a network that never saw rounding; MobileNetV3's hard-swish and
squeeze-excite layers lose most (BENCHMARKS.md). Here the export module (student + the wrapper's
folded normalisation, exactly what the file computes) is exported once, its BatchNorms are folded
into the convolutions (the folded weights are what the file stores), PT2E inserts fake-quantisers
with the target runtime's quantiser annotations, and the fake-quantised copy is trained to give the
fp32 module's embeddings (``1 - cosine``) on unlabelled training images. The converted graph is then
written by the same converter as post-training int8, so parity is checked the same way.

Facts this follows:

* litert-torch's and XNNPACK's QAT configurations use ``FusedMovingAvgObsFakeQuantize``, which
  drops the ``eps=2**-12`` their PTQ observers use (scales below it are what TFLite's converter
  refuses); the configuration here (:func:`fake_quant_config`) keeps each runtime's PTQ dtypes,
  ranges and schemes with the unfused ``FakeQuantize``, which honours ``eps``;
* activation ranges start from the observer both runtimes' post-training int8 uses
  (``HistogramObserver``, which clips outliers to minimise the rounding error), fitted on
  ``CALIBRATION_IMAGES`` training images, as few observer calls as memory allows (its ranges
  depend on how the images are split into calls: on the 160-step demo student, 256 images in 8
  calls started at held-out cosine 0.956, 1,024 in one call at 0.980); moving-average min/max
  ranges started worse on trained students (0.991 against 0.996);
* the activation ranges are then *learned* with the weights (LSQ, Esser et al. 2020, through
  torchao's ``LearnableFakeQuantize``; ``range_lr``), since a histogram range is fitted to one
  layer's own rounding error, not to the embedding: on the demo student, 300 steps at lr 1e-4 reach
  0.9906 with learned ranges (range lr 1e-3) against 0.9846 with the histogram ranges fixed; a range
  lr of 1e-2 diverged (0.28), so scales are kept at or above ``eps`` after every step;
* conv + BatchNorm QAT patterns are not needed once BatchNorm is folded, so only litert-torch's
  static patterns (those PTQ uses) are annotated, and the folded biases are trained with the weights;
* weight ranges follow the weights for the first ``observe_steps`` steps and are then frozen, as
  torchvision's QAT recipe freezes its observers, so the last steps train against fixed ranges.

A run with ``state=PATH`` writes its state there atomically every ``checkpoint_every`` steps
(weights, observers, optimiser, schedule, the batch generator); started again with the same
module, images and settings it resumes exactly where it stopped, and with anything else it refuses
and names what changed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robkit.engine.trainer import TrainingDiverged
from robkit.utils.errors import ResumeMismatch, leaf_diff
from robkit.utils.files import atomic_save

Tensor = torch.Tensor
EPS = 2**-12  # litert-torch's observer eps (smallest scale)
STATE_VERSION = 2  # 2: learned activation ranges (their scales are part of the state)
CALIBRATION_IMAGES = 1024  # training images the observers see before QAT starts
CALIBRATION_PIXELS = 1024 * 32 * 32  # pixels per observer call: 1,024 images at 32 px in one call


@dataclass(frozen=True)
class QATSettings:
    """How long and how hard quantisation-aware distillation trains (``robkit export --qat``).

    Defaults: a few hundred steps on 2,048 unlabelled training images (about a minute for a 32 px
    MobileNetV3-Small on 2 CPU cores); ``lr``: Adam's learning rate, cosine-annealed to 0;
    ``observe_steps``: steps the weight-range observers keep moving (default: half the steps);
    ``range_lr``: Adam's learning rate for the activation ranges (scale and zero point, learned from
    the calibrated start; 0 keeps the calibrated ranges fixed).
    """

    steps: int = 300
    images: int = 2048
    batch_size: int = 32
    lr: float = 1e-4
    observe_steps: int | None = None
    range_lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.images < 1:
            raise ValueError(
                "QAT needs steps >= 0, batch_size >= 1, lr > 0 and images >= 1, got "
                f"steps={self.steps}, batch_size={self.batch_size}, lr={self.lr}, images={self.images}"
            )
        if self.range_lr < 0:
            raise ValueError(f"QAT range_lr must be >= 0 (0: fixed activation ranges), got {self.range_lr}")
        if self.checkpoint_every < 1:
            raise ValueError(f"QAT checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as the card records them."""
        return asdict(self)


@dataclass(frozen=True)
class QATRun:
    """One quantisation-aware distillation before an int8 conversion: its settings, its training
    images (in the file's input format, after the calibration and search images), its resumable state
    file, and the target runtime's fake-quantiser factory (``keep -> quantizer``), which the format's
    converter fills in with :meth:`for_quantizer`.
    """

    settings: QATSettings
    images: Tensor
    state: Path | None = None
    quantizer_factory: Callable[[Callable | None], Any] | None = None

    def for_quantizer(self, factory: Callable[[Callable | None], Any]) -> QATRun:
        """A copy of this run with the target runtime's QAT quantiser factory."""
        return replace(self, quantizer_factory=factory)


@dataclass
class QATResult:
    """What quantisation-aware distillation did: steps, wall time, loss curve, held-out cosines."""

    steps: int
    seconds: float
    lr: float
    losses: list[float] = field(default_factory=list)
    cosine_before: float | None = None  # fake-quantised, after calibration only (PTQ-equivalent)
    cosine_after: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the model card."""
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "lr": self.lr,
            "loss_first": round(self.losses[0], 5) if self.losses else None,
            "loss_last": round(self.losses[-1], 5) if self.losses else None,
            "cosine_before": None if self.cosine_before is None else round(self.cosine_before, 5),
            "cosine_after": None if self.cosine_after is None else round(self.cosine_after, 5),
        }


@functools.cache
def _range_fake_quantize() -> Any:
    """The learnable-range fake-quantiser: torchao's ``LearnableFakeQuantize`` (LSQ) with the runtimes'
    smallest scale, ``EPS``, as the floor its scales are clamped to (its own floor is float32's machine
    epsilon, below what TFLite accepts).
    """
    from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize

    class RangeFakeQuantize(LearnableFakeQuantize):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.eps.fill_(EPS)

        def clamp_(self) -> None:
            """Keep the learned range one the runtime accepts: scale >= eps, zero point in range."""
            if self.scale is not None and self.zero_point is not None:
                self.scale.data.clamp_(min=EPS)
                self.zero_point.data.clamp_(self.quant_min, self.quant_max)

    return RangeFakeQuantize


def fake_quant_config(ptq: Any) -> Any:
    """A runtime's post-training static config (litert-torch's or XNNPACK's ``QuantizationConfig``) as
    QAT fake-quantisers: the same dtypes, ranges and schemes; activations by learnable ranges
    (:func:`_range_fake_quantize`) started from the PTQ ``HistogramObserver`` on the calibration
    images (then learned or fixed by :func:`qat_distill`), weights by moving-average per-channel
    min/max; both with the ``eps`` the PTQ observers use (2**-12 in both runtimes).
    """
    import dataclasses

    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import HistogramObserver, MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    a, w = ptq.input_activation, ptq.weight
    act = QuantizationSpec(
        dtype=a.dtype,
        quant_min=a.quant_min,
        quant_max=a.quant_max,
        qscheme=a.qscheme,
        is_dynamic=False,
        observer_or_fake_quant_ctr=_range_fake_quantize().with_args(observer=HistogramObserver, eps=EPS),
    )
    weight = QuantizationSpec(
        dtype=w.dtype,
        quant_min=w.quant_min,
        quant_max=w.quant_max,
        qscheme=w.qscheme,
        ch_axis=w.ch_axis,
        is_dynamic=False,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, eps=EPS
        ),
    )
    return dataclasses.replace(ptq, input_activation=act, output_activation=act, weight=weight, is_qat=True)


def litert_qat_config() -> Any:
    """litert-torch's symmetric per-channel static config, as fake-quantisers that keep ``eps``."""
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config

    return fake_quant_config(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))


def litert_qat_quantizer(keep: Callable | None = None) -> Any:
    """litert-torch's PT2E quantiser with :func:`litert_qat_config`, static patterns only (BN folded)."""
    from robkit.export.tflite_format import _filtered_quantizer

    return _filtered_quantizer(keep, litert_qat_config(), static_qat_only_ops=[])


def _fake_quant_modules(gm: nn.Module) -> Iterator[Any]:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    return (m for m in gm.modules() if isinstance(m, FakeQuantizeBase))


def calibrate(gm: nn.Module, x: Tensor, batch_size: int | None = None) -> None:
    """Observers see ``x`` before any weight moves, ``batch_size`` images per call (default: as many as
    ``CALIBRATION_PIXELS`` allows, so 32 px images go in one call): the activation histograms
    accumulate every call (the weight observers see the same, unchanged weights each time).
    """
    from robkit.export.quantize import calibrate_histograms

    if batch_size is None:
        batch_size = max(1, CALIBRATION_PIXELS // max(1, x.shape[-1] * x.shape[-2]))
    calibrate_histograms(gm, [x[i : i + batch_size] for i in range(0, len(x), batch_size)])


def _range_modules(gm: nn.Module) -> list[Any]:
    """The activation fake-quantisers whose ranges can be learned, in graph order."""
    cls = _range_fake_quantize()
    return [m for m in gm.modules() if isinstance(m, cls)]


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1).mean())


def _fingerprint(tensors: Any) -> str:
    """sha256 of tensors' bytes (what a resumed run must share with the stored one)."""
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, Tensor):
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _quantizer_name(factory: Callable) -> str:
    return f"{getattr(factory, '__module__', '')}.{getattr(factory, '__qualname__', repr(factory))}"


def _read_state(path: str | os.PathLike, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The stored state at ``path`` if it belongs to this run; refuses one of another run."""
    from robkit.utils.files import safe_load

    path = Path(path)
    if not path.is_file():
        return None
    stored = safe_load(path)
    changed = leaf_diff(stored.get("identity", {}), identity)
    if changed:
        raise ResumeMismatch(
            f"{path} holds the state of another QAT run; changed: {'; '.join(changed)}. "
            f"Run again with the stored settings to resume, or delete {path} to start over."
        )
    return stored


def prepare_qat(
    module: nn.Module, example: Tensor, quantizer: Any
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """``(fake-quantised trainable graph, fp32 reference graph)`` of ``module``, BatchNorm folded in both."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    batch = ({0: torch.export.Dim.AUTO},)  # trained on batches, converted and run at batch 1
    pair = torch.cat([example, example])  # a batch of 2: a batch of 1 would fix the size
    # Exported graphs share their parameters with the module they came from: each graph gets its own
    # copy, so training never changes the caller's student and the reference stays the fp32 one.
    gm = torch.export.export(copy.deepcopy(module).eval(), (pair,), dynamic_shapes=batch).module()
    _fuse_conv_bn_(gm)  # the folded weights are the ones the file stores and QAT trains
    reference = torch.export.export(copy.deepcopy(module).eval(), (pair,), dynamic_shapes=batch).module()
    for p in reference.parameters():
        p.requires_grad_(False)
    gm = prepare_qat_pt2e(gm, quantizer)
    for p in gm.parameters():  # the folded BatchNorm biases come out frozen; they are what QAT corrects most
        p.requires_grad_(True)
    return gm, reference


def qat_distill(
    module: nn.Module,
    example: Tensor,
    train_x: Tensor,
    held_out_x: Tensor | None = None,
    *,
    keep: Callable | None = None,
    quantizer_factory: Callable[[Callable | None], Any] = litert_qat_quantizer,
    settings: QATSettings | None = None,
    progress: bool = True,
    state: str | os.PathLike | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.fx.GraphModule, Any, QATResult]:
    """Quantisation-aware distillation of ``module`` on ``train_x`` (inputs in the file's format):
    ``(converted int8-simulated graph, quantizer, result)``; ``settings``: steps, batch size, learning
    rate, observer steps, seed and checkpoint interval (default :class:`QATSettings`' defaults;
    ``settings.images`` is the caller's business, ``train_x`` is already that slice).

    The converted graph goes to the same converters as a post-training one (e.g.
    :func:`robkit.export.tflite_format.convert_static_int8`). ``held_out_x``: images not trained on,
    on which the cosine to the fp32 module is reported before and after. ``state``: the resumable
    state file (see the module docstring); ``on_step(step)`` is called after each finished step.
    """
    import time

    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    from tqdm import tqdm

    s = settings if settings is not None else QATSettings()
    steps, batch_size, lr = s.steps, s.batch_size, s.lr
    t0 = time.time()
    quantizer = quantizer_factory(keep)
    gm, reference = prepare_qat(module, example, quantizer)
    observe = steps // 2 if s.observe_steps is None else s.observe_steps
    g = torch.Generator().manual_seed(s.seed)
    identity = {
        "version": STATE_VERSION,
        "module_sha256": _fingerprint(module.state_dict().values()),
        "train_sha256": _fingerprint([train_x]),
        "held_out_sha256": None if held_out_x is None else _fingerprint([held_out_x]),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "observe_steps": observe,
        "range_lr": s.range_lr,
        "calibration_images": CALIBRATION_IMAGES,
        "seed": s.seed,
        "quantizer": _quantizer_name(quantizer_factory),
    }
    result = QATResult(steps=steps, seconds=0.0, lr=lr)
    ref_held = None
    if held_out_x is not None:
        with torch.no_grad():
            ref_held = reference(held_out_x)
    # Calibration runs for a resumed run too (it is deterministic and creates the learnable range
    # parameters the stored state then overwrites).
    move_exported_model_to_eval(gm)
    calibrate(gm, train_x[:CALIBRATION_IMAGES])
    ranges = _range_modules(gm)
    for fq in ranges:  # from here the activation ranges are learned, or stay where calibration put them
        if s.range_lr > 0:
            fq.enable_range_learning()
        else:
            fq.disable_observer()
    range_params = {id(p) for fq in ranges for p in (fq.scale, fq.zero_point) if p is not None}
    groups = [
        {"params": [p for p in gm.parameters() if p.requires_grad and id(p) not in range_params], "lr": lr}
    ]
    if s.range_lr > 0:
        groups.append(
            {
                "params": [p for p in gm.parameters() if p.requires_grad and id(p) in range_params],
                "lr": s.range_lr,
            }
        )
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    start = 0
    stored = _read_state(state, identity) if state is not None else None
    if stored is not None:
        gm.load_state_dict(stored["graph"])
        opt.load_state_dict(stored["optimizer"])
        sched.load_state_dict(stored["scheduler"])
        g.set_state(stored["generator"])
        start, result.losses = int(stored["step"]), list(stored["losses"])
        result.cosine_before = stored["cosine_before"]
        t0 -= float(stored["seconds"])
    elif held_out_x is not None and ref_held is not None:
        with torch.no_grad():
            result.cosine_before = _cosine(gm(held_out_x), ref_held)

    def save(step: int) -> None:
        if state is None:
            return
        atomic_save(
            {
                "identity": identity,
                "step": step,
                "graph": gm.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "generator": g.get_state(),
                "losses": result.losses,
                "cosine_before": result.cosine_before,
                "seconds": time.time() - t0,
            },
            state,
        )

    def batches() -> Iterator[Tensor]:
        for _ in range(start, steps):
            yield train_x[torch.randint(len(train_x), (batch_size,), generator=g)]

    # BatchNorm is folded, so train mode only changes what the fake-quantisers do (observe, fake-quant)
    move_exported_model_to_train(gm)
    bar = tqdm(batches(), total=steps, initial=start, desc="QAT", unit="step", disable=not progress)
    for step, x in enumerate(bar, start=start):
        if step == observe:  # the flags are buffers: a resumed run past this step has them already
            for fq in _fake_quant_modules(gm):
                fq.disable_observer()
        with torch.no_grad():
            target = reference(x)
        loss = 1 - F.cosine_similarity(gm(x).flatten(1), target.flatten(1), dim=1).mean()
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"QAT loss is {float(loss)} at step {step} (lr {lr}); lower the learning rate (--qat-lr)"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for fq in ranges:
            fq.clamp_()
        result.losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{result.losses[-1]:.5f}")
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == steps:
            save(step + 1)
        if on_step is not None:
            on_step(step)
    move_exported_model_to_eval(gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    converted = convert_pt2e(gm, fold_quantize=False)
    converted.training = False
    if held_out_x is not None and ref_held is not None:
        with torch.no_grad():
            result.cosine_after = _cosine(converted(held_out_x), ref_held)
    result.seconds = time.time() - t0
    return converted, quantizer, result
