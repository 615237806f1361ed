"""Export building blocks without converters: targets, wrappers, quantisation maths, parity, cards, merge."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from export_helpers import outlier_cnn
from torch import nn

from robkit.export import bench as B
from robkit.export import card as cards
from robkit.export.parity import compare
from robkit.export.quantize import (
    LayerSensitivity,
    cosine,
    fake_quant_act,
    fake_quant_weight,
    graph_sensitivity,
    layer_sensitivity,
    node_filter,
    quantized_units,
    search_float_layers,
    strip_quantization,
)
from robkit.export.targets import (
    CAPABILITIES,
    FORMATS,
    TargetError,
    auto_candidates,
    default_target,
    get_target,
    resolve_target,
    target_names,
)
from robkit.export.wrappers import build_export_module, freeze_input_size, make_inputs
from robkit.models.students import STUDENTS, build_student

MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]


def test_every_catalog_target_is_valid_and_each_format_has_one_default():
    for name in target_names():
        t = resolve_target(target=name)  # validates
        assert t.precision in CAPABILITIES[t.format]["precision"]
        assert 0 < t.parity["min_cosine"] <= 1 and t.parity["images"] > 0
    for fmt in FORMATS:
        assert default_target(fmt).format == fmt
    assert default_target("tflite").name == "android-tflite-fp32"
    for wanted in (
        "android-tflite-int8",
        "android-tflite-fp16",
        "ios-coreml-fp16",
        "ios-coreml-int8",
        "onnx-int8-cpu",
        "onnx-fp32",
        "android-tflite-fp32",
    ):
        assert wanted in target_names()


def test_precision_alone_picks_a_target_of_that_format():
    t = resolve_target("tflite", "int8")
    assert (t.format, t.precision) == ("tflite", "int8")
    assert resolve_target("onnx", "int8").quantization["activation_type"] == "uint8"  # U8S8 on x86


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"fmt": "onnx", "precision": "fp16"}, "supported precision values for onnx: fp32, int8"),
        ({"fmt": "tensorrt"}, "supported formats: onnx, tflite, coreml, executorch"),
        (
            {"target": "ios-coreml-fp16", "input_dtype": "uint8"},
            "supported input_dtype values for coreml: float32",
        ),
        ({"target": "android-tflite-int8-dynamic", "input_dtype": "uint8"}, "needs static int8"),
        ({"fmt": "onnx", "target": "android-tflite-fp32"}, "contradicts"),
        ({"target": "android-tflite-int9"}, "Did you mean"),
    ],
)
def test_unsupported_combinations_name_what_is_supported(kwargs, fragment):
    with pytest.raises(TargetError, match=None) as e:
        resolve_target(**kwargs)
    assert fragment in str(e.value)


def test_auto_candidates_cover_every_student_and_name_real_targets():
    for arch in STUDENTS:
        names = auto_candidates(arch)
        assert names and all(get_target(n) for n in names)


def _normalised(u8: torch.Tensor) -> torch.Tensor:
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (u8.float() / 255 - m) / s


@pytest.mark.parametrize(
    "name", ["onnx-fp32", "android-tflite-fp32", "android-tflite-int8-uint8", "ios-coreml-fp16"]
)
def test_wrapper_input_contracts_compute_the_student_on_normalised_pixels(name):
    torch.manual_seed(0)
    student = build_student("resnet18").eval()
    probe = nn.Linear(512, 4).eval()
    t = get_target(name)
    u8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x = make_inputs(u8, t, MEAN, STD)
    if t.layout == "NHWC":
        assert x.shape == (3, 32, 32, 3)
    assert x.dtype == (torch.uint8 if t.input_dtype == "uint8" else torch.float32)
    wrapped = build_export_module(student, t, MEAN, STD, probe=probe, resolution=32)
    with torch.no_grad():
        expected = probe(student(_normalised(u8)))
        if t.format == "coreml":  # Core ML classifiers output probabilities
            expected = expected.softmax(-1)
        torch.testing.assert_close(wrapped(x), expected, rtol=1e-4, atol=1e-4)


def test_frozen_vit_matches_the_dynamic_one_at_another_resolution():
    torch.manual_seed(0)
    vit = build_student("vit_tiny").eval()  # built for 224, exported at 48
    x = torch.randn(2, 3, 48, 48)
    frozen = freeze_input_size(vit, 48)
    assert not frozen.backbone.dynamic_img_size and vit.backbone.dynamic_img_size  # original untouched
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), vit(x), rtol=1e-5, atol=1e-5)


def test_fake_quant_weight_is_per_channel_symmetric_int8():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(4, 1, 1, 1)
    q = fake_quant_weight(w)
    for c in range(4):
        scale = w[c].abs().max() / 127
        levels = q[c] / scale
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)  # on the int8 grid
        assert (q[c] - w[c]).abs().max() <= scale / 2 + 1e-6  # rounding error of one channel's own scale


def test_fake_quant_act_uses_the_calibrated_range():
    x = torch.linspace(-1, 3, 101)
    q = fake_quant_act(x, -1.0, 3.0)
    scale = 4 / 255
    assert (q - x).abs().max() <= scale / 2 + 1e-6
    assert float(fake_quant_act(torch.tensor([10.0]), -1.0, 3.0)) == pytest.approx(3.0, abs=scale)  # clipped


def test_sensitivity_ranks_an_outlier_layer_first():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        # one activation channel 1000x larger than the rest feeds layer "2" (compensated in its weights, so
        # fp32 is unchanged): a per-tensor 8-bit input scale then rounds every other channel to zero
        net[0].weight[0] *= 1000.0
        net[0].bias[0] = 1000.0
        net[2].weight[:, 0] /= 1000.0
    ranking = layer_sensitivity(net, torch.randn(64, 16))
    assert ranking[0].name == "2"
    assert ranking[0].cosine < ranking[-1].cosine


def test_search_keeps_the_fewest_sensitive_layers_float():
    ranking = [LayerSensitivity(n, c) for n, c in [("a", 0.9), ("b", 0.95), ("c", 0.99), ("d", 0.999)]]
    # each float layer recovers a known amount; the search must stop at the first k meeting the bar
    gain = {"a": 0.05, "b": 0.03, "c": 0.01, "d": 0.0}
    seen = []

    def evaluate(float_layers):
        seen.append(list(float_layers))
        return 0.90 + sum(gain[n] for n in float_layers)

    plan = search_float_layers(ranking, evaluate, min_cosine=0.97, margin=0.005, max_float_fraction=1.0)
    assert plan.float_layers == ["a", "b"] and plan.met
    assert seen == [["a"], ["a", "b"]]  # the caller has scored the all-int8 model already
    assert "0.9000" in plan.reasons["a"]
    bad = search_float_layers(ranking, lambda f: 0.5, min_cosine=0.97, max_float_fraction=1.0)
    assert not bad.met


def test_search_doubles_then_bisects_to_the_fewest_float_layers():
    ranking = [LayerSensitivity(f"l{i}", 0.9) for i in range(40)]
    seen = []

    def evaluate(float_layers):  # each float layer is worth 0.01: 8 of them reach 0.98
        seen.append(len(float_layers))
        return 0.90 + 0.01 * len(float_layers)

    plan = search_float_layers(ranking, evaluate, min_cosine=0.975, margin=0.005)
    assert len(plan.float_layers) == 8 and plan.met
    assert seen == [1, 2, 4, 8, 6, 7]  # doubling to the first hit, then bisection between 4 and 8
    assert [h["float_layers"] for h in plan.history] == seen


def test_parity_metrics_match_an_independent_computation():
    torch.manual_seed(0)
    ref = torch.randn(20, 5)
    out = ref + 0.3 * torch.randn(20, 5)
    rep = compare(
        out.numpy(), ref, runtime="x", classifier=True, thresholds={"min_cosine": 0.0, "min_top1": 0.0}
    )
    cos = [float(torch.dot(o, r) / (o.norm() * r.norm())) for o, r in zip(out.double(), ref.double())]
    assert rep.cosine == pytest.approx(sum(cos) / len(cos), abs=1e-9)
    assert rep.top1_agreement == pytest.approx(float((out.argmax(1) == ref.argmax(1)).float().mean()))
    assert rep.max_abs == pytest.approx(float((out - ref).abs().max()), rel=1e-6)
    failing = compare(
        out, ref, runtime="x", classifier=True, thresholds={"min_cosine": 0.9999, "min_top1": 1.0}
    )
    assert not failing.passed and len(failing.failures) == 2


def test_card_hash_and_update(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"abc" * 1000)
    cards.write_card(f, {"format": "onnx", "latency": None})
    card = json.loads((tmp_path / "m.onnx.json").read_text())
    assert card["file_sha256"] == hashlib.sha256(b"abc" * 1000).hexdigest() and card["file_bytes"] == 3000
    cards.update_card(f, latency={"1t": {"median_ms": 1.5}})
    assert cards.read_card(f)["latency"]["1t"]["median_ms"] == 1.5 and cards.read_card(f)["format"] == "onnx"


def test_merge_reads_tflite_benchmark_model_output_and_json(tmp_path):
    txt = tmp_path / "pixel7.txt"
    txt.write_text(
        "STARTING!\nGraph: [/data/local/tmp/m.tflite]\n#threads used for CPU inference: [4]\n"
        "Inference timings in us: Init: 25018, First inference: 9823, Warmup (avg): 5021.3, Inference (avg): 4312.5\n"
    )
    (row,) = B.parse_merge(txt)
    assert (row.name, row.threads, row.median_ms) == ("m.tflite", 4, 4.312)
    js = tmp_path / "rows.json"
    js.write_text(json.dumps([{"name": "m.mlpackage", "runtime": "coreml", "median_ms": 1.25}]))
    (row,) = B.parse_merge(js)
    assert row.median_ms == 1.25 and row.source == "merged: rows.json"
    bad = tmp_path / "bad.txt"
    bad.write_text("nothing here")
    with pytest.raises(ValueError, match="Inference \\(avg\\)"):
        B.parse_merge(bad)


def test_macs_count_includes_attention_matmuls():
    vit = freeze_input_size(build_student("vit_tiny").eval(), 32)  # 4 patches + cls = 5 tokens
    macs = B.count_macs(vit, torch.zeros(1, 3, 32, 32)) * 1e9
    d, n, depth = 192, 5, 12
    linear = depth * n * (d * 3 * d + d * d + 2 * d * 4 * d) + 4 * 3 * 16 * 16 * d  # blocks + patch embedding
    attention = depth * 2 * n * n * d
    assert macs == pytest.approx(linear + attention, rel=0.01)


def test_graph_sensitivity_finds_the_module_whose_int8_output_breaks_the_model():
    """PT2E (litert-torch's quantiser): the all-int8 graph is calibrated once; the ranking names the
    amplifying module, and removing its quantise/dequantise pair alone repairs the output."""
    pytest.importorskip("litert_torch")
    from robkit.export import tflite_format as T

    net = outlier_cnn()
    torch.manual_seed(1)
    calib, held = torch.randn(16, 3, 12, 12), torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        ref = net(held)
    gm, _ = T.pt2e_quantize(net, calib[:1], calib, node_filter([], net, False))
    assert "2" in set(quantized_units(gm).values())  # the product of module "2" is quantised
    all_int8 = cosine(T.run_torch_batch1(gm, held), ref)
    ranking = graph_sensitivity(gm, held, ref)
    assert ranking[0].name == "2" and ranking[0].cosine < 0.99 < ranking[-1].cosine
    repaired = strip_quantization(gm, ["2"])
    fixed = cosine(T.run_torch_batch1(repaired, held), ref)
    assert all_int8 < 0.99 < fixed
    kinds = lambda g: sum("quantize_per_tensor" in str(n.target) for n in g.graph.nodes)  # noqa: E731
    assert kinds(repaired) < kinds(gm)  # pairs removed from the copy only
    assert cosine(T.run_torch_batch1(gm, held), ref) == pytest.approx(all_int8)


def test_peak_probe_measures_once_per_cpu_and_thread_count(tmp_path):
    cache = tmp_path / "peak.json"
    first = B.measure_peak(1, cache=cache)
    data = json.loads(cache.read_text())
    (key,) = data
    assert first > 1.0 and key.endswith("|1|mlas")  # onnxruntime's MLAS GEMM, not PyTorch's MKL
    data[key] = 123.0
    cache.write_text(json.dumps(data))
    assert B.measure_peak(1, cache=cache) == 123.0  # cached: no second measurement
    assert B.measure_peak(1, cache=cache, refresh=True) != 123.0
