"""Every official checkpoint layout loads and matches an independent forward pass.

Checkpoints are generated in ``tmp_path`` with tiny sizes but the key names and nesting of
the released files (see ``robkit/teachers/layouts.py``).  Backbones are checked against a timm /
reference network loaded separately; the head math (MLP, BatchNorm in eval mode, L2 norm,
``g * v / ||v||``, cosine with normalised prototypes) is recomputed here with plain torch ops
from the state-dict tensors.
"""

from __future__ import annotations

import argparse
import re
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import robkit.teachers as teachers
from robkit.models.checkpoint import CheckpointError
from robkit.teachers.layouts import LayoutError
from robkit.teachers.resnet_wide import WideResNet, resnet50_wide
from robkit.teachers.teacher import TeacherLoadError

D, DEPTH, PATCH, IMG = 48, 2, 8, 32
HID, BOT, OUT = 32, 16, 64
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")


def rand(*shape):
    return torch.randn(*shape)


def tiny_vit(num_heads: int = 1) -> nn.Module:
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=D,
        depth=DEPTH,
        num_heads=num_heads,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    with torch.no_grad():  # non-trivial norms / position embeddings
        for k, v in vit.named_parameters():
            if k.endswith("bias") or "pos_embed" in k or "cls_token" in k:
                v.normal_(0, 0.1)
    return vit


def bn_stats(prefix: str, n: int) -> dict:
    return {
        f"{prefix}.weight": torch.rand(n) + 0.5,
        f"{prefix}.bias": rand(n) * 0.1,
        f"{prefix}.running_mean": rand(n) * 0.1,
        f"{prefix}.running_var": torch.rand(n) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def dino_vit_head(in_dim: int = D, g_trained: bool = True) -> dict:
    h = {
        "mlp.0.weight": rand(HID, in_dim) * 0.2,
        "mlp.0.bias": rand(HID) * 0.1,
        "mlp.2.weight": rand(HID, HID) * 0.2,
        "mlp.2.bias": rand(HID) * 0.1,
        "mlp.4.weight": rand(BOT, HID) * 0.2,
        "mlp.4.bias": rand(BOT) * 0.1,
        "last_layer.weight_g": (torch.rand(OUT, 1) + 0.5) if g_trained else torch.ones(OUT, 1),
        "last_layer.weight_v": rand(OUT, BOT),
    }
    return h


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def multicrop_ckpt(
    teacher_sd: dict, loss_key: str, args: argparse.Namespace, teacher_prefix: str = ""
) -> dict:
    """DINO / iBOT ``main_*.py`` save dict: student under DDP, teacher bare (or DDP for BN models)."""
    student = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in teacher_sd.items()
    }
    return {
        "student": prefixed(student, "module."),
        "teacher": prefixed(teacher_sd, teacher_prefix),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": args,
        loss_key: {"center": torch.zeros(1, OUT)}
        | ({"center2": torch.zeros(1, 1, OUT)} if loss_key == "ibot_loss" else {}),
    }


# ---------------------------------------------------------------- independent head math


def ln_mlp_gelu(x, h, idx=(0, 2, 4)):
    a, b, c = idx
    x = F.gelu(x @ h[f"mlp.{a}.weight"].T + h[f"mlp.{a}.bias"])
    x = F.gelu(x @ h[f"mlp.{b}.weight"].T + h[f"mlp.{b}.bias"])
    return x @ h[f"mlp.{c}.weight"].T + h[f"mlp.{c}.bias"]


def bn_eval(x, h, p, eps=1e-5):
    return (x - h[f"{p}.running_mean"]) / torch.sqrt(h[f"{p}.running_var"] + eps) * h[f"{p}.weight"] + h[
        f"{p}.bias"
    ]


