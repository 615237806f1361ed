"""Feature distillation from a headless teacher: the loss against an independent computation of its
definition, the student's spatial map, and ``distill`` end to end from an official-layout DINOv2 file
(online and from a target cache).
"""

from __future__ import annotations

import pytest
import test_teachers_dinov2 as D  # tiny official-layout DINOv2 files
import torch
import torch.nn.functional as F

import robkit.teachers as teachers
from robkit.engine.build import distill, teacher_head_family
from robkit.engine.teacher_cache import build_cache
from robkit.models.checkpoint import load_student, safe_load
from robkit.models.students import build_student
from robkit.objectives.feature import FeatureDistillLoss, feature_distance

TINY = {
    "views": {"n_local": 2, "global_size_px": 32, "local_size_px": 16},
    "train": {"epochs": 1, "batch_size": 16, "precision": "fp32"},
    "optim": {"warmup_epochs": 0},
    "rob": {"teacher_resolution": 56},
}
ENGINE = {"progress": False, "tensorboard": False, "checkpoint_every_steps": 0, "precise_bn_images": 64}


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")


def _reference(s, t, sp, tp, n_t, dist, pw, beta):
    """The loss written out: RoB's identical-view pairs, mean over pairs, plus the weighted patch term."""
    b = t.shape[0] // n_t
    n_s = s.shape[0] // b

    def d(a, c):
        if dist == "cosine":
            return 1 - (a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1))
        if dist == "mse":
            return ((a - c) ** 2).mean(-1)
        return F.smooth_l1_loss(a, c, beta=beta, reduction="none").mean(-1)

    terms = [
        d(s[j * b : (j + 1) * b], t[i * b : (i + 1) * b]).mean()
        for i in range(n_t)
        for j in range(n_s)
        if j == i or j >= n_t
    ]
    loss = sum(terms) / len(terms)
    return loss + pw * d(sp, tp).mean() if pw else loss


@pytest.mark.parametrize("dist", ["cosine", "mse", "smooth_l1"])
@pytest.mark.parametrize("n_t,n_s,pw", [(2, 6, 0.0), (2, 2, 1.0), (1, 4, 0.5)])
def test_loss_equals_its_definition(dist, n_t, n_s, pw):
    g = torch.Generator().manual_seed(0)
    b, dim, n = 3, 8, 4
    s, t = torch.randn(n_s * b, dim, generator=g), torch.randn(n_t * b, dim, generator=g)
    sp, tp = torch.randn(n_t * b, n, dim, generator=g), torch.randn(n_t * b, n, dim, generator=g)
    loss, parts = FeatureDistillLoss(n_t, dist, pw, beta=0.5)(s, t, sp, tp)
    torch.testing.assert_close(loss, _reference(s, t, sp, tp, n_t, dist, pw, 0.5))
    assert ("patch" in parts) == (pw > 0)
    # the student that equals the teacher on every pair has zero loss (cosine: any positive scale)
    same = torch.cat([t, t[:b].repeat(n_s - n_t, 1)]) if n_t == 1 else None
    if same is not None and dist == "cosine" and pw == 0:
        assert FeatureDistillLoss(n_t, dist)(same * 3.0, t)[0].abs() < 1e-6
    assert feature_distance(t, t, dist).abs().max() < 1e-6


def test_centering_uses_the_center_from_before_the_call_and_updates_it_by_ema():
    g = torch.Generator().manual_seed(1)
    b, dim, n_t, n_s, m = 4, 6, 2, 4, 0.8
    loss_fn = FeatureDistillLoss(n_t, "cosine", center_momentum=m, dim=dim)
    center = torch.zeros(1, dim)
    for _ in range(3):
        s, t = torch.randn(n_s * b, dim, generator=g), torch.randn(n_t * b, dim, generator=g) + 2.0
        loss, _ = loss_fn(s, t)
        torch.testing.assert_close(loss, _reference(s, t - center, None, None, n_t, "cosine", 0.0, 1.0))
        center = m * center + (1 - m) * t.mean(0, keepdim=True)
        torch.testing.assert_close(loss_fn.center, center)
    assert "center" in loss_fn.state_dict()  # resumed exactly with the run
    with pytest.raises(ValueError, match="dim=D"):
        FeatureDistillLoss(center_momentum=0.9)
    with pytest.raises(ValueError, match="center_momentum"):
        FeatureDistillLoss(center_momentum=1.0, dim=4)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown feature distance 'l2'"):
        FeatureDistillLoss(distance="l2")
    with pytest.raises(ValueError, match="patch_weight"):
        FeatureDistillLoss(patch_weight=-1)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18", "vit_tiny"])
def test_forward_map_pools_to_the_embedding(arch):
    net = build_student(arch).eval()
    x = torch.randn(2, 3, 64, 48)
    emb, m = net.forward_map(x)
    torch.testing.assert_close(emb, net(x))
    assert m.shape[:2] == (2, net.embed_dim) and m.dim() == 4


