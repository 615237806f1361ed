"""TFLite round trips run in ai-edge-litert: fp32 NHWC classifier from a probe file, static int8 with
uint8 pixel input calibrated on real images, embedded metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from export_helpers import MEAN, RES, STD, cos, make_student, normalised, outlier_cnn, save_student_checkpoint

from robkit.cli import main
from robkit.export.images import load_images


def run_litert(path, x: np.ndarray) -> np.ndarray:
    """Plain interpreter loop, independent of robkit's runner (batch-1 files)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    ys = []
    for xi in x:
        v = xi[None]
        scale, zero = inp["quantization"]
        if inp["dtype"] == np.int8 and scale:
            v = np.clip(np.round(v / scale) + zero, -128, 127)
        it.set_tensor(inp["index"], v.astype(inp["dtype"]))
        it.invoke()
        y = it.get_tensor(out["index"])
        oscale, ozero = out["quantization"]
        ys.append((y.astype(np.float32) - ozero) * oscale if y.dtype != np.float32 else y)
    return np.concatenate(ys)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """`robkit export --format tflite --probe` on a MobileNetV3-Small checkpoint (default target: fp32 NHWC)."""
    from robkit.evaluation.linear import LinearProbe, save_probe

    d = tmp_path_factory.mktemp("tflite")
    student = make_student("mobilenet_v3_small")
    save_student_checkpoint(student, d / "ckpt.pt")
    torch.manual_seed(2)
    probe = LinearProbe(576, 10)
    u8, _ = load_images("fashion-mnist", "train", 64, RES, offset=9000)
    with torch.no_grad():
        probe.train()(student(normalised(u8)))
        probe.linear.weight.copy_(torch.randn(10, 576) * 0.05)  # an untrained but non-trivial classifier
    probe.eval()
    labels = [f"class{i}" for i in range(10)]
    save_probe(d / "probe.pt", probe, labels, {"checkpoint": str(d / "ckpt.pt")})
    r = CliRunner().invoke(
        main,
        [
            "export",
            str(d / "ckpt.pt"),
            "--format",
            "tflite",
            "--probe",
            str(d / "probe.pt"),
            "--out",
            str(d / "cls"),
            "--parity-images",
            "16",
        ],
    )
    assert r.exit_code == 0, r.output
    return d / "cls.tflite", student, probe, labels


def rgb01_nhwc(u8: torch.Tensor) -> np.ndarray:
    """uint8 NCHW pixels as the float NHWC [0, 1] input a mobile TFLite file takes."""
    return (u8.float() / 255).permute(0, 2, 3, 1).contiguous().numpy()


def test_fp32_nhwc_classifier_matches_pytorch(classifier):
    path, student, probe, _ = classifier
    u8, _ = load_images("fashion-mnist", "test", 12, RES, offset=200)
    # the mobile file takes plain RGB in [0, 1] (NHWC): its graph applies the normalisation
    out = run_litert(path, rgb01_nhwc(u8))
    with torch.no_grad():
        ref = probe(student(normalised(u8))).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
    assert (out.argmax(1) == ref.argmax(1)).all()


def test_card_embedded_in_the_flatbuffer_and_sidecar(classifier):
    from robkit.export.tflite_format import read_metadata

    path, _, _, labels = classifier
    embedded = read_metadata(path)
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert embedded["labels"] == labels == sidecar["labels"]
    assert embedded["input"]["layout"] == "NHWC" and embedded["input"]["shape"] == [1, RES, RES, 3]
    assert embedded["normalization"]["mean"] == MEAN and embedded["normalization"]["applied_in_model"]
    assert embedded["input"]["range"] == "0-1"
    assert sidecar["target"] == "android-tflite-fp32" and sidecar["output"]["kind"] == "logits"
    assert sidecar["metadata_embedded"] is True and sidecar["status"] == "passed"


def test_static_int8_uint8_pixels_calibrated_on_real_images(tmp_path):
    from robkit.export.exporter import export_model
    from robkit.export.targets import get_target

    student = make_student("resnet18").eval()
    target = get_target("android-tflite-int8-uint8")
    res = export_model(
        student,
        target,
        tmp_path / "q",
        calibration_images=16,
        parity_images=16,
        meta={"normalization": {"mean": MEAN, "std": STD}, "resolution": RES},
    )
    u8, _ = load_images("fashion-mnist", "test", 12, RES, offset=400)
    out = run_litert(res.path, u8.permute(0, 2, 3, 1).contiguous().numpy())  # raw pixels in
    with torch.no_grad():
        ref = student(normalised(u8))
    assert cos(out, ref) > 0.98
    assert res.card["conversion"]["input_dtype"] == "uint8"
    ops = res.card["conversion"]["ops"]
    assert ops.get("CONV_2D", 0) >= 15 and "QUANTIZE" in ops  # int8 convolutions, float→int8 boundary
    # the file follows the quantise-simulated PyTorch model closely (conversion is faithful)
    assert res.parity.vs_simulated["cosine"] > 0.98
    assert res.card["calibration"] == {"data": "fashion-mnist", "split": "train", "images": 16}


