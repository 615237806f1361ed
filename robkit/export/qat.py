"""Quantisation-aware distillation: fine-tune the int8-simulated student to match its fp32 self.

Post-training int8 rounds a network that never saw rounding; MobileNetV3's hard-swish and
squeeze-excite layers lose most (BENCHMARKS.md). Here the export module (student + the wrapper's
folded normalisation, exactly what the file computes) is exported once, its BatchNorms are folded
into the convolutions (the folded weights are what the file stores), PT2E inserts fake-quantisers
with the target runtime's quantiser annotations, and the fake-quantised copy is trained to give the
fp32 module's embeddings (``1 - cosine``) on unlabelled training images. The converted graph is then
written by the same converter as post-training int8, so parity is checked the same way.

Facts this follows:

* litert-torch's QAT configuration uses ``FusedMovingAvgObsFakeQuantize``, which drops the
  ``eps=2**-12`` its PTQ observers use (scales below it are what TFLite's converter refuses); the
  configuration here keeps litert-torch's dtypes, ranges and schemes with the unfused
  ``FakeQuantize`` and moving-average observers, which honour ``eps``;
* conv + BatchNorm QAT patterns are not needed once BatchNorm is folded, so only litert-torch's
  static patterns (those PTQ uses) are annotated;
* observers run for the first ``observe_steps`` steps and are then frozen, as torchvision's QAT
  recipe freezes them, so the last steps train against fixed ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
EPS = 2**-12  # litert-torch's observer eps (smallest scale)


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


def litert_qat_config() -> Any:
    """litert-torch's symmetric per-channel static config, as fake-quantisers that keep ``eps``."""
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config
    from litert_torch.quantize.pt2e_quantizer_utils import QuantizationConfig
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import (
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    ptq = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    a, w = ptq.input_activation, ptq.weight
    act = QuantizationSpec(
        dtype=a.dtype,
        quant_min=a.quant_min,
        quant_max=a.quant_max,
        qscheme=a.qscheme,
        is_dynamic=False,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=EPS),
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
    return QuantizationConfig(act, act, weight, ptq.bias, ptq.fixed_qparams, True, False)


def litert_qat_quantizer(keep: Callable | None = None) -> Any:
    """litert-torch's PT2E quantiser with :func:`litert_qat_config`, static patterns only (BN folded)."""
    from robkit.export.tflite_format import _filtered_quantizer

    return _filtered_quantizer(keep, litert_qat_config(), static_qat_only_ops=[])


def _fake_quant_modules(gm: nn.Module) -> Iterator[Any]:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    return (m for m in gm.modules() if isinstance(m, FakeQuantizeBase))


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1).mean())


def prepare_qat(
    module: nn.Module, example: Tensor, quantizer: Any
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """``(fake-quantised trainable graph, fp32 reference graph)`` of ``module``, BatchNorm folded in both."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    batch = ({0: torch.export.Dim.AUTO},)  # trained on batches, converted and run at batch 1
    pair = torch.cat([example, example])  # a batch of 2: a batch of 1 would fix the size
    gm = torch.export.export(module.eval(), (pair,), dynamic_shapes=batch).module()
    _fuse_conv_bn_(gm)  # the folded weights are the ones the file stores and QAT trains
    reference = torch.export.export(module.eval(), (pair,), dynamic_shapes=batch).module()
    for p in reference.parameters():
        p.requires_grad_(False)
    return prepare_qat_pt2e(gm, quantizer), reference


def qat_distill(
    module: nn.Module,
    example: Tensor,
    train_x: Tensor,
    held_out_x: Tensor | None = None,
    *,
    keep: Callable | None = None,
    quantizer_factory: Callable[[Callable | None], Any] = litert_qat_quantizer,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-5,
    observe_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.fx.GraphModule, Any, QATResult]:
    """Quantisation-aware distillation of ``module`` on ``train_x`` (inputs in the file's format):
    ``(converted int8-simulated graph, quantizer, result)``.

    The converted graph goes to the same converters as a post-training one (e.g.
    :func:`robkit.export.tflite_format.convert_static_int8`). ``held_out_x``: images not trained on,
    on which the cosine to the fp32 module is reported before and after.
    """
    import time

    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    from tqdm import tqdm

    if steps < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"QAT needs steps >= 0, batch_size >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    t0 = time.time()
    quantizer = quantizer_factory(keep)
    gm, reference = prepare_qat(module, example, quantizer)
    observe = steps // 2 if observe_steps is None else observe_steps
    g = torch.Generator().manual_seed(seed)

    def batches(n: int) -> Iterator[Tensor]:
        for _ in range(n):
            yield train_x[torch.randint(len(train_x), (batch_size,), generator=g)]

    # calibration pass: observers see the data before any weight moves (the PTQ starting point)
    move_exported_model_to_eval(gm)
    with torch.no_grad():
        for i in range(0, min(len(train_x), 256), batch_size):
            gm(train_x[i : i + batch_size])
    result = QATResult(steps=steps, seconds=0.0, lr=lr)
    if held_out_x is not None:
        with torch.no_grad():
            ref_held = reference(held_out_x)
            result.cosine_before = _cosine(gm(held_out_x), ref_held)
    # BatchNorm is folded, so train mode only changes what the fake-quantisers do (observe, fake-quant)
    move_exported_model_to_train(gm)
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    bar = tqdm(batches(steps), total=steps, desc="QAT", unit="step", disable=not progress)
    for step, x in enumerate(bar):
        if step == observe:
            for fq in _fake_quant_modules(gm):
                fq.disable_observer()
        with torch.no_grad():
            target = reference(x)
        loss = 1 - F.cosine_similarity(gm(x).flatten(1), target.flatten(1), dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        result.losses.append(float(loss))
        bar.set_postfix(loss=f"{float(loss):.5f}")
    move_exported_model_to_eval(gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    converted = convert_pt2e(gm, fold_quantize=False)
    converted.training = False
    if held_out_x is not None:
        with torch.no_grad():
            result.cosine_after = _cosine(converted(held_out_x), ref_held)
    result.seconds = time.time() - t0
    return converted, quantizer, result
