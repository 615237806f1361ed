"""Run an exported TFLite file in MediaPipe Tasks and compare with the PyTorch student.

    python benchmarks/mediapipe_parity.py demo/export/mobilenet_v3_small-android-tflite-int8.tflite \
        demo/rob/checkpoint.pt --images 32

Fashion-MNIST test images, resized to the model's resolution beforehand (so MediaPipe does not resize),
fed as RGB bytes. An embedding file goes through ImageEmbedder: the mean and minimum cosine of its
embeddings against PyTorch's. A classifier file (exported with a probe or from `robkit finetune`) goes
through ImageClassifier: top-1 agreement with PyTorch and accuracy against the true labels.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from robkit.export import mediapipe_client
from robkit.export.images import load_images
from robkit.models.checkpoint import checkpoint_classifier, load_student

ap = argparse.ArgumentParser()
ap.add_argument("tflite")
ap.add_argument("checkpoint")
ap.add_argument("--probe", help="the probe the classifier file was exported with (robkit eval linear)")
ap.add_argument("--images", type=int, default=32)
a = ap.parse_args()
student, meta = load_student(a.checkpoint)
res, norm = int(meta["resolution"]), meta["normalization"]
u8, truth = load_images("fashion-mnist", "test", a.images, res)
m, s = torch.tensor(norm["mean"]).view(1, 3, 1, 1), torch.tensor(norm["std"]).view(1, 3, 1, 1)
with torch.no_grad():
    ref = student((u8.float() / 255 - m) / s)
card = json.loads(Path(a.tflite + ".json").read_text())
if card.get("labels"):
    if a.probe:
        from robkit.evaluation.linear import load_probe

        head = load_probe(a.probe)[0]
    else:
        found = checkpoint_classifier(a.checkpoint)
        assert found is not None, "a classifier file needs --probe or a `robkit finetune` checkpoint"
        head = found[0]
    with torch.no_grad():
        pt_top1 = head(ref).argmax(1)
    top = mediapipe_client.classify(a.tflite, u8)
    got = torch.tensor([t[0] for t in top])
    names_ok = all(name == card["labels"][i] for i, name, _ in top)
    print(
        f"MediaPipe ImageClassifier over {len(top)} images: top-1 agrees with PyTorch on "
        f"{100 * float((got == pt_top1).float().mean()):.1f} %, accuracy {100 * float((got == truth).float().mean()):.1f} %"
        f" (PyTorch {100 * float((pt_top1 == truth).float().mean()):.1f} %), label names match the card: {names_ok}"
    )
else:
    emb = mediapipe_client.embed(a.tflite, u8)
    r = ref.numpy()
    cos = (emb * r).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(r, axis=1)
    print(
        f"MediaPipe ImageEmbedder vs PyTorch over {len(cos)} images: mean cosine {cos.mean():.4f}, min {cos.min():.4f}"
    )
