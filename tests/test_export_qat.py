"""Quantisation-aware distillation (robkit.export.qat): on held-out images a MobileNetV3 after QAT is
at least as close to its fp32 self as after post-training int8 with the same quantiser, and the
TFLite file written from the QAT graph computes what that graph computes (run in LiteRT)."""

from __future__ import annotations

import pytest
import torch
from export_helpers import cos, make_student

from robkit.export.images import load_images
from robkit.export.targets import get_target
from robkit.export.wrappers import build_export_module, make_inputs

pytest.importorskip("litert_torch")


@pytest.fixture(scope="module")
def setup():
    target = get_target("android-tflite-int8")
    student = make_student("mobilenet_v3_small", images=128)
    mean, std = [0.286] * 3, [0.353] * 3
    module = build_export_module(student, target, mean, std, resolution=32)
    train_u8, _ = load_images("fashion-mnist", "train", 512, 32, offset=0)
    held_u8, _ = load_images("fashion-mnist", "train", 64, 32, offset=20000)
    return target, module, make_inputs(train_u8, target, mean, std), make_inputs(held_u8, target, mean, std)


def test_qat_is_at_least_as_close_to_fp32_as_ptq_on_held_out_images(setup, tmp_path):
    from robkit.export import tflite_format as T
    from robkit.export.qat import qat_distill

    target, module, train_x, held_x = setup
    example = held_x[:1]
    with torch.no_grad():
        ref = module(held_x)
    ptq, ptq_quantizer = T.pt2e_quantize(module, example, train_x[:64], None)
    c_ptq = cos(T.run_torch_batch1(ptq, held_x), ref)
    qat, quantizer, result = qat_distill(
        module, example, train_x, held_x, steps=60, batch_size=16, lr=1e-4, progress=False
    )
    c_qat = cos(T.run_torch_batch1(qat, held_x), ref)
    assert result.cosine_after == pytest.approx(c_qat, abs=2e-3)
    assert result.losses[-1] < result.losses[0]
    assert c_qat >= c_ptq, (c_qat, c_ptq)
    assert c_qat > result.cosine_before - 1e-3  # training did not undo the calibrated start

    # the files, run in LiteRT: the QAT file is closer to fp32 than the PTQ file
    def in_litert(gm, q, name):
        path = tmp_path / name
        T.convert_static_int8(gm, q, example, path)
        runner = T.TFLiteRunner(path)
        got = torch.cat([torch.as_tensor(runner(held_x[i : i + 1].numpy())) for i in range(16)])
        return path, got

    ptq_path, ptq_got = in_litert(ptq, ptq_quantizer, "ptq.tflite")
    qat_path, qat_got = in_litert(qat, quantizer, "qat.tflite")
    assert cos(qat_got, ref[:16]) >= cos(ptq_got, ref[:16])
    assert cos(qat_got, T.run_torch_batch1(qat, held_x[:16])) > 0.95  # the file is the QAT graph
    types = T.weight_types(qat_path)
    assert types.get("int8", 0) > 0 and types.get("float32", 0) == 0, types


def test_bad_settings_are_refused(setup):
    from robkit.export.qat import qat_distill

    _, module, train_x, _ = setup
    with pytest.raises(ValueError, match="lr > 0"):
        qat_distill(module, train_x[:1], train_x, steps=1, lr=0.0)
