"""int8 calibration (robkit.export.quantize.calibrate_histograms): a histogram observer's bins are fixed
before any value is counted, so the calibrated ranges do not depend on how the calibration images are
split into calls (post-training int8 feeds them one at a time, QAT at 224 px in slices)."""

from __future__ import annotations

import pytest
import torch
from export_helpers import normalised
from torch import nn

from robkit.export.images import load_images

pytest.importorskip("litert_torch")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.Hardswish(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    u8, _ = load_images("fashion-mnist", "train", 48, 32, offset=7000)
    return normalised(u8)


def _ptq_graph(x: torch.Tensor) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from robkit.export.tflite_format import _filtered_quantizer

    batch = ({0: torch.export.Dim.AUTO},)
    gm = torch.export.export(_net(), (x[:2],), dynamic_shapes=batch).module()
    return prepare_pt2e(gm, _filtered_quantizer(None))


def _histograms(gm: nn.Module) -> list[tuple[float, float, torch.Tensor]]:
    from torchao.quantization.pt2e.observer import HistogramObserver

    return [
        (float(o.min_val), float(o.max_val), o.histogram.clone())
        for o in gm.modules()
        if isinstance(o, HistogramObserver)
    ]


def _plain(gm: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in batches:
            gm(x)


def _spread(a: torch.Tensor, b: torch.Tensor) -> float:
    """L1 distance between two histograms as distributions (0: identical, 2: disjoint)."""
    return float((a / a.sum() - b / b.sum()).abs().sum())


def test_histograms_do_not_depend_on_how_calibration_images_are_split(images):
    from robkit.export.quantize import calibrate_histograms

    whole, single = _ptq_graph(images), _ptq_graph(images)
    assert calibrate_histograms(whole, [images]) >= 4  # input, hard-swish, ReLU, pooled output ...
    calibrate_histograms(single, [images[i : i + 1] for i in range(len(images))])
    h_whole, h_single = _histograms(whole), _histograms(single)
    assert len(h_whole) == len(h_single) >= 4
    for (lo1, hi1, a), (lo2, hi2, b) in zip(h_whole, h_single):
        assert (lo1, hi1) == pytest.approx((lo2, hi2), rel=1e-5, abs=1e-6)
        assert float(a.sum()) == float(b.sum()) > 0  # every value counted once, the priming values not
        assert _spread(a, b) < 1e-3
    x_min, x_max = float(images.min()), float(images.max())
    assert (h_whole[0][0], h_whole[0][1]) == pytest.approx((x_min, x_max))  # the input's global range

    # the plain loop, one image a call, re-bins on every widening call: its histograms are blurred
    plain = _ptq_graph(images)
    _plain(plain, [images[i : i + 1] for i in range(len(images))])
    worst = max(_spread(a, b) for (_, _, a), (_, _, b) in zip(h_whole, _histograms(plain)))
    assert worst > 0.05, worst


def test_qat_calibration_primes_the_fake_quantisers_and_leaves_them_on(images):
    """QAT's calibration primes its learnable-range fake-quantisers too: the first one (the input's, which
    no rounding upstream changes) gets the same range whatever the call split, and the float pass leaves
    every fake-quantiser as it was (fake-quantisation on, the class's own forward back)."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    from robkit.export.qat import _range_modules, calibrate, litert_qat_quantizer, prepare_qat

    def input_range(batch_size: int) -> tuple[float, float]:
        gm, _ = prepare_qat(_net(), images[:1], litert_qat_quantizer(None))
        calibrate(gm, images, batch_size=batch_size)
        fakes = [m for m in gm.modules() if isinstance(m, FakeQuantizeBase)]
        assert fakes and all(int(fq.fake_quant_enabled[0]) == 1 for fq in fakes)
        assert all("forward" not in vars(fq) for fq in fakes)
        first = _range_modules(gm)[0].activation_post_process
        assert float(first.histogram.sum()) == images.numel()  # counted once, the priming values not
        return float(first.min_val), float(first.max_val)

    assert input_range(len(images)) == pytest.approx(input_range(3))
    assert input_range(3) == pytest.approx((float(images.min()), float(images.max())))
