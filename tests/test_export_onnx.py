"""ONNX round trips through the CLI: fp32, int8 with calibration, NHWC uint8 input, metadata, bench."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from export_helpers import MEAN, RES, STD, cos, make_student, normalised, save_student_checkpoint
from torch import nn

from robkit.cli import main
from robkit.export.images import load_images


def make_student_checkpoint(path, arch: str = "resnet18"):
    """:func:`make_student` saved as a robkit checkpoint."""
    student = make_student(arch)
    save_student_checkpoint(
        student,
        path,
        arch=arch,
        config={"recipe": "sslight", "data": "fashion-mnist", "epochs": 1},
        metrics={"knn_top1": 0.5},
    )
    return student.eval()


def run_ort(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    student = make_student_checkpoint(d / "ckpt.pt")
    return d, student


@pytest.fixture(scope="module")
def fp32_file(setup):
    d, _ = setup
    r = CliRunner().invoke(
        main,
        ["export", str(d / "ckpt.pt"), "--format", "onnx", "--out", str(d / "m"), "--parity-images", "16"],
    )
    assert r.exit_code == 0, r.output
    return d / "m.onnx", r.output


def test_fp32_roundtrip_matches_pytorch_on_real_images(setup, fp32_file):
    import onnx

    d, student = setup
    path, output = fp32_file
    u8, _ = load_images("fashion-mnist", "test", 8, RES, offset=100)
    x = normalised(u8)
    with torch.no_grad():
        ref = student(x).numpy()
    out = run_ort(path, x.numpy())  # batch 8 through the dynamic batch axis
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain == "") >= 18
    assert "next: robkit bench" in output and "parity" in output


def test_metadata_in_file_and_card(setup, fp32_file):
    import hashlib

    from robkit.export.onnx_format import read_metadata

    path, _ = fp32_file
    md = read_metadata(path)
    assert json.loads(md["robkit.normalization"])["mean"] == MEAN
    assert json.loads(md["robkit.input"])["layout"] == "NCHW"
    assert md["robkit.recipe"] == "sslight" and md["robkit.method"] == "dino"
    card = json.loads((path.parent / "m.onnx.json").read_text())
    assert card["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["conversion"]["opset"] >= 18 and card["status"] == "passed"
    assert card["input"]["range"] == "normalized" and card["output"] == {
        "kind": "embedding",
        "dim": 512,
        "name": "output",
    }
    assert card["epochs"] == 1 and card["metrics"] == {"knn_top1": 0.5} and card["parity"]["cosine"] > 0.9999


def test_int8_classifier_with_nhwc_uint8_input(setup):
    """Static int8 calibrated on real images, raw NHWC pixels in, logits out, top-1 vs PyTorch."""
    from robkit.export.exporter import export_model
    from robkit.export.targets import resolve_target

    d, student = setup
    torch.manual_seed(1)
    probe = nn.Sequential(nn.BatchNorm1d(512, affine=False), nn.Linear(512, 10)).eval()
    u8, _ = load_images("fashion-mnist", "train", 64, RES, offset=7000)
    with torch.no_grad():
        probe.train()(student(normalised(u8)))  # give the probe's BatchNorm real statistics
    probe.eval()
    target = resolve_target(target="onnx-int8-cpu", layout="NHWC", input_dtype="uint8")
    target.parity["min_top1"] = 0.8  # an untrained model's logits have near-ties; 32 images give 1/32 steps
    labels = [f"c{i}" for i in range(10)]
    res = export_model(
        student,
        target,
        d / "q",
        probe=probe,
        labels=labels,
        calibration_images=32,
        parity_images=32,
        meta={"normalization": {"mean": MEAN, "std": STD}, "resolution": RES},
    )
    u8, _ = load_images("fashion-mnist", "test", 16, RES, offset=300)
    out = run_ort(res.path, u8.permute(0, 2, 3, 1).contiguous().numpy())
    with torch.no_grad():
        ref = probe(student(normalised(u8)))
    assert cos(out, ref) > 0.98
    assert (out.argmax(1) == ref.argmax(1).numpy()).mean() >= 0.8
    import onnx

    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert res.card["input"]["dtype"] == "uint8" and res.card["normalization"]["applied_in_model"]
    assert res.card["labels"] == labels and res.card["calibration"]["images"] == 32
    search = res.card["quantization"]["search"]
    assert (
        search[0]["float_layers"] == 0
        and len(res.card["quantization"]["float_layers"]) == search[-1]["float_layers"]
    )


def test_unsupported_combination_is_a_clear_cli_error(setup):
    d, _ = setup
    r = CliRunner().invoke(main, ["export", str(d / "ckpt.pt"), "--format", "onnx", "--precision", "fp16"])
    assert r.exit_code != 0
    assert "supported precision values for onnx: fp32, int8" in r.output


def test_bench_table_json_plot_and_card_latency(setup, fp32_file, tmp_path):
    d, _ = setup
    path, _ = fp32_file
    merged = tmp_path / "phone.txt"
    merged.write_text(
        "Graph: [m.tflite]\nInference timings in us: Init: 1, First inference: 2, "
        "Warmup (avg): 3, Inference (avg): 2500\n"
    )
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    r = CliRunner().invoke(
        main,
        [
            "bench",
            str(path),
            "--checkpoint",
            str(d / "ckpt.pt"),
            "--threads",
            "1",
            "--rounds",
            "5",
            "--warmup",
            "1",
            "--json",
            str(js),
            "--plot",
            str(png),
            "--merge",
            str(merged),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "median ms" in r.output and "m.onnx" in r.output and "not reachable" in r.output
    rows = json.loads(js.read_text())["rows"]
    onnx_row = next(x for x in rows if x["name"] == "m.onnx")
    assert onnx_row["median_ms"] > 0 and onnx_row["p90_ms"] >= onnx_row["median_ms"]
    assert onnx_row["macs_g"] == pytest.approx(0.0373, rel=0.05)  # ResNet-18 at 32 px: 1.82 GMACs / 49
    assert any(x["source"].startswith("on-device") and x["median_ms"] == 2.5 for x in rows)
    assert any(x["runtime"] == "torch eager" for x in rows)
    assert png.stat().st_size > 1000
    card = json.loads((path.parent / "m.onnx.json").read_text())
    assert card["latency"]["1t"]["median_ms"] == onnx_row["median_ms"]


def test_eval_runs_the_exported_file_itself(setup, fp32_file):
    """`robkit eval knn FILE` embeds through the file's runtime: an fp32 file gives the checkpoint's
    accuracy; an NHWC uint8 int8 file is fed raw pixels; a Core ML package says it needs macOS."""
    from robkit.evaluation.api import evaluate
    from robkit.export.exporter import export_model
    from robkit.export.filemodel import ExportedFileModel
    from robkit.export.targets import resolve_target

    d, student = setup
    path, _ = fp32_file
    limits = ["--train-limit", "300", "--test-limit", "100", "--json"]
    r_file = CliRunner().invoke(main, ["eval", "knn", str(path), *limits])
    r_ckpt = CliRunner().invoke(main, ["eval", "knn", str(d / "ckpt.pt"), *limits])
    assert r_file.exit_code == 0 and r_ckpt.exit_code == 0, r_file.output + r_ckpt.output
    res_file = json.loads(r_file.output[r_file.output.index("{") :])
    res_ckpt = json.loads(r_ckpt.output[r_ckpt.output.index("{") :])
    assert res_file["exported"]["runtime"] == "onnxruntime" and res_file["resolution"] == RES
    assert res_file["knn"]["accuracy"] == pytest.approx(res_ckpt["knn"]["accuracy"], abs=0.011)

    target = resolve_target(target="onnx-int8-cpu", layout="NHWC", input_dtype="uint8")
    q = export_model(
        student,
        target,
        d / "u8",
        calibration_images=32,
        parity_images=16,
        meta={"normalization": {"mean": MEAN, "std": STD}, "resolution": RES},
    )
    u8, _ = load_images("fashion-mnist", "test", 6, RES, offset=300)
    with torch.no_grad():
        feats = ExportedFileModel(q.path)(normalised(u8))
        ref = student(normalised(u8))
    assert cos(feats, ref) > 0.98  # the wrapper undid the normalisation into the pixels the file wants
    assert cos(feats, run_ort(q.path, u8.permute(0, 2, 3, 1).contiguous().numpy())) > 0.9999
    with pytest.raises(ValueError, match="fixed at export"):
        evaluate(str(q.path), resolution=64, train_limit=10, test_limit=10)
    pkg = d / "m.mlpackage"
    pkg.mkdir()
    r = CliRunner().invoke(main, ["eval", "knn", str(pkg)])
    assert r.exit_code != 0 and "macOS" in r.output


@pytest.mark.parametrize("target", ["ort-mobile-fp32", "ort-mobile-int8"])
def test_ort_format_for_onnx_runtime_mobile(setup, tmp_path, target):
    """The .ort file that ships runs in onnxruntime, matches PyTorch and keeps robkit's metadata."""
    d, student = setup
    out = tmp_path / "m"
    r = CliRunner().invoke(
        main,
        [
            "export",
            str(d / "ckpt.pt"),
            "--target",
            target,
            "--out",
            str(out),
            "--parity-images",
            "16",
            "--calibration-images",
            "32",
        ],
    )
    assert r.exit_code == 0, r.output
    path = out.with_suffix(".ort")
    assert path.read_bytes()[4:8] == b"ORTM"  # the ORT flatbuffer identifier, not an ONNX protobuf
    card = json.loads(path.with_suffix(".ort.json").read_text())
    assert card["conversion"]["container"] == "ort" and card["status"] == "passed"
    assert (tmp_path / "m.required_operators.config").is_file()
    u8, _ = load_images("fashion-mnist", "test", 8, RES, offset=100)
    x = normalised(u8)
    with torch.no_grad():
        ref = student(x).numpy()
    got = run_ort(path, x.numpy())
    from robkit.export.targets import get_target

    assert cos(got, ref) >= get_target(target).parity["min_cosine"]
    import onnxruntime as ort

    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert json.loads(meta.custom_metadata_map["robkit.normalization"])["mean"] == MEAN
