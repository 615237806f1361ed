"""DINOv2 backbones: the released key layout loads strictly and matches an independent forward pass
(plain torch ops from the state-dict tensors, the official position-table resize) at 224 px and at
another size; the catalog agrees with the loader; a recipe that needs a head refuses a headless teacher, clearly
(feature distillation from it is tests/test_feature_distill.py).

Files are generated in ``tmp_path`` with tiny widths but the released names, nesting and the
37 x 37 position table of the 518 px training resolution.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import robkit.teachers as teachers
from robkit.catalog import registry
from robkit.teachers.dinov2 import DINOv2LayoutError, arch_from_state, build_backbone

DIM, DEPTH, PATCH, GRID = 128, 2, 14, 37  # 2 heads of 64 channels, as every release has


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")


def official_state(regs: int = 0, swiglu: bool = False, dim: int = DIM, seed: int = 0) -> dict:
    """A state dict with the key names and shapes of ``dinov2_vit*14[_reg4]_pretrain.pth``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    sd = {
        "cls_token": r(1, 1, dim, std=0.5),
        "pos_embed": r(1, 1 + GRID * GRID, dim, std=0.5),
        "mask_token": r(1, dim),
        "patch_embed.proj.weight": r(dim, 3, PATCH, PATCH),
        "patch_embed.proj.bias": r(dim),
    }
    if regs:
        sd["register_tokens"] = r(1, regs, dim, std=0.5)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + r(dim),
            p + "norm1.bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim),
            p + "attn.qkv.bias": r(3 * dim),
            p + "attn.proj.weight": r(dim, dim),
            p + "attn.proj.bias": r(dim),
            p + "ls1.gamma": r(dim, std=0.5),
            p + "norm2.weight": 1 + r(dim),
            p + "norm2.bias": r(dim),
            p + "ls2.gamma": r(dim, std=0.5),
        }
        if swiglu:
            sd |= {
                p + "mlp.w12.weight": r(2 * hidden, dim),
                p + "mlp.w12.bias": r(2 * hidden),
                p + "mlp.w3.weight": r(dim, hidden),
                p + "mlp.w3.bias": r(dim),
            }
        else:
            sd |= {
                p + "mlp.fc1.weight": r(hidden, dim),
                p + "mlp.fc1.bias": r(hidden),
                p + "mlp.fc2.weight": r(dim, hidden),
                p + "mlp.fc2.bias": r(dim),
            }
    sd["norm.weight"], sd["norm.bias"] = 1 + r(dim), r(dim)
    return sd