def l2n(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def wn_weight(g, v):
    return g * v / v.norm(dim=1, keepdim=True)


def check_teacher_basics(t: teachers.Teacher, x: torch.Tensor) -> teachers.TeacherOutput:
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not t.backbone.training
    out = t(x)
    split = t.head_forward(t.embed(x))
    torch.testing.assert_close(split.logits, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(split.features, out.features, rtol=0, atol=0)
    assert isinstance(t.sha256, str) and len(t.sha256) == 64
    return out


# ---------------------------------------------------------------- DINO


def test_dino_vit_full_checkpoint(tmp_path):
    vit = tiny_vit()
    head = dino_vit_head()
    sd = prefixed(vit.state_dict(), "backbone.") | prefixed(head, "head.")
    args = argparse.Namespace(
        arch="vit_small", patch_size=PATCH, out_dim=OUT, norm_last_layer=False, use_bn_in_head=False
    )
    torch.save(multicrop_ckpt(sd, "dino_loss", args), tmp_path / "dino_full_checkpoint.pth")

    t = teachers.load(tmp_path / "dino_full_checkpoint.pth")
    assert (t.family, t.embed_dim, t.num_prototypes, t.patch_size) == ("dino", D, OUT, PATCH)
    assert t.default_temperature == 0.07 and t.resolution == IMG and t.std == [0.229, 0.224, 0.225]
    x = torch.randn(3, 3, IMG, IMG)
    out = check_teacher_basics(t, x)
    assert out.patch_logits is None
    with torch.no_grad():
        cls = vit(x)
    ref = l2n(ln_mlp_gelu(cls, head)) @ wn_weight(head["last_layer.weight_g"], head["last_layer.weight_v"]).T
    torch.testing.assert_close(out.features, cls, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=0)
    # the EMA teacher, not the student, is loaded
    stu = {
        k.removeprefix("module.head."): v for k, v in multicrop_ckpt(sd, "dino_loss", args)["student"].items()
    }
    assert not torch.allclose(
        out.logits,
        l2n(ln_mlp_gelu(cls, stu)) @ wn_weight(stu["last_layer.weight_g"], stu["last_layer.weight_v"]).T,
    )
    # other resolutions work (dynamic position embeddings) and keep shapes
    assert t(torch.randn(1, 3, 48, 48)).logits.shape == (1, OUT)


def test_dino_vit_student_key_and_declared_heads(tmp_path):
    vit = tiny_vit(num_heads=3)
    head = dino_vit_head()
    sd = prefixed(vit.state_dict(), "backbone.") | prefixed(head, "head.")
    torch.save(multicrop_ckpt(sd, "dino_loss", argparse.Namespace()), tmp_path / "c.pth")
    t = teachers.load(tmp_path / "c.pth", arch={"num_heads": 3})
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(t(x).features, vit(x), atol=ATOL, rtol=0)
    s = teachers.load(tmp_path / "c.pth", checkpoint_key="student", arch={"num_heads": 3})
    assert not torch.allclose(s(x).features, t(x).features)


def test_dino_resnet50_head_variant(tmp_path):
    """Released RN50 head: Linear-BN-GELU-Linear, L2 norm, *plain* Linear to 60000 (here 64)."""
    torch.manual_seed(1)
    net = WideResNet((1, 1, 1, 1), 8, (8, 16, 16, 32)).eval()
    feat = 32 * 4
    head = {
        "mlp.0.weight": rand(HID, feat) * 0.1,
        "mlp.0.bias": rand(HID) * 0.1,
        **bn_stats("mlp.1", HID),
        "mlp.3.weight": rand(BOT, HID) * 0.2,
        "mlp.3.bias": rand(BOT) * 0.1,
        "last_layer.weight": rand(OUT, BOT),
    }
    sd = prefixed(randomize_bn(net.state_dict()), "backbone.") | prefixed(head, "head.")
    net.load_state_dict({k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")})
    for prefix in ("module.", ""):  # DDP-wrapped teacher (BN model) or not: both seen in the wild
        torch.save(
            multicrop_ckpt(sd, "dino_loss", argparse.Namespace(arch="resnet50"), prefix), tmp_path / "rn.pth"
        )
        t = teachers.load(tmp_path / "rn.pth")
        assert t.num_prototypes == OUT and t.embed_dim == feat
        x = torch.randn(2, 3, 64, 64)
        out = check_teacher_basics(t, x)
        with torch.no_grad():
            f = net(x)
        z = F.gelu(bn_eval(f @ head["mlp.0.weight"].T + head["mlp.0.bias"], head, "mlp.1"))
        z = l2n(z @ head["mlp.3.weight"].T + head["mlp.3.bias"])
        torch.testing.assert_close(out.features, f, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.logits, z @ head["last_layer.weight"].T, atol=ATOL, rtol=0)


def randomize_bn(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith("running_var"):
            v = torch.rand_like(v) + 0.5
        elif k.endswith(("running_mean", "bias")) and v.is_floating_point():
            v = torch.randn_like(v) * 0.1
        elif k.endswith("weight") and v.dim() == 1:
            v = torch.rand_like(v) + 0.5
        out[k] = v
    return out


def test_dino_xcit_official_names(tmp_path):
    """XCiT from the official repo: ``pos_embeder`` and fused ``qkv`` in class-attention blocks."""
    from timm.models.xcit import Xcit

    torch.manual_seed(2)
    ref = Xcit(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        cls_attn_layers=2,
        eta=1.0,
        tokens_norm=True,
        num_classes=0,
    ).eval()
    ref.load_state_dict(randomize_bn(ref.state_dict()))
    official = {}
    for k, v in ref.state_dict().items():
        m = re.match(r"cls_attn_blocks\.(\d+)\.attn\.([qkv])\.(weight|bias)", k)
        if m:
            if m.group(2) == "q":
                i, kind = m.group(1), m.group(3)
                parts = [ref.state_dict()[f"cls_attn_blocks.{i}.attn.{s}.{kind}"] for s in "qkv"]
                official[f"cls_attn_blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
            continue
        official[k.replace("pos_embed.", "pos_embeder.")] = v
    head = dino_vit_head(32)
    sd = prefixed(official, "backbone.") | prefixed(head, "head.")
    torch.save(
        multicrop_ckpt(sd, "dino_loss", argparse.Namespace(arch="xcit_small_12_p8")), tmp_path / "x.pth"
    )
    # XCiT has BatchNorm in its patch embedding, so DINO wraps the teacher in DDP: module. prefix
    ck = torch.load(tmp_path / "x.pth", weights_only=False)
    ck["teacher"] = prefixed(ck["teacher"], "module.")
    torch.save(ck, tmp_path / "x.pth")
    t = teachers.load(tmp_path / "x.pth")
    assert t.arch["type"] == "xcit" and t.arch["num_heads"] == 4 and t.patch_size == 8
    x = torch.randn(2, 3, 32, 32)
    out = check_teacher_basics(t, x)
    with torch.no_grad():
        cls = ref(x)
    torch.testing.assert_close(out.features, cls, atol=ATOL, rtol=0)
    ref_logits = (
        l2n(ln_mlp_gelu(cls, head)) @ wn_weight(head["last_layer.weight_g"], head["last_layer.weight_v"]).T
    )
    torch.testing.assert_close(out.logits, ref_logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- iBOT


@pytest.mark.parametrize("shared", [True, False])
def test_ibot_full_checkpoint(tmp_path, shared):
    vit = tiny_vit()
    head = dino_vit_head()
    if shared:  # shared_head: last_layer2 *is* last_layer, listed twice in the state dict
        head |= {
            "last_layer2.weight_g": head["last_layer.weight_g"],
            "last_layer2.weight_v": head["last_layer.weight_v"],
        }
    else:
        head |= {"last_layer2.weight_g": torch.rand(OUT, 1) + 0.5, "last_layer2.weight_v": rand(OUT, BOT)}
    sd = prefixed(vit.state_dict(), "backbone.") | prefixed(head, "head.")
    ck = multicrop_ckpt(sd, "ibot_loss", argparse.Namespace(arch="vit_small", shared_head=shared))
    ck["student"]["module.backbone.masked_embed"] = torch.zeros(1, D)  # student-only mask token
    torch.save(ck, tmp_path / "checkpoint.pth")

    t = teachers.load(tmp_path / "checkpoint.pth")
    assert t.family == "ibot" and t.head.shared_head is shared
    x = torch.randn(2, 3, IMG, IMG)
    out = check_teacher_basics(t, x)
    emb = t.embed(x)
    n = (IMG // PATCH) ** 2
    assert emb.shape == (2, 1 + n, D) and out.patch_logits.shape == (2, n, OUT)
    with torch.no_grad():
        tokens = vit.forward_features(x)
    z = l2n(ln_mlp_gelu(tokens, head))
    w1 = wn_weight(head["last_layer.weight_g"], head["last_layer.weight_v"])
    w2 = wn_weight(head["last_layer2.weight_g"], head["last_layer2.weight_v"])
    torch.testing.assert_close(out.features, tokens[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, z[:, 0] @ w1.T, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.patch_logits, z[:, 1:] @ w2.T, atol=ATOL, rtol=0)
    torch.testing.assert_close(t.head_forward(emb).patch_logits, out.patch_logits, atol=0, rtol=0)
    # the student entry (module. prefix, masked_embed) loads too
    teachers.load(tmp_path / "checkpoint.pth", checkpoint_key="student")


def test_ibot_swin_official_layout(tmp_path):
    """iBOT Swin: PatchMerging at the end of each stage (official), tokens = [mean, all]."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(3)
    ref = SwinTransformer(
        img_size=32,
        patch_size=4,
        window_size=2,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(1, 2),
        num_classes=0,
        drop_path_rate=0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.1) if p.dim() == 1 else None
    official = {}
    for k, v in ref.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        official[k] = v
    for s, res in ((0, 8), (1, 4)):  # official buffers: index everywhere, masks on shifted blocks
        for b in (0, 1):
            official[f"layers.{s}.blocks.{b}.attn.relative_position_index"] = torch.zeros(
                4, 4, dtype=torch.long
            )
        official[f"layers.{s}.blocks.1.attn_mask"] = torch.zeros((res // 2) ** 2, 4, 4)
    head = dino_vit_head(32)
    head |= {
        "last_layer2.weight_g": head["last_layer.weight_g"],
        "last_layer2.weight_v": head["last_layer.weight_v"],
    }
    sd = prefixed(official, "backbone.") | prefixed(head, "head.")
    torch.save(multicrop_ckpt(sd, "ibot_loss", argparse.Namespace(arch="swin_tiny")), tmp_path / "s.pth")
    t = teachers.load(tmp_path / "s.pth")  # window and resolution inferred from bias tables / masks
    assert t.arch["type"] == "swin" and t.arch["depths"] == [2, 2] and t.embed_dim == 32
    assert (t.arch["window_size"], t.arch["img_size"], t.arch["num_heads"]) == (2, 32, [1, 2])
    x = torch.randn(2, 3, 32, 32)
    out = check_teacher_basics(t, x)
    with torch.no_grad():
        tok = ref.forward_features(x).flatten(1, 2)
    tok = torch.cat([tok.mean(1, keepdim=True), tok], 1)
    z = l2n(ln_mlp_gelu(tok, head))
    w = wn_weight(head["last_layer.weight_g"], head["last_layer.weight_v"])
    torch.testing.assert_close(out.features, tok[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, z[:, 0] @ w.T, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.patch_logits, z[:, 1:] @ w.T, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- MSN


def msn_file(vit: nn.Module, n_proto: int = 24) -> tuple[dict, dict]:
    fc = {
        "fc.fc1.weight": rand(HID, D) * 0.2,
        "fc.fc1.bias": rand(HID) * 0.1,
        **bn_stats("fc.bn1", HID),
        "fc.fc2.weight": rand(HID, HID) * 0.2,
        "fc.fc2.bias": rand(HID) * 0.1,
        **bn_stats("fc.bn2", HID),
        "fc.fc3.weight": rand(BOT, HID) * 0.2,
        "fc.fc3.bias": rand(BOT) * 0.1,
    }
    enc = prefixed(vit.state_dict() | fc, "module.")
    return {"target_encoder": enc, "prototypes": rand(n_proto, BOT) * 3}, fc


def test_msn_checkpoint(tmp_path):
    vit = tiny_vit()
    obj, fc = msn_file(vit)
    torch.save(obj, tmp_path / "vits16_800ep.pth.tar")
    t = teachers.load(tmp_path / "vits16_800ep.pth.tar")
    assert (t.family, t.num_prototypes, t.default_temperature) == ("msn", 24, 0.025)
    x = torch.randn(2, 3, IMG, IMG)
    out = check_teacher_basics(t, x)
    with torch.no_grad():
        cls = vit(x)
    h = F.gelu(bn_eval(cls @ fc["fc.fc1.weight"].T + fc["fc.fc1.bias"], fc, "fc.bn1"))
    h = F.gelu(bn_eval(h @ fc["fc.fc2.weight"].T + fc["fc.fc2.bias"], fc, "fc.bn2"))
    z = h @ fc["fc.fc3.weight"].T + fc["fc.fc3.bias"]
    cos = l2n(z) @ l2n(obj["prototypes"]).T
    torch.testing.assert_close(out.features, cls, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, cos, atol=ATOL, rtol=0)
    assert out.logits.abs().max() <= 1 + 1e-6


def test_msn_training_layout(tmp_path):
    vit = tiny_vit()
    obj, _ = msn_file(vit)
    train = {
        "encoder": obj["target_encoder"],
        "opt": {},
        "epoch": 3,
        "loss": 1.0,
        "batch_size": 8,
        "world_size": 1,
        "lr": 0.1,
        "temperature": 0.1,
    } | obj
    torch.save(train, tmp_path / "m.pth.tar")
    t = teachers.load(tmp_path / "m.pth.tar")
    torch.testing.assert_close(t.head.prototypes, obj["prototypes"])


# ---------------------------------------------------------------- SwAV


def swav_state(net: WideResNet, hidden: int = HID, n_proto: int = 30) -> tuple[dict, dict]:
    feat = net.num_features
    head = {
        "projection_head.0.weight": rand(hidden, feat) * 0.1,
        "projection_head.0.bias": rand(hidden) * 0.1,
        **bn_stats("projection_head.1", hidden),
        "projection_head.3.weight": rand(BOT, hidden) * 0.2,
        "projection_head.3.bias": rand(BOT) * 0.1,
        "prototypes.weight": l2n(rand(n_proto, BOT)) * 1.01,
    }
    return prefixed(randomize_bn(net.state_dict()) | head, "module."), head


@pytest.mark.parametrize("widen", [1, 2])
@pytest.mark.parametrize("wrapped", [False, True])
def test_swav_state_dict(tmp_path, widen, wrapped):
    """Bare ``module.`` state dict (released) or ``{'state_dict': ...}`` (training); widened stem."""
    torch.manual_seed(4)
    base = 8
    net = WideResNet((1, 2, 1, 1), base * widen, tuple(base * widen * m for m in (1, 2, 4, 8))).eval()
    sd, head = swav_state(net)
    net.load_state_dict(
        {
            k.removeprefix("module."): v
            for k, v in sd.items()
            if "projection" not in k and "prototypes" not in k
        }
    )
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": {}} if wrapped else sd, tmp_path / "swav.pth.tar")
    t = teachers.load(tmp_path / "swav.pth.tar")
    assert t.family == "swav" and t.std == [0.228, 0.224, 0.225] and t.default_temperature == 0.03
    assert t.arch["stem_width"] == base * widen and t.arch["layers"] == [1, 2, 1, 1]
    x = torch.randn(2, 3, 64, 64)
    out = check_teacher_basics(t, x)
    with torch.no_grad():
        f = net(x)
    z = F.relu(
        bn_eval(
            f @ head["projection_head.0.weight"].T + head["projection_head.0.bias"], head, "projection_head.1"
        )
    )
    z = l2n(z @ head["projection_head.3.weight"].T + head["projection_head.3.bias"])
    torch.testing.assert_close(out.features, f, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, z @ head["prototypes.weight"].T, atol=ATOL, rtol=0)


def test_wide_resnet_matches_torchvision():
    """``resnet50_wide(1)`` has torchvision's keys and computes torchvision's ResNet-50."""
    torch.manual_seed(5)
    tv = torchvision.models.resnet50(weights=None)
    tv.fc = nn.Identity()
    tv.load_state_dict(randomize_bn(tv.state_dict()))
    tv.eval()
    ours = resnet50_wide(1).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=1e-4)
    w2 = resnet50_wide(2)
    assert w2.conv1.weight.shape == (128, 3, 7, 7) and w2.num_features == 4096


def test_standard_rn50_uses_torchvision(tmp_path):
    from robkit.teachers.teacher import build_backbone

    arch = {
        "type": "resnet",
        "layers": [3, 4, 6, 3],
        "stem_width": 64,
        "stage_widths": [64, 128, 256, 512],
        "expansion": 4,
    }
    with torch.device("meta"):
        assert isinstance(build_backbone(arch), torchvision.models.ResNet)
        assert isinstance(
            build_backbone({**arch, "stem_width": 128, "stage_widths": [128, 256, 512, 1024]}), WideResNet
        )


# ---------------------------------------------------------------- robkit checkpoints


def test_robkit_checkpoint_as_teacher(tmp_path):
    from robkit.models.checkpoint import make_checkpoint
    from robkit.models.heads import DINOHead
    from robkit.models.students import build_student

    torch.manual_seed(6)
    student = build_student("resnet18").eval()
    head = DINOHead(
        512, out_dim=OUT, hidden_dim=HID, bottleneck_dim=BOT, nlayers=3, norm_last_layer=False
    ).eval()
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 1.5)
    ck = make_checkpoint(
        kind="distill",
        method="rob-dino",
        student={"arch": "resnet18", "kwargs": {}},
        backbone=student.backbone.state_dict(),
        head={
            "type": "DINOHead",
            "kwargs": {"in_dim": 512, "out_dim": OUT, "hidden_dim": HID, "bottleneck_dim": BOT},
            "state_dict": head.state_dict(),
        },
        teacher={"name": "dino_vits16", "sha256": "0" * 64},
        normalization={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        resolution=96,
        config={},
        metrics={},
    )
    torch.save(ck, tmp_path / "checkpoint.pt")
    t = teachers.load(tmp_path / "checkpoint.pt")
    assert t.family == "robkit" and t.mean == [0.5] * 3 and t.std == [0.25] * 3 and t.resolution == 96
    assert t.num_prototypes == OUT and t.embed_dim == 512 and t.default_temperature == 0.07
    x = torch.randn(2, 3, 64, 64)
    out = check_teacher_basics(t, x)
    with torch.no_grad():
        f = student(x)
    sd = head.state_dict()
    ref = l2n(ln_mlp_gelu(f, sd)) @ wn_weight(sd["last_layer.weight_g"], sd["last_layer.weight_v"]).T
    torch.testing.assert_close(out.features, f, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- errors


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    vit = tiny_vit()
    sd = prefixed(vit.state_dict(), "backbone.") | prefixed(dino_vit_head(), "head.")
    torch.save(multicrop_ckpt(sd, "dino_loss", argparse.Namespace()), tmp_path / "c.pth")
    with pytest.raises(TeacherLoadError) as e:
        teachers.load(tmp_path / "c.pth", arch={"depth": 3, "embed_dim": 64})
    msg = str(e.value)
    assert "missing keys" in msg and "blocks.2.norm1.weight" in msg
    assert "shape mismatches" in msg and "cls_token: file (1, 1, 48) vs model (1, 1, 64)" in msg
    with pytest.raises(TeacherLoadError, match=r"unexpected keys \(\d+\): blocks\.1"):
        teachers.load(tmp_path / "c.pth", arch={"depth": 1})


def test_backbone_only_file_is_refused(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    with pytest.raises(LayoutError, match="full_checkpoint"):
        teachers.load(tmp_path / "dino_deitsmall16_pretrain.pth")
    torch.save({"foo": 1}, tmp_path / "junk.pth")
    with pytest.raises(LayoutError, match="not a teacher checkpoint layout"):
        teachers.load(tmp_path / "junk.pth")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"teacher": {"backbone.x": torch.zeros(1)}, "args": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        teachers.load(tmp_path / "evil.pth")
    assert not marker.exists()


def test_misspelt_name_suggests_close_ones():
    from robkit.catalog import CatalogError

    with pytest.raises(CatalogError, match="dino_vits16"):
        teachers.load("dino_vitz16")
    with pytest.raises(FileNotFoundError):
        teachers.load("/no/such/teacher.pth")
