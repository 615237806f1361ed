"""RoB distillation end to end: official-layout teachers into CNN and ViT students."""

from __future__ import annotations

import argparse
import csv

import pytest
import test_teachers_layouts as L  # tiny official-layout checkpoint builders
import torch

import robkit.teachers as teachers
from robkit.engine.build import build_rob_task, distill, pretrain, resolve_config, teacher_head_family
from robkit.models.checkpoint import load_student, safe_load
from robkit.models.students import build_student

TINY = {
    "views": {"n_local": 2, "global_size_px": 32, "local_size_px": 16},
    "train": {"epochs": 1, "batch_size": 16, "precision": "fp32"},
    "optim": {"warmup_epochs": 0},
    "rob": {"teacher_resolution": "student"},
}
ENGINE = {"progress": False, "tensorboard": False, "checkpoint_every_steps": 0, "precise_bn_images": 64}


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")


def _dino_file(tmp):
    vit = L.tiny_vit()
    sd = L.prefixed(vit.state_dict(), "backbone.") | L.prefixed(L.dino_vit_head(), "head.")
    args = argparse.Namespace(arch="vit_small", patch_size=L.PATCH, out_dim=L.OUT, norm_last_layer=False)
    torch.save(L.multicrop_ckpt(sd, "dino_loss", args), tmp / "dino_full_checkpoint.pth")
    return tmp / "dino_full_checkpoint.pth"


def _ibot_file(tmp):
    vit = L.tiny_vit()
    head = L.dino_vit_head()
    head |= {
        "last_layer2.weight_g": head["last_layer.weight_g"],
        "last_layer2.weight_v": head["last_layer.weight_v"],
    }
    sd = L.prefixed(vit.state_dict(), "backbone.") | L.prefixed(head, "head.")
    args = argparse.Namespace(arch="vit_small", patch_size=L.PATCH, out_dim=L.OUT, shared_head=True)
    torch.save(L.multicrop_ckpt(sd, "ibot_loss", args), tmp / "checkpoint.pth")
    return tmp / "checkpoint.pth"


def _msn_file(tmp):
    obj, _ = L.msn_file(L.tiny_vit())
    torch.save(obj, tmp / "vits16_800ep.pth.tar")
    return tmp / "vits16_800ep.pth.tar"


def _swav_file(tmp):
    net = L.WideResNet((1, 1, 1, 1), 8, (8, 16, 32, 64)).eval()
    sd, _ = L.swav_state(net)
    torch.save(sd, tmp / "swav_pretrain.pth.tar")
    return tmp / "swav_pretrain.pth.tar"


LAYOUTS = {"dino": _dino_file, "ibot": _ibot_file, "msn": _msn_file, "swav": _swav_file}


@pytest.mark.parametrize("family", list(LAYOUTS))
@pytest.mark.parametrize("student", ["mobilenet_v3_small", "vit_tiny"])
def test_distill_from_each_official_layout(tmp_path, family, student):
    path = LAYOUTS[family](tmp_path)
    metrics, run = distill(
        str(path),
        student=student,
        data="fashion-mnist",
        data_limit=32,
        out=tmp_path / "run",
        overrides=TINY,
        **ENGINE,
    )
    assert metrics["finished"] and torch.isfinite(torch.tensor(metrics["loss"]))
    ckpt = safe_load(run / "checkpoint.pt")
    assert ckpt["teacher"]["family"] == family and len(ckpt["teacher"]["sha256"]) == 64
    assert ckpt["method"] == f"rob-{family}" and ckpt["config"]["name"] == f"rob-{family}-small"
    # the frozen teacher is never stored: only the student, its head (and iBOT's mask token)
    keys = ckpt["train_state"]["task"].keys()
    assert all(k.startswith("online.") or k.startswith("loss.") for k in keys), sorted(keys)[:5]
    t = teachers.load(str(path))
    head = ckpt["head"]
    if family in ("dino", "ibot"):
        assert head["type"] == ("DINOHead" if family == "dino" else "iBOTHead")
        assert head["kwargs"]["out_dim"] == t.num_prototypes
        assert head["kwargs"]["in_dim"] == build_student(student).embed_dim
    student_net, _ = load_student(run / "checkpoint.pt")
    assert student_net(torch.randn(2, 3, 32, 32)).shape[1] == build_student(student).embed_dim


def test_teacher_gets_no_gradient_and_pairing_is_identical_view_unless_asked(tmp_path):
    t = teachers.load(str(_dino_file(tmp_path)))
    cfg = resolve_config("rob", "mobilenet_v3_small", "rob-dino", TINY, small_images=True)
    task = build_rob_task(t, "dino", build_student("mobilenet_v3_small"), cfg, channels_last=False)
    assert task.loss.cross_view is False
    views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 2
    loss, _ = task(views, 0)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert any(p.grad is not None for p in task.online.parameters())
    assert not any("teacher" in k for k in task.state_dict())
    cfg_x = resolve_config(
        "rob", "mobilenet_v3_small", "rob-dino", {**TINY, "loss": {"cross_view": True}}, small_images=True
    )
    assert (
        build_rob_task(t, "dino", build_student("mobilenet_v3_small"), cfg_x, False).loss.cross_view is True
    )


def _epoch_losses(run):
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    by_epoch: dict[int, list[float]] = {}
    for r in rows:
        by_epoch.setdefault(int(r["epoch"]), []).append(float(r["loss"]))
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def test_tiny_end_to_end_robkit_teacher_to_student_lowers_the_loss(tmp_path):
    _, teacher_run = pretrain(
        method="dino",
        student="resnet18",
        data="fashion-mnist",
        data_limit=64,
        out=tmp_path / "teacher",
        overrides={
            **{k: v for k, v in TINY.items() if k != "rob"},
            "head": {"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32},
        },
        **ENGINE,
    )
    t = teachers.load(str(teacher_run / "checkpoint.pt"))
    assert teacher_head_family(t) == "dino" and t.resolution == 32
    ov = {**TINY, "train": {**TINY["train"], "epochs": 6}, "optim": {"warmup_epochs": 0, "base_lr": 2e-3}}
    _, run = distill(
        str(teacher_run / "checkpoint.pt"),
        student="mobilenet_v3_small",
        data="fashion-mnist",
        data_limit=64,
        out=tmp_path / "student",
        overrides=ov,
        **ENGINE,
    )
    losses = _epoch_losses(run)
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.05, losses
