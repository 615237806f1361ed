"""Core ML: structural checks of the mlprogram on Linux (it cannot execute here), numeric run on macOS."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import MEAN, RES, STD
from torch import nn

from robkit.export.coreml_format import can_run_coreml
from robkit.export.images import load_images
from robkit.export.targets import get_target

LABELS = ["shirt", "shoe", "bag"]


@pytest.fixture(scope="module")
def vit_and_probe():
    from robkit.models.students import build_student

    torch.manual_seed(0)
    student = build_student("vit_tiny").eval()  # built for 224, exported at 32 (position table resampled)
    probe = nn.Sequential(nn.BatchNorm1d(192, affine=False), nn.Linear(192, 3)).eval()
    return student, probe


@pytest.mark.parametrize("name", ["ios-coreml-fp16", "ios-coreml-int8"])
def test_vit_classifier_mlprogram_structure(vit_and_probe, tmp_path, name):
    import coremltools as ct

    from robkit.export.exporter import export_model

    student, probe = vit_and_probe
    res = export_model(
        student,
        get_target(name),
        tmp_path / "m",
        probe=probe,
        labels=LABELS,
        parity_images=8,
        meta={"normalization": {"mean": MEAN, "std": STD}, "resolution": RES, "method": "dino"},
    )
    spec = ct.models.MLModel(str(res.path), skip_model_load=True).get_spec()
    (inp,) = spec.description.input
    assert inp.name == "image" and inp.type.WhichOneof("Type") == "imageType"
    assert (inp.type.imageType.width, inp.type.imageType.height) == (RES, RES)
    assert {o.name for o in spec.description.output} >= {"classLabel", "classLabel_probs"}
    # What makes Vision's VNCoreMLRequest return VNClassificationObservation with these names:
    # the model is declared a classifier, and its classify op holds the label strings.
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.predictedProbabilitiesName == "classLabel_probs"
    probs = next(o for o in spec.description.output if o.name == "classLabel_probs")
    assert probs.type.WhichOneof("Type") == "dictionaryType"
    assert probs.type.dictionaryType.WhichOneof("KeyType") == "stringKeyType"
    ops = [
        op
        for f in spec.mlProgram.functions.values()
        for b in f.block_specializations.values()
        for op in b.operations
    ]
    classify = [op for op in ops if op.type == "classify"]
    assert len(classify) == 1
    blob = classify[0].SerializeToString() + b"".join(
        op.SerializeToString() for op in ops if op.type == "const"
    )
    assert all(label.encode() in blob for label in LABELS)
    md = dict(spec.description.metadata.userDefined)
    assert json.loads(md["robkit.labels"]) == LABELS
    assert json.loads(md["robkit.normalization"])["std"] == STD
    assert md["com.apple.coreml.model.preview.type"] == "imageClassifier"
    conv = res.card["conversion"]
    assert conv["ops"]["layer_norm"] == 25 and conv["ops"]["softmax"] >= 12  # native ops, 12 blocks
    if name == "ios-coreml-int8":
        assert conv["weights"]["constexpr_affine_dequantize"] >= 49  # every Linear stored as int8
    else:
        assert conv["weights"].get("float16", 0) >= 49
    if not can_run_coreml():
        assert res.card["status"].startswith("passed (structural") and "macOS" in res.parity.note
    # the proxy (PyTorch with the file's weight rounding) agrees with fp32 PyTorch
    assert res.parity.cosine > 0.99 and res.parity.top1_agreement >= 0.85


def test_image_input_expects_pixels_scaled_to_unit_range(vit_and_probe, tmp_path):
    """The graph sees ImageType's pixel/255; normalisation happens inside: check on the wrapper."""
    from robkit.export.wrappers import build_export_module, make_inputs

    student, probe = vit_and_probe
    t = get_target("ios-coreml-fp16")
    u8, _ = load_images("fashion-mnist", "test", 4, RES)
    x = make_inputs(u8, t, MEAN, STD)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    wrapped = build_export_module(student, t, MEAN, STD, probe=probe, resolution=RES)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = probe(student((u8.float() / 255 - m) / s)).softmax(-1)
        torch.testing.assert_close(wrapped(x), ref, rtol=1e-4, atol=1e-5)


def test_palettised_parity_uses_the_look_up_tables_written_in_the_file(tmp_path):
    """The Linux proxy of a palettised package computes with the file's own LUT weights, read back."""
    import copy

    import numpy as np
    from export_helpers import make_student, normalised

    from robkit.export import coreml_format as C
    from robkit.export.exporter import export_model
    from robkit.export.quantize import QUANTIZABLE

    student = make_student("mobilenet_v3_small").eval()
    target = get_target("ios-coreml-palette6")
    meta = {"normalization": {"mean": MEAN, "std": STD}, "resolution": RES}
    res = export_model(student, target, tmp_path / "pal", parity_images=16, meta=meta, strict=False)
    weights = C.file_weights(res.path)
    folded = C.fold_batchnorm(copy.deepcopy(student))  # the converter stores BatchNorm folded in
    big = [m.weight for m in folded.modules() if isinstance(m, QUANTIZABLE) and m.weight.numel() > 2048]
    assert len(weights) == len(big) == res.card["conversion"]["compressed_weights_read_back"]
    for w, p in zip(weights, big, strict=True):
        assert w.shape == tuple(p.shape) and len(np.unique(w)) <= 2**6  # a 6-bit palette
        rel = np.linalg.norm(w - p.detach().numpy()) / np.linalg.norm(p.detach().numpy())
        assert rel < 0.2  # the palette approximates this very weight: the order lines up
    # the parity figure is the proxy built from those weights, recomputed here
    u8, _ = load_images("fashion-mnist", "test", 16, RES)
    with torch.no_grad():
        ref = student(normalised(u8))
        sim = C.simulated_module(student, target, weights)(normalised(u8))
    cos = torch.nn.functional.cosine_similarity(ref, sim, dim=1).mean().item()
    assert res.card["parity"]["cosine"] == pytest.approx(cos, abs=2e-3)
    assert "read back from the file" in res.card["parity"]["note"]
