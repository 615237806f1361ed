"""The app's own client: robkit's TFLite files load in MediaPipe Tasks (ImageEmbedder, ImageClassifier)
as they are, and on real images MediaPipe's outputs match the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import MEAN, RES, STD, cos, make_student, normalised, save_student_checkpoint

from robkit.export.images import load_images
from robkit.export.targets import get_target

mp = pytest.importorskip("mediapipe")
from mediapipe.tasks.python import vision  # noqa: E402
from mediapipe.tasks.python.core import base_options as mp_base  # noqa: E402

META = {"normalization": {"mean": MEAN, "std": STD}, "resolution": RES}
# every TFLite target robkit ships: float, fp16 weights, static int8, dynamic-range int8, uint8 input
TARGETS = [
    "android-tflite-fp32",
    "android-tflite-fp16",
    "android-tflite-int8",
    "android-tflite-int8-dynamic",
    "android-tflite-int8-uint8",
]


def mp_images(u8: torch.Tensor) -> list:
    """RGB images at the model's resolution (MediaPipe does not resize them)."""
    arr = u8.permute(0, 2, 3, 1).contiguous().numpy()
    return [mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(a)) for a in arr]


@pytest.fixture(scope="module")
def student():
    return make_student("mobilenet_v3_small").eval()


@pytest.fixture(scope="module")
def test_images():
    u8, _ = load_images("fashion-mnist", "test", 24, RES, offset=300)
    return u8


@pytest.mark.parametrize("name", TARGETS)
def test_image_embedder_matches_pytorch(name, student, test_images, tmp_path):
    from robkit.export.exporter import export_model

    target = get_target(name)
    res = export_model(student, target, tmp_path / "emb", calibration_images=32, parity_images=16, meta=META)
    options = vision.ImageEmbedderOptions(base_options=mp_base.BaseOptions(model_asset_path=str(res.path)))
    with vision.ImageEmbedder.create_from_options(options) as embedder:
        out = np.stack([embedder.embed(im).embeddings[0].embedding for im in mp_images(test_images)])
    with torch.no_grad():
        ref = student(normalised(test_images)).numpy()
    assert out.shape == ref.shape
    assert cos(out, ref) >= target.parity["min_cosine"]
    # the file stores what its name says: every convolution's weights int8 in a static int8 file
    # (the search's float layers excepted), float32 or float16 otherwise
    weights = res.card["conversion"]["weights"]
    stored = {"fp32": "float32", "fp16": "float16"}.get(target.precision, "int8")
    floats = len((res.card.get("quantization") or {}).get("float_layers", []))
    assert sum(weights.values()) >= 50 and weights.get(stored, 0) >= sum(weights.values()) - floats, weights


def test_image_classifier_labels_and_top1(student, test_images, tmp_path):
    from robkit.evaluation.linear import LinearProbe
    from robkit.export.exporter import export_model

    torch.manual_seed(2)
    probe = LinearProbe(576, 10, bn=False)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.randn(10, 576) * 0.05)
    probe.eval()
    labels = [f"class{i}" for i in range(10)]
    target = get_target("android-tflite-fp32")
    res = export_model(
        student, target, tmp_path / "cls", probe=probe, labels=labels, parity_images=16, meta=META
    )
    options = vision.ImageClassifierOptions(
        base_options=mp_base.BaseOptions(model_asset_path=str(res.path)), max_results=1
    )
    with vision.ImageClassifier.create_from_options(options) as classifier:
        top = [classifier.classify(im).classifications[0].categories[0] for im in mp_images(test_images)]
    with torch.no_grad():
        ref = probe(student(normalised(test_images))).numpy()
    assert [c.category_name for c in top] == [labels[i] for i in ref.argmax(1)]
    assert [c.index for c in top] == list(ref.argmax(1))
    np.testing.assert_allclose([c.score for c in top], ref.max(1), rtol=1e-3, atol=1e-3)


def test_a_finetuned_classifier_is_labelled_by_mediapipe(tmp_path):
    """`robkit finetune` → `robkit export` (no --probe) → MediaPipe ImageClassifier returns Fashion-MNIST's
    class names, the classes PyTorch predicts, on real test images."""
    from robkit.data.datasets import fashion_mnist
    from robkit.evaluation.finetune import finetune
    from robkit.export.exporter import export_checkpoint
    from robkit.models.checkpoint import checkpoint_classifier, load_student

    src = save_student_checkpoint(make_student("mobilenet_v3_small"), tmp_path / "src.pt", seed=0)
    _, out = finetune(src, out=tmp_path / "ft", mode="linear", train_limit=512, test_limit=32, progress=False)
    res = export_checkpoint(
        out / "checkpoint.pt", target="android-tflite-int8", parity_images=16, calibration_images=32
    )
    names = list(fashion_mnist("test", limit=1).classes)
    assert res.card["labels"] == names
    u8, truth = load_images("fashion-mnist", "test", 48, RES, offset=700)
    options = vision.ImageClassifierOptions(
        base_options=mp_base.BaseOptions(model_asset_path=str(res.path)), max_results=1
    )
    with vision.ImageClassifier.create_from_options(options) as classifier:
        top = [classifier.classify(im).classifications[0].categories[0] for im in mp_images(u8)]
    student, _ = load_student(out / "checkpoint.pt")
    head, _ = checkpoint_classifier(out / "checkpoint.pt")
    with torch.no_grad():
        ref = head(student(normalised(u8))).argmax(1)
    got = torch.tensor([c.index for c in top])
    assert [c.category_name for c in top] == [names[i] for i in got]
    assert float((got == ref).float().mean()) >= get_target("android-tflite-int8").parity["min_top1"]
    assert float((got == truth).float().mean()) > 0.3  # ten classes: chance is 0.1