def test_int8_search_keeps_the_breaking_module_float_and_the_file_follows_it(tmp_path):
    """Plain static int8 misses parity (one module's output needs a 1000× wider scale); the search
    keeps that module float, says so in the card, and the file is converted from the searched graph."""
    from robkit.export.exporter import export_model
    from robkit.export.targets import get_target

    net = outlier_cnn()
    res = export_model(
        net,
        get_target("android-tflite-int8"),
        tmp_path / "outlier",
        calibration_images=16,
        parity_images=16,
        meta={"normalization": {"mean": MEAN, "std": STD}, "resolution": RES},
    )
    q = res.card["quantization"]
    assert q["search"][0]["float_layers"] == 0 and q["search"][0]["cosine"] < 0.98  # plain int8 misses
    assert q["float_layers"][0] == "student.2" and len(q["float_layers"]) <= 2  # inside the export wrapper
    assert "drops output cosine" in q["reasons"]["student.2"]
    assert res.passed and res.parity.vs_simulated["cosine"] > 0.999
    u8, _ = load_images("fashion-mnist", "test", 8, RES, offset=400)
    x = normalised(u8)
    with torch.no_grad():
        ref = net(x)
    assert cos(run_litert(res.path, rgb01_nhwc(u8)), ref) > 0.98


def test_a_quantised_graph_output_gets_a_float_output_tensor(tmp_path):
    """litert-torch leaves the output int8 when the last op is quantised; MediaPipe refuses such a
    file. ``float_outputs`` appends the DEQUANTIZE the app would do, with the same numbers."""
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter
    from litert_torch.quantize.quant_config import QuantConfig

    from robkit.export import tflite_format as T

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    example = torch.rand(1, 3, 12, 12)
    gm, quantizer = T.pt2e_quantize(net, example, torch.rand(8, 3, 12, 12), None)
    path = tmp_path / "q.tflite"
    litert_torch.convert(gm, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))

    def run(p, x):
        it = Interpreter(model_path=str(p))
        it.allocate_tensors()
        i, o = it.get_input_details()[0], it.get_output_details()[0]
        it.set_tensor(i["index"], x if i["dtype"] == np.float32 else x.astype(i["dtype"]))
        it.invoke()
        return it.get_tensor(o["index"]), o

    x = example.numpy()
    raw, out = run(path, x)
    assert out["dtype"] == np.int8  # the converter's output: what MediaPipe refuses
    scale, zero = out["quantization"]
    assert T.float_outputs(path) == 1
    y, out2 = run(path, x)
    assert out2["dtype"] == np.float32
    np.testing.assert_array_equal(y, (raw.astype(np.float32) - zero) * scale)
    assert T.float_outputs(path) == 0  # idempotent


def test_hardswish_rewrite_computes_hardswish_and_leaves_the_student_alone():
    from robkit.export.tflite_format import XNNPackHardswish, xnnpack_int8_friendly
    from robkit.models.students import build_student

    x = torch.linspace(-5, 5, 2001)
    assert torch.allclose(XNNPackHardswish()(x), torch.nn.functional.hardswish(x), atol=1e-6)
    student = build_student("mobilenet_v3_small").eval()
    n = sum(isinstance(m, torch.nn.Hardswish) for m in student.modules())
    rewritten, replaced = xnnpack_int8_friendly(student)
    assert n > 0 and replaced == n
    assert not any(isinstance(m, torch.nn.Hardswish) for m in rewritten.modules())
    assert sum(isinstance(m, torch.nn.Hardswish) for m in student.modules()) == n  # the original is untouched
    # the float-fallback search names the same module paths
    assert {k for k, _ in student.named_modules()} == {k for k, _ in rewritten.named_modules()}
    xs = normalised(load_images("fashion-mnist", "train", 4, RES, offset=700)[0])
    with torch.no_grad():
        assert torch.allclose(rewritten(xs), student(xs), atol=1e-5)


def test_static_int8_mobilenet_v3_runs_in_one_xnnpack_partition(tmp_path):
    """LiteRT's XNNPACK delegate takes no int8 HARD_SWISH: left as such, each one runs outside the delegate
    and cuts the graph (an int8 MobileNetV3 was slower than its fp32 file). The int8 file has none, and
    after delegation the whole graph is one XNNPACK partition, as the fp32 file is."""
    from ai_edge_litert.interpreter import Interpreter
    from export_helpers import trained_student

    from robkit.export.exporter import export_model
    from robkit.export.targets import get_target

    meta = {"normalization": {"mean": MEAN, "std": STD}, "resolution": RES}
    res = export_model(
        trained_student(),
        get_target("android-tflite-int8"),
        tmp_path / "q",
        calibration_images=16,
        parity_images=16,
        meta=meta,
    )
    assert res.passed
    conv = res.card["conversion"]
    assert conv["hardswish_rewritten"] > 0 and "HARD_SWISH" not in conv["ops"]
    assert conv["weights"].get("int8", 0) > 0
    it = Interpreter(model_path=str(res.path), num_threads=1)
    it.allocate_tensors()
    assert [o["op_name"] for o in it._get_ops_details()].count("DELEGATE") == 1
