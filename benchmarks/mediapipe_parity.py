"""Run an exported TFLite file in MediaPipe Tasks' ImageEmbedder and compare with the PyTorch student.

    python benchmarks/mediapipe_parity.py demo/export/mobilenet_v3_small-android-tflite-int8.tflite \
        demo/rob/checkpoint.pt --images 32

Fashion-MNIST test images, resized to the model's resolution beforehand (so MediaPipe does not resize),
fed as RGB bytes; prints the mean and minimum cosine of MediaPipe's embeddings against PyTorch's.
"""

import argparse

import mediapipe as mp
import numpy as np
import torch
import torch.nn.functional as F
from mediapipe.tasks.python import BaseOptions, vision

from robkit.data.datasets import fashion_mnist, to_model_input
from robkit.models.checkpoint import load_student

ap = argparse.ArgumentParser()
ap.add_argument("tflite")
ap.add_argument("checkpoint")
ap.add_argument("--images", type=int, default=32)
a = ap.parse_args()
student, meta = load_student(a.checkpoint)
res, norm = int(meta["resolution"]), meta["normalization"]
x = fashion_mnist("test", limit=a.images).images.expand(-1, 3, -1, -1).float()
u8 = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
u8 = u8.round().clamp(0, 255).to(torch.uint8)
opts = vision.ImageEmbedderOptions(base_options=BaseOptions(model_asset_path=a.tflite))
cos = []
with vision.ImageEmbedder.create_from_options(opts) as embedder:
    for img in u8:
        rgb = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
        got = np.asarray(
            embedder.embed(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb)).embeddings[0].embedding
        )
        with torch.no_grad():
            ref = student(to_model_input(img[None], res, norm["mean"], norm["std"]))[0].numpy()
        cos.append(float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref)))
print(
    f"MediaPipe ImageEmbedder vs PyTorch over {len(cos)} images: mean cosine {np.mean(cos):.4f}, min {np.min(cos):.4f}"
)
