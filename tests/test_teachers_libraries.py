"""Any timm or torchvision backbone as a headless teacher: ``--teacher timm:ARCH --teacher-file PATH``.

Files are written in ``tmp_path`` in the forms users have (a bare state dict with its classifier, a timm
training checkpoint with ``arch``, a Hugging Face snapshot with ``config.json`` and safetensors, a
torchvision release name); the teacher's features are compared with what the library's own model
computes on the same weights.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from robkit import teachers
from robkit.models.checkpoint import safe_load
from robkit.teachers.libraries import LibraryTeacherError, parse_spec


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")


def _rand_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrong eval-mode path shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _x(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_spec_parsing():
    assert parse_spec("timm:resnet18") == ("timm", "resnet18")
    assert parse_spec("torchvision") == ("torchvision", None)
    assert parse_spec("dino_vits8") is None and parse_spec("runs/x.pth") is None


def test_timm_cnn_with_its_classifier_gives_the_models_pooled_features(tmp_path):
    ref = _rand_bn(timm.create_model("resnet18", pretrained=False, num_classes=10))
    torch.save(ref.state_dict(), tmp_path / "r18.pth")  # classifier included, as trained files are
    t = teachers.load("timm:resnet18", file=tmp_path / "r18.pth")
    assert t.headless and t.family == "timm" and t.embed_dim == 512 and t.arch["classifier_dropped"] == 2
    x = _x(64)
    out = t(x)
    with torch.no_grad():
        fmap = ref.forward_features(x)
        expected = fmap.mean(dim=(2, 3))  # timm's avg pool, computed independently
    torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch_features, fmap.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert out.patch_features.shape == (2, 4, 512)  # 64 px / stride 32 = 2 x 2 map


def test_timm_vit_from_a_training_checkpoint_infers_the_arch_and_skips_prefix_tokens(tmp_path):
    arch = "vit_small_patch14_reg4_dinov2"
    ref = timm.create_model(arch, pretrained=False, num_classes=0, img_size=56).eval()
    torch.save({"epoch": 3, "arch": arch, "state_dict": ref.state_dict()}, tmp_path / "ckpt.pth.tar")
    t = teachers.load("timm", file=tmp_path / "ckpt.pth.tar")
    assert t.name == f"timm:{arch}" and t.patch_size == 14
    x = _x(56)
    out = t(x)
    with torch.no_grad():
        tokens = ref.forward_features(x)  # final-normed: CLS, 4 registers, 16 patches
    assert ref.num_prefix_tokens == 5 and out.patch_features.shape == (2, 16, 384)
    torch.testing.assert_close(out.features, tokens[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch_features, tokens[:, 5:], atol=1e-5, rtol=1e-5)


def test_hugging_face_snapshot_safetensors_and_config_json(tmp_path):
    ref = _rand_bn(timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=7))
    snap = tmp_path / "snapshot"
    snap.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"architecture": "mobilenetv3_small_100", "num_classes": 7}))
    t = teachers.load("timm", file=snap / "model.safetensors")
    x = _x(64)
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
    torch.testing.assert_close(t(x).features, expected, atol=1e-5, rtol=1e-5)
    assert t.embed_dim == expected.shape[1] == 1024  # the model's own pre-logits (conv head) width


def test_torchvision_resnet_release_name_infers_the_arch(tmp_path):
    ref = _rand_bn(torchvision.models.resnet18(weights=None))
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(ref.state_dict(), path)
    t = teachers.load("torchvision", file=path)
    assert t.name == "torchvision:resnet18" and t.embed_dim == 512 and t.resolution == 224
    x = _x(96)
    trunk = nn.Sequential(*list(ref.children())[:-1])  # everything but fc: the pooled embedding
    with torch.no_grad():
        expected = trunk(x).flatten(1)
    out = t(x)
    torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=1e-5)
    assert out.patch_features.shape == (2, 9, 512)


def test_torchvision_features_trunk_and_vit(tmp_path):
    mb = _rand_bn(torchvision.models.mobilenet_v3_small(weights=None))
    torch.save(mb.state_dict(), tmp_path / "mb.pth")
    t = teachers.load("torchvision:mobilenet_v3_small", file=tmp_path / "mb.pth")
    x = _x(64)
    with torch.no_grad():
        expected = mb.avgpool(mb.features(x)).flatten(1)
    torch.testing.assert_close(t(x).features, expected, atol=1e-5, rtol=1e-5)
    assert t.embed_dim == 576

    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    from robkit.teachers.libraries import TorchvisionFeatures  # a tiny ViT (no registered name)

    feats = TorchvisionFeatures(vit, "vit_tiny_test")
    vit.heads = nn.Identity()
    xv = _x(32)
    with torch.no_grad():
        out = feats.forward_features(xv)
        torch.testing.assert_close(out["x_norm_clstoken"], vit(xv), atol=1e-5, rtol=1e-5)
    assert out["x_norm_patchtokens"].shape == (2, 16, 32)


def test_errors_name_what_to_do(tmp_path):
    sd = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    torch.save(sd, tmp_path / "weights.pth")
    with pytest.raises(LibraryTeacherError, match="timm:resnet50"):
        teachers.load("timm", file=tmp_path / "weights.pth")  # nothing in the file names the arch
    with pytest.raises(LibraryTeacherError, match="close names"):
        teachers.load("timm:resnet1800", file=tmp_path / "weights.pth")
    with pytest.raises(Exception, match="shape mismatches|missing keys"):
        teachers.load("timm:resnet34", file=tmp_path / "weights.pth")
    with pytest.raises(teachers.TeacherFileMissing, match="--teacher-file"):
        teachers.load("timm:resnet18")
    with pytest.raises(teachers.TeacherFileMissing, match="does not exist"):
        teachers.load("timm:resnet18", file=tmp_path / "nope.pth")
    (tmp_path / "evil.pth").write_bytes(b"\x80\x04cos\nsystem\n(S'echo hi'\ntR.")
    with pytest.raises(Exception, match="refused|could not read"):
        teachers.load("timm:resnet18", file=tmp_path / "evil.pth")


def test_cli_verify_and_distill_from_a_torchvision_backbone(tmp_path):
    from robkit.cli import main

    ref = _rand_bn(torchvision.models.resnet18(weights=None))
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(ref.state_dict(), path)
    runner = CliRunner()
    v = runner.invoke(main, ["teachers", "verify", "torchvision", "--file", str(path)])
    assert v.exit_code == 0, v.output
    assert "features (2, 512)" in v.output and "patch_features (2, 49, 512)" in v.output
    bad = runner.invoke(main, ["distill", "--teacher", "timm:resnet18", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "--teacher-file" in bad.output and "Traceback" not in bad.output
    r = runner.invoke(
        main,
        [
            "distill",
            "--teacher",
            "torchvision:resnet18",
            "--teacher-file",
            str(path),
            "--data-limit",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--max-steps",
            "2",
            "--precision",
            "fp32",
            "--set",
            "rob.teacher_resolution=64",
            "--set",
            "views.n_local=2",
            "--no-eval",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert r.exit_code == 0, r.output
    ck = safe_load(tmp_path / "run" / "checkpoint.pt")
    assert ck["method"] == "rob-features" and ck["teacher"]["name"] == "torchvision:resnet18"
    assert ck["teacher"]["family"] == "features" and len(ck["teacher"]["sha256"]) == 64