def reference(sd: dict, x: torch.Tensor, offset: float, antialias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DinoVisionTransformer.forward_features recomputed with plain ops: (normed CLS, normed patches)."""
    w = sd["patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    heads, regs = dim // 64, sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1)
    pos, n = sd["pos_embed"], sd["pos_embed"].shape[1] - 1
    side, h0, w0 = math.isqrt(n), x.shape[2] // patch, x.shape[3] // patch
    if h0 * w0 != n:
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        kw = {"scale_factor": ((h0 + offset) / side, (w0 + offset) / side)} if offset else {"size": (h0, w0)}
        grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)], 1)
    t = t + pos
    if regs:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(len(x), -1, -1), t[:, 1:]], 1)

    def ln(v, name):
        return F.layer_norm(v, (dim,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    def lin(v, name):
        return v @ sd[name + ".weight"].T + sd[name + ".bias"]

    for i in range(DEPTH):
        p = f"blocks.{i}."
        b, m, _ = t.shape
        q, k, v = lin(ln(t, p + "norm1"), p + "attn.qkv").reshape(b, m, 3, heads, 64).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v  # 1/sqrt(64)
        t = t + sd[p + "ls1.gamma"] * lin(att.transpose(1, 2).reshape(b, m, dim), p + "attn.proj")
        h = ln(t, p + "norm2")
        if p + "mlp.w12.weight" in sd:
            a, gate = lin(h, p + "mlp.w12").chunk(2, -1)
            h = lin(a * torch.sigmoid(a) * gate, p + "mlp.w3")
        else:
            h = lin(F.gelu(lin(h, p + "mlp.fc1")), p + "mlp.fc2")
        t = t + sd[p + "ls2.gamma"] * h
    t = ln(t, "norm")
    return t[:, 0], t[:, regs + 1 :]


def images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.mark.parametrize(("regs", "swiglu"), [(0, False), (4, False), (0, True)])
def test_released_layout_matches_the_official_forward_at_224_and_98_px(tmp_path, regs, swiglu):
    sd = official_state(regs, swiglu)
    torch.save(sd, tmp_path / "dinov2.pth")
    t = teachers.load(str(tmp_path / "dinov2.pth"))
    assert isinstance(t, teachers.BackboneTeacher) and t.family == "dinov2" and t.embed_dim == DIM
    a = t.arch
    assert (a["num_register_tokens"], a["ffn"], a["img_size"], a["num_heads"]) == (
        regs,
        "swiglu" if swiglu else "mlp",
        GRID * PATCH,
        2,
    )
    # the hub's settings: offset 0.1 without antialiasing, or a size with antialiasing for registers
    offset, antialias = (0.0, True) if regs else (0.1, False)
    assert (a["interpolate_offset"], a["interpolate_antialias"]) == (offset, antialias)
    for size in (224, 98):
        x = images(size)
        out = t(x)
        cls, patches = reference(sd, x, offset, antialias)
        assert out.features.shape == (2, DIM) and out.patch_features.shape == (2, (size // PATCH) ** 2, DIM)
        torch.testing.assert_close(out.features, cls, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.patch_features, patches, atol=1e-4, rtol=0)
        assert torch.allclose(t.backbone(x), cls, atol=1e-4)  # the hub model returns the normed CLS


def test_the_interpolation_settings_matter():
    """The original models' offset resize and the registers' antialiased resize give different features."""
    sd = official_state()
    arch = arch_from_state(sd)
    orig, other = (
        build_backbone(arch),
        build_backbone({**arch, "interpolate_offset": 0.0, "interpolate_antialias": True}),
    )
    orig.load_state_dict(sd)
    other.load_state_dict(sd)
    x = images(224)
    with torch.no_grad():
        assert (orig(x) - other(x)).abs().max() > 1e-3


def test_block_math_matches_timm_at_the_native_resolution():
    """At 518 px (no resize) timm's ViT with LayerScale, given the same tensors, computes the same CLS."""
    sd = official_state()
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=GRID * PATCH,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=2,
        init_values=1.0,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    vit.load_state_dict({k: v for k, v in sd.items() if k != "mask_token"})
    net = build_backbone(arch_from_state(sd))
    net.load_state_dict(sd)
    x = images(GRID * PATCH, n=1)
    with torch.no_grad():
        torch.testing.assert_close(net(x), vit.forward_features(x)[:, 0], atol=1e-4, rtol=0)


def test_catalog_records_match_the_loader():
    reg = registry("teachers")
    names = reg.names("dinov2_*")
    assert len(names) == 8 and {n.removesuffix("_reg") for n in names} == {f"dinov2_vit{s}14" for s in "sblg"}
    for n in names:
        r = reg.get(n)
        assert (
            r.family == "dinov2"
            and r["head"] is None
            and r["url"].startswith("https://dl.fbaipublicfiles.com/")
        )
        regs = 4 if n.endswith("_reg") else 0
        assert r["file_name"] == n.removesuffix("_reg") + ("_reg4" if regs else "") + "_pretrain.pth"
        arch = {k: v for k, v in r["arch"].items() if k != "name"}
        with torch.device("meta"):  # the record's architecture, built and read back from its state dict
            shapes = build_backbone(arch).state_dict()
        assert arch_from_state(shapes) == arch, n
        assert arch["num_register_tokens"] == regs and arch["embed_dim"] == 64 * arch["num_heads"]
    assert (
        reg.get("dinov2_vitg14")["arch"]["ffn"] == "swiglu"
        and reg.get("dinov2_vitg14")["arch"]["mlp_hidden"] == 4096
    )


def test_a_file_that_is_not_the_catalog_model_is_refused(tmp_path):
    cache = tmp_path / "home" / "teachers"
    cache.mkdir(parents=True)
    torch.save(official_state(), cache / "dinov2_vits14_pretrain.pth")  # 128 wide, not ViT-S's 384
    with pytest.raises(DINOv2LayoutError, match="embed_dim=384"):
        teachers.load("dinov2_vits14")


def test_missing_keys_are_named(tmp_path):
    sd = official_state()
    del sd["blocks.1.ls2.gamma"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(Exception, match="ls2.gamma"):
        teachers.load(str(tmp_path / "broken.pth"))


def test_a_head_recipe_with_a_headless_teacher_is_refused_clearly_and_verify_runs_it(tmp_path):
    from robkit.cli import main

    torch.save(official_state(), tmp_path / "dinov2.pth")
    runner = CliRunner()
    args = ["distill", "--teacher", str(tmp_path / "dinov2.pth"), "--recipe", "rob-dino"]
    r = runner.invoke(main, [*args, "--out", str(tmp_path / "run")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "without a released head" in r.output and "rob-features" in r.output and "teacher_temp" in r.output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    v = runner.invoke(main, ["teachers", "verify", str(tmp_path / "dinov2.pth")])
    assert v.exit_code == 0, v.output
    assert "patch_features (2, 256, 128)" in v.output and "verify: OK" in v.output