@pytest.mark.parametrize("student,patch_weight", [("mobilenet_v3_small", 0.0), ("vit_tiny", 1.0)])
def test_distill_from_a_headless_dinov2_file(tmp_path, student, patch_weight):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(D.official_state(), path)
    t = teachers.load(str(path))
    assert teacher_head_family(t) == "features"
    metrics, run = distill(
        str(path),
        student=student,
        data="fashion-mnist",
        data_limit=32,
        out=tmp_path / "run",
        overrides={**TINY, "loss": {"patch_weight": patch_weight}},
        **ENGINE,
    )
    assert metrics["finished"] and torch.isfinite(torch.tensor(metrics["loss"]))
    ckpt = safe_load(run / "checkpoint.pt")
    assert ckpt["method"] == "rob-features" and ckpt["config"]["name"] == "rob-features-small"
    assert ckpt["teacher"]["family"] == "features" and len(ckpt["teacher"]["sha256"]) == 64
    head = ckpt["head"]
    assert head["type"] == "FeatureProjector" and head["kwargs"]["out_dim"] == D.DIM
    assert head["kwargs"]["patch"] == (patch_weight > 0)
    # the teacher is never stored
    assert all(k.startswith(("online.", "loss.")) for k in ckpt["train_state"]["task"])
    net, _ = load_student(run / "checkpoint.pt")
    assert net(torch.randn(2, 3, 32, 32)).shape[1] == build_student(student).embed_dim


def test_a_robkit_checkpoint_without_prototypes_is_distilled_by_its_backbone_features(tmp_path):
    """A MoCo-v2 run has a projector, not prototypes: as a teacher it is its student backbone, headless,
    with the embedding ``robkit eval`` scores as its target; ``--recipe auto`` picks feature distillation.
    """
    from robkit.engine.build import pretrain
    from robkit.teachers.backbone import BackboneTeacher

    _, moco = pretrain(
        method="mocov2",
        student="mobilenet_v3_small",
        data="fashion-mnist",
        data_limit=32,
        out=tmp_path / "moco",
        overrides={k: v for k, v in TINY.items() if k != "rob"},
        **ENGINE,
    )
    path = moco / "checkpoint.pt"
    t = teachers.load(str(path))
    assert isinstance(t, BackboneTeacher) and teacher_head_family(t) == "features"
    assert t.embed_dim == 576 and t.resolution == 32 and t.arch["head"] == "MLPHead"
    net, _ = load_student(path)
    x = torch.randn(3, 3, 32, 32)
    out = t(x)
    emb, fmap = net.eval().forward_map(x)
    torch.testing.assert_close(out.features, emb)  # the very embedding the kNN and linear probes score
    torch.testing.assert_close(out.patch_features, fmap.flatten(2).transpose(1, 2))
    metrics, run = distill(
        str(path),
        student="mobilenet_v3_small",
        data="fashion-mnist",
        data_limit=32,
        out=tmp_path / "student",
        overrides=TINY,
        **ENGINE,
    )
    ckpt = safe_load(run / "checkpoint.pt")
    assert metrics["finished"] and ckpt["config"]["name"] == "rob-features-small"
    assert ckpt["head"]["kwargs"]["out_dim"] == 576


def test_cached_targets_give_the_online_run_for_a_headless_teacher(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(D.official_state(), path)
    ov = {**TINY, "train": {**TINY["train"], "precision": "fp32"}}
    common = {"student": "mobilenet_v3_small", "data": "fashion-mnist", "data_limit": 32, "overrides": ov}
    summary = build_cache(str(path), tmp_path / "cache", epochs=1, progress=False, device="cpu", **common)
    assert summary["complete"]
    with pytest.raises(Exception, match="no head"):
        from robkit.engine.teacher_cache import CacheForm

        build_cache(str(path), tmp_path / "c2", epochs=1, progress=False, form=CacheForm("topk"), **common)
    online, _ = distill(str(path), out=tmp_path / "online", **common, **ENGINE)
    cached, _ = distill(
        str(path), out=tmp_path / "cached", teacher_cache=tmp_path / "cache", **common, **ENGINE
    )
    # fp16 storage of the targets: the same losses to fp16 rounding
    assert abs(online["loss"] - cached["loss"]) < 1e-2, (online["loss"], cached["loss"])


def test_the_readme_headline_runs_with_dinov2_vits14_once_the_file_is_cached(tmp_path):
    """``robkit distill --teacher dinov2_vits14 --student mobilenet_v3 --data /path/to/images``: a
    full-size ViT-S/14 file in the released layout (random weights) under the cache's file name.
    """
    from click.testing import CliRunner
    from PIL import Image

    from robkit.cli import main
    from robkit.teachers.dinov2 import build_backbone

    record = teachers.catalog().get("dinov2_vits14")
    net = build_backbone(record["arch"])
    cache = tmp_path / "home" / "teachers"
    cache.mkdir(parents=True)
    torch.save(net.state_dict(), cache / record["file_name"])
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(images / f"{i}.png")
    args = ["distill", "--teacher", "dinov2_vits14", "--student", "mobilenet_v3", "--data", str(images)]
    tiny = ["--batch-size", "4", "--max-steps", "1", "--precision", "fp32", "--no-eval", "--quiet"]
    sets = ["--set", "rob.teacher_resolution=28", "--set", "views.n_local=2"]
    r = CliRunner().invoke(main, [*args, *tiny, *sets, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    ckpt = safe_load(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["teacher"]["name"] == "dinov2_vits14" and ckpt["method"] == "rob-features"
    assert ckpt["head"]["kwargs"]["out_dim"] == 384
