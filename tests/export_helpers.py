"""Shared fixtures-in-code of the export tests: the Fashion-MNIST normalisation the test students use,
a BatchNorm-re-estimated untrained student, the parity metric, and a model whose int8 breaks."""

from __future__ import annotations

import torch
from torch import nn

from robkit.export.images import load_images, reestimate_batchnorm

MEAN, STD = [0.286, 0.286, 0.286], [0.353, 0.353, 0.353]
RES = 32


def normalised(u8: torch.Tensor) -> torch.Tensor:
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (u8.float() / 255 - m) / s


def make_student(arch: str, images: int = 64, offset: int = 5000):
    """An untrained student whose BatchNorm statistics are re-estimated on Fashion-MNIST, so it computes
    non-degenerate features and int8 damage is measurable."""
    from robkit.models.students import build_student

    torch.manual_seed(0)
    student = build_student(arch)
    u8, _ = load_images("fashion-mnist", "train", images, RES, offset=offset)
    return reestimate_batchnorm(student, normalised(u8))


def save_student_checkpoint(student, path, arch: str = "mobilenet_v3_small", **fields):
    """``student`` saved as a robkit checkpoint at the test resolution and normalisation; returns the path.

    ``fields`` override the record (kind, method, teacher, config, metrics, seed, ...).
    """
    from robkit.models.checkpoint import atomic_save, make_checkpoint

    record = {
        "kind": "pretrain",
        "method": "dino",
        "student": {"arch": arch, "kwargs": {}},
        "backbone": student.backbone.state_dict(),
        "head": None,
        "teacher": None,
        "normalization": {"mean": MEAN, "std": STD},
        "resolution": RES,
        "config": {},
        "metrics": {},
        **fields,
    }
    return atomic_save(make_checkpoint(**record), path)


def trained_student(steps: int = 60):
    """A MobileNetV3-Small trained for a few supervised steps on Fashion-MNIST (32 px), BatchNorm then
    re-estimated: structured features in seconds, which int8 keeps at cosine ~0.997 with every module
    int8 (PTQ and QAT alike), as a file an app ships."""
    student = make_student("mobilenet_v3_small", images=128)
    u8, labels = load_images("fashion-mnist", "train", 2048, 32, offset=30000)
    x, y = normalised(u8), torch.as_tensor(labels)
    torch.manual_seed(0)
    head = torch.nn.Linear(student(x[:2]).shape[1], 10)
    opt = torch.optim.Adam([*student.parameters(), *head.parameters()], lr=2e-3)
    student.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (64,))
        loss = torch.nn.functional.cross_entropy(head(student(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return reestimate_batchnorm(student, x[:256]).eval()


def cos(a, b) -> float:
    """Mean row cosine, computed independently of robkit's parity code."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


class Amplified(nn.Module):
    """Multiplies one channel by 1000: a per-tensor 8-bit scale on its output then rounds every
    other channel to zero (the next layer divides it back, so fp32 is unchanged)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        gain = torch.ones(1, channels, 1, 1)
        gain[0, 0] = 1000.0
        self.register_buffer("gain", gain)

    def forward(self, x):
        return x * self.gain


def outlier_cnn() -> nn.Module:
    """A small CNN whose module "2" cannot be int8 (see :class:`Amplified`)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        Amplified(8),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    with torch.no_grad():
        net[3].weight[:, 0] /= 1000.0
    return net
