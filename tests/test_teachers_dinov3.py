"""DINOv3 backbones: the released key layout loads strictly and matches an independent forward pass
(plain torch ops from the state-dict tensors, written after the official ``DinoVisionTransformer`` /
``ConvNeXt``: axial RoPE on the patch tokens only, masked k bias, LayerNorm eps 1e-5) at 224 px, at
160 px and on a non-square image; the catalog agrees with the loader; DINOv2 and DINOv3 files are told
apart; the licence-gated files are never downloaded and the error says where to put them.

Files are generated in ``tmp_path`` with tiny widths but the released names and nesting.
"""

from __future__ import annotations

import math
import urllib.request
from functools import partial

import pytest
import test_teachers_dinov2 as v2
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

import robkit.teachers as teachers
from robkit.catalog import registry
from robkit.teachers import download as dl
from robkit.teachers.dinov3 import DINOv3LayoutError, arch_from_state, build_backbone, dinov3_teacher
from robkit.teachers.layouts import FAMILIES, LayoutError, detect_family

DIM, DEPTH, HEADS, PATCH, STORAGE = 64, 2, 2, 16, 4  # heads 32 wide: 8 RoPE periods
EPS = 1e-5


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield
    torch.hub.set_dir(old_hub)
    registry.cache_clear()


def _gen(seed: int):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    return r


def official_state(
    ffn: str = "mlp",
    qkv_bias: bool = True,
    local_cls_norm: bool = False,
    cls_norm: bool = False,
    storage: int = STORAGE,
    seed: int = 0,
) -> dict:
    """A state dict with the key names, nesting and buffers of ``dinov3_vit*16*_pretrain_*.pth``."""
    r = _gen(seed)
    head_dim = DIM // HEADS
    # RopePositionEmbedding._init_weights with base 100, in float32, as the file stores it
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    sd = {
        "cls_token": r(1, 1, DIM, std=0.5),
        "mask_token": r(1, DIM),
        "rope_embed.periods": periods,
        "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH),
        "patch_embed.proj.bias": r(DIM),
    }
    if storage:
        sd["storage_tokens"] = r(1, storage, DIM, std=0.5)
    hidden = 96 if ffn == "swiglu" else 4 * DIM
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + r(DIM),
            p + "norm1.bias": r(DIM),
            p + "attn.qkv.weight": r(3 * DIM, DIM, std=0.15),
            p + "attn.proj.weight": r(DIM, DIM),
            p + "attn.proj.bias": r(DIM),
            p + "ls1.gamma": r(DIM, std=0.5),
            p + "norm2.weight": 1 + r(DIM),
            p + "norm2.bias": r(DIM),
            p + "ls2.gamma": r(DIM, std=0.5),
        }
        if qkv_bias:  # LinearKMaskedBias: the bias and its mask (1 for q and v, 0 for k)
            sd[p + "attn.qkv.bias"] = r(3 * DIM, std=0.5)
            sd[p + "attn.qkv.bias_mask"] = torch.cat([torch.ones(DIM), torch.zeros(DIM), torch.ones(DIM)])
        if ffn == "swiglu":
            for name, shape in (("w1", (hidden, DIM)), ("w2", (hidden, DIM)), ("w3", (DIM, hidden))):
                sd[p + f"mlp.{name}.weight"], sd[p + f"mlp.{name}.bias"] = r(*shape), r(shape[0])
        else:
            for name, shape in (("fc1", (hidden, DIM)), ("fc2", (DIM, hidden))):
                sd[p + f"mlp.{name}.weight"], sd[p + f"mlp.{name}.bias"] = r(*shape), r(shape[0])
    sd["norm.weight"], sd["norm.bias"] = 1 + r(DIM), r(DIM)
    if cls_norm:
        sd["cls_norm.weight"], sd["cls_norm.bias"] = 1 + r(DIM), r(DIM)
    if local_cls_norm:
        sd["local_cls_norm.weight"], sd["local_cls_norm.bias"] = 1 + r(DIM), r(DIM)
    return sd


# --------------------------------------------------------------------------------------------
# the official forward, recomputed with plain ops


def ref_rope(periods: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RopePositionEmbedding.forward at eval, normalize_coords="separate", float32."""
    coords_h = torch.arange(0.5, h, dtype=torch.float32) / h
    coords_w = torch.arange(0.5, w, dtype=torch.float32) / w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # [HW, 2, D/4]
    angles = angles.flatten(1, 2).tile(2)  # [HW, D]
    return torch.sin(angles), torch.cos(angles)


def ref_rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def reference(sd: dict, x: torch.Tensor, rope_prefix_too: bool = False) -> dict:
    """DinoVisionTransformer.forward_features (eval, no masks) recomputed from the tensors."""
    w = sd["patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    head_dim = 4 * sd["rope_embed.periods"].shape[0]
    heads = dim // head_dim
    regs = sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0
    grid = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=patch)
    h, wd = grid.shape[-2:]
    t = grid.flatten(2).transpose(1, 2)
    prefix = [sd["cls_token"].expand(len(x), -1, -1)]
    if regs:
        prefix.append(sd["storage_tokens"].expand(len(x), -1, -1))
    t = torch.cat([*prefix, t], 1)
    sin, cos = ref_rope(sd["rope_embed.periods"], h, wd)
    n_prefix = t.shape[1] - sin.shape[0]

    def ln(v, name):
        return F.layer_norm(v, (dim,), sd[name + ".weight"], sd[name + ".bias"], eps=EPS)

    def lin(v, name, bias=None):
        b = sd.get(name + ".bias") if bias is None else bias
        return v @ sd[name + ".weight"].T + (b if b is not None else 0)

    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        p = f"blocks.{i}."
        b, m, _ = t.shape
        qkv_b = sd.get(p + "attn.qkv.bias")
        if qkv_b is not None:
            qkv_b = qkv_b * sd[p + "attn.qkv.bias_mask"]
        qkv = lin(ln(t, p + "norm1"), p + "attn.qkv", qkv_b if qkv_b is not None else torch.zeros(3 * dim))
        q, k, v = qkv.reshape(b, m, 3, heads, head_dim).unbind(2)
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))
        if rope_prefix_too:  # the wrong way, to show the test can tell
            s2, c2 = (torch.cat([z[:1].expand(n_prefix, -1), z]) for z in (sin, cos))
            q, k = ref_rope_apply(q, s2, c2), ref_rope_apply(k, s2, c2)
        else:  # SelfAttention.apply_rope: the CLS and storage tokens keep their q and k
            q = torch.cat([q[:, :, :n_prefix], ref_rope_apply(q[:, :, n_prefix:], sin, cos)], dim=2)
            k = torch.cat([k[:, :, :n_prefix], ref_rope_apply(k[:, :, n_prefix:], sin, cos)], dim=2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v
        t = t + sd[p + "ls1.gamma"] * lin(att.transpose(1, 2).reshape(b, m, dim), p + "attn.proj")
        hdn = ln(t, p + "norm2")
        if p + "mlp.w1.weight" in sd:
            hdn = lin(F.silu(lin(hdn, p + "mlp.w1")) * lin(hdn, p + "mlp.w2"), p + "mlp.w3")
        else:
            hdn = lin(F.gelu(lin(hdn, p + "mlp.fc1")), p + "mlp.fc2")
        t = t + sd[p + "ls2.gamma"] * hdn
    if "cls_norm.weight" in sd:
        cls_reg, patches = ln(t[:, : regs + 1], "cls_norm"), ln(t[:, regs + 1 :], "norm")
    else:
        normed = ln(t, "norm")
        cls_reg, patches = normed[:, : regs + 1], normed[:, regs + 1 :]
    return {"cls": cls_reg[:, 0], "storage": cls_reg[:, 1:], "patches": patches, "prenorm": t}


def images(h: int, w: int | None = None, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, h, w or h, generator=torch.Generator().manual_seed(h * 1000 + (w or h)))


SIZES = [(224, 224), (160, 160), (224, 160)]  # the last one is not square (14 x 10 patches)


@pytest.mark.parametrize(
    ("ffn", "qkv_bias", "local", "untied"),
    [
        ("mlp", True, False, False),
        ("swiglu", True, False, False),
        ("swiglu", False, True, False),
        ("mlp", True, True, True),
    ],
    ids=["vit-mlp", "vit-swiglu", "vit7b-like", "untied-norms"],
)
def test_released_layout_matches_the_official_forward(tmp_path, ffn, qkv_bias, local, untied):
    sd = official_state(ffn, qkv_bias, local_cls_norm=local, cls_norm=untied)
    torch.save(sd, tmp_path / "dinov3.pth")
    t = teachers.load(str(tmp_path / "dinov3.pth"))
    assert isinstance(t, teachers.BackboneTeacher) and t.family == "dinov3" and t.embed_dim == DIM
    assert t.patch_size == PATCH
    a = t.arch
    assert (a["num_heads"], a["n_storage_tokens"], a["ffn"], a["qkv_bias"], a["mask_k_bias"]) == (
        HEADS,
        STORAGE,
        ffn,
        qkv_bias,
        qkv_bias,
    )
    assert (a["untie_global_and_local_cls_norm"], a["untie_cls_and_patch_norms"]) == (local, untied)
    # the hub's "layernormbf16": eps 1e-5 (too small a difference for the 1e-4 parity to see)
    norms = [m for m in t.backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * DEPTH + 1 + local + untied and all(m.eps == EPS for m in norms)
    for h, w in SIZES:
        x = images(h, w)
        out = t(x)
        ref = reference(sd, x)
        n = (h // PATCH) * (w // PATCH)
        assert out.features.shape == (2, DIM) and out.patch_features.shape == (2, n, DIM)
        torch.testing.assert_close(out.features, ref["cls"], atol=1e-4, rtol=0)
        torch.testing.assert_close(out.patch_features, ref["patches"], atol=1e-4, rtol=0)
        with torch.no_grad():
            ff = t.backbone.forward_features(x)
            torch.testing.assert_close(ff["x_storage_tokens"], ref["storage"], atol=1e-4, rtol=0)
            torch.testing.assert_close(ff["x_prenorm"], ref["prenorm"], atol=1e-4, rtol=0)
            assert torch.allclose(
                t.backbone(x), ref["cls"], atol=1e-4
            )  # the hub model returns the normed CLS


def test_rope_is_applied_to_the_patch_tokens_only_and_the_k_bias_is_masked():
    """The reference is sensitive to both details: rotating the CLS/storage tokens too, or leaving the
    k bias in, gives other features (the k bias changes nothing mathematically, so only RoPE is checked).
    """
    sd = official_state()
    net = build_backbone(arch_from_state(sd))
    net.load_state_dict(sd)
    x = images(224)
    with torch.no_grad():
        cls = net(x)
    assert (cls - reference(sd, x, rope_prefix_too=True)["cls"]).abs().max() > 1e-3
    assert net.blocks[0].attn.qkv.bias_mask[DIM : 2 * DIM].abs().sum() == 0  # loaded from the file


def test_rope_runs_in_float32_under_a_lower_precision_model():
    sd = official_state()
    net = build_backbone(arch_from_state(sd))
    net.load_state_dict(sd)
    sin, cos = net.rope_embed(4, 3)
    assert sin.dtype == torch.float32 and sin.shape == (12, DIM // HEADS)
    ref_sin, ref_cos = ref_rope(sd["rope_embed.periods"], 4, 3)
    torch.testing.assert_close(sin, ref_sin)
    torch.testing.assert_close(cos, ref_cos)
    net = net.to(torch.bfloat16)
    with torch.no_grad():
        out = net.forward_features(images(64).to(torch.bfloat16))
    assert out["x_norm_patchtokens"].dtype == torch.bfloat16 and torch.isfinite(out["x_norm_clstoken"]).all()


def test_block_math_matches_timm_dinov3(tmp_path):
    """timm's own DINOv3 port (Eva, rope_type='dinov3'), given the same tensors through its converter."""
    eva = pytest.importorskip("timm.models.eva")
    from timm.layers import LayerNorm

    sd = official_state()
    model = eva.Eva(
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        qkv_bias=True,
        init_values=1e-5,
        rope_type="dinov3",
        rope_temperature=100,
        rope_rotate_half=True,
        use_rot_pos_emb=True,
        use_abs_pos_emb=False,
        num_reg_tokens=STORAGE,
        use_fc_norm=False,
        dynamic_img_size=True,
        num_classes=0,
        norm_layer=partial(LayerNorm, eps=EPS),
    ).eval()
    model.load_state_dict(eva.checkpoint_filter_fn(dict(sd), model))
    t = dinov3_teacher(sd, "tiny")
    for h, w in SIZES[:2]:
        x = images(h, w)
        with torch.no_grad():
            tokens = model.forward_features(x)
        out = t(x)
        torch.testing.assert_close(out.features, tokens[:, 0], atol=1e-4, rtol=0)
        torch.testing.assert_close(out.patch_features, tokens[:, 1 + STORAGE :], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# ConvNeXt


CNX_DEPTHS, CNX_DIMS = [1, 1, 2, 1], [16, 24, 32, 48]


def official_convnext_state(seed: int = 0) -> dict:
    """The key names of ``dinov3_convnext_*_pretrain_lvd1689m-*.pth`` (final norm saved twice)."""
    r = _gen(seed)
    d = CNX_DIMS
    sd = {
        "downsample_layers.0.0.weight": r(d[0], 3, 4, 4, std=0.2),
        "downsample_layers.0.0.bias": r(d[0]),
        "downsample_layers.0.1.weight": 1 + r(d[0]),
        "downsample_layers.0.1.bias": r(d[0]),
    }
    for i in range(1, 4):
        sd |= {
            f"downsample_layers.{i}.0.weight": 1 + r(d[i - 1]),
            f"downsample_layers.{i}.0.bias": r(d[i - 1]),
            f"downsample_layers.{i}.1.weight": r(d[i], d[i - 1], 2, 2, std=0.2),
            f"downsample_layers.{i}.1.bias": r(d[i]),
        }
    for s, depth in enumerate(CNX_DEPTHS):
        for j in range(depth):
            p = f"stages.{s}.{j}."
            sd |= {
                p + "gamma": r(d[s], std=0.5),
                p + "dwconv.weight": r(d[s], 1, 7, 7, std=0.2),
                p + "dwconv.bias": r(d[s]),
                p + "norm.weight": 1 + r(d[s]),
                p + "norm.bias": r(d[s]),
                p + "pwconv1.weight": r(4 * d[s], d[s], std=0.2),
                p + "pwconv1.bias": r(4 * d[s]),
                p + "pwconv2.weight": r(d[s], 4 * d[s], std=0.2),
                p + "pwconv2.bias": r(d[s]),
            }
    sd["norm.weight"], sd["norm.bias"] = 1 + r(d[-1]), r(d[-1])
    sd["norms.3.weight"], sd["norms.3.bias"] = sd["norm.weight"].clone(), sd["norm.bias"].clone()
    return sd


def reference_convnext(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ConvNeXt.forward_features of dinov3/models/convnext.py with plain ops: (normed pool, normed patches)."""

    def ln_first(v, name):  # LayerNorm(data_format="channels_first"), eps 1e-6
        u = v.mean(1, keepdim=True)
        s = (v - u).pow(2).mean(1, keepdim=True)
        return (
            sd[name + ".weight"][:, None, None] * ((v - u) / torch.sqrt(s + 1e-6))
            + sd[name + ".bias"][:, None, None]
        )

    for i in range(4):
        p = f"downsample_layers.{i}."
        if i == 0:
            x = ln_first(F.conv2d(x, sd[p + "0.weight"], sd[p + "0.bias"], stride=4), p + "1")
        else:
            x = F.conv2d(ln_first(x, p + "0"), sd[p + "1.weight"], sd[p + "1.bias"], stride=2)
        for j in range(CNX_DEPTHS[i]):
            q = f"stages.{i}.{j}."
            c = x.shape[1]
            y = F.conv2d(x, sd[q + "dwconv.weight"], sd[q + "dwconv.bias"], padding=3, groups=c).permute(
                0, 2, 3, 1
            )
            y = F.layer_norm(y, (c,), sd[q + "norm.weight"], sd[q + "norm.bias"], eps=1e-6)
            y = F.gelu(y @ sd[q + "pwconv1.weight"].T + sd[q + "pwconv1.bias"])
            y = sd[q + "gamma"] * (y @ sd[q + "pwconv2.weight"].T + sd[q + "pwconv2.bias"])
            x = x + y.permute(0, 3, 1, 2)
    pooled = x.mean([-2, -1])
    tokens = torch.cat([pooled.unsqueeze(1), x.flatten(2).transpose(1, 2)], dim=1)
    normed = F.layer_norm(tokens, (x.shape[1],), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return normed[:, 0], normed[:, 1:]


def test_convnext_released_layout_matches_the_official_forward(tmp_path):
    sd = official_convnext_state()
    torch.save(sd, tmp_path / "convnext.pth")
    t = teachers.load(str(tmp_path / "convnext.pth"))
    assert t.family == "dinov3" and t.embed_dim == CNX_DIMS[-1] and t.patch_size == 32
    assert (
        t.arch["type"] == "dinov3_convnext" and t.arch["depths"] == CNX_DEPTHS and t.arch["dims"] == CNX_DIMS
    )
    for h, w in SIZES:
        x = images(h, w)
        out = t(x)
        cls, patches = reference_convnext(sd, x)
        assert out.patch_features.shape == (2, (h // 32) * (w // 32), CNX_DIMS[-1])
        torch.testing.assert_close(out.features, cls, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.patch_features, patches, atol=1e-4, rtol=0)
        assert torch.allclose(t.backbone(x), cls, atol=1e-4)
    assert "norms.3.weight" in t.backbone.state_dict()  # saved twice, as the official module does


# --------------------------------------------------------------------------------------------
# catalog, layout detection, errors


def test_catalog_records_match_the_loader():
    reg = registry("teachers")
    names = reg.names("dinov3_*")
    vits = {f"dinov3_{a}" for a in ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16")}
    sats = {"dinov3_vitl16_sat493m", "dinov3_vit7b16_sat493m"}
    convs = {f"dinov3_convnext_{s}" for s in ("tiny", "small", "base", "large")}
    assert set(names) == vits | sats | convs
    for n in names:
        r = reg.get(n)
        assert r.family == "dinov3" and r["head"] is None and r["license"] == "DINOv3 License"
        assert (
            r["url"] is None and r["file_only"] is True and r["get_from"].startswith("https://ai.meta.com/")
        )
        weights = "sat493m" if n in sats else "lvd1689m"
        stem = n.removesuffix("_sat493m")
        assert r["file_name"] == f"{stem}_pretrain_{weights}-{r['sha256_prefix']}.pth" == r["hub_file_name"]
        assert len(r["sha256_prefix"]) == 8 and r["hub"]["weights"] == weights.upper()
        mean = r["normalization"]["mean"]
        assert mean == ([0.430, 0.411, 0.296] if n in sats else [0.485, 0.456, 0.406]), n
        arch = {k: v for k, v in r["arch"].items() if k != "name"}
        with torch.device("meta"):  # the record's architecture, built and read back from its state dict
            shapes = build_backbone(arch).state_dict()
        assert arch_from_state(shapes) == arch, n
        assert detect_family(shapes) == "dinov3"
        if n in convs:
            assert r["resolution"] == 256
        else:
            assert r["resolution"] == 224 and arch["n_storage_tokens"] == 4 and arch["patch_size"] == 16
            assert "rope_embed.periods" in shapes and "pos_embed" not in shapes
            assert ("local_cls_norm.weight" in shapes) == ("7b" in n or n == "dinov3_vitl16_sat493m")
    a7 = reg.get("dinov3_vit7b16")["arch"]
    assert (a7["ffn"], a7["ffn_hidden"], a7["qkv_bias"], a7["num_heads"]) == ("swiglu", 8192, False, 32)
    assert reg.get("dinov3_vits16plus")["arch"]["ffn_hidden"] == 1536
    assert reg.get("dinov3_vith16plus")["arch"]["ffn_hidden"] == 5120
    assert reg.get("dinov3_convnext_tiny")["arch"]["depths"] == [3, 3, 9, 3]
    assert "dinov3" in FAMILIES


def test_dinov2_and_dinov3_files_are_told_apart():
    from robkit.teachers.dinov2 import DINOv2LayoutError, is_dinov2_state
    from robkit.teachers.dinov2 import arch_from_state as arch_v2

    d2, d2reg = v2.official_state(), v2.official_state(regs=4)
    d3 = official_state()
    assert detect_family(d2) == detect_family(d2reg) == "dinov2"
    assert detect_family(d3) == detect_family(official_convnext_state()) == "dinov3"
    assert not is_dinov2_state(d3)
    with pytest.raises(DINOv3LayoutError, match="not a DINOv3 backbone"):
        arch_from_state(d2reg)
    with pytest.raises(DINOv2LayoutError, match="not a DINOv2 backbone"):
        arch_v2(d3)
    # a DINOv3-like file with a position table is not DINOv3
    assert detect_family({**d3, "pos_embed": torch.zeros(1, 197, DIM)}) != "dinov3"


def test_missing_keys_are_named(tmp_path):
    sd = official_state()
    del sd["blocks.1.ls2.gamma"], sd["norm.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(
        Exception, match=r"blocks\.1\.ls2\.gamma.*norm\.bias|norm\.bias.*blocks\.1\.ls2\.gamma"
    ):
        teachers.load(str(tmp_path / "broken.pth"))
    cn = official_convnext_state()
    del cn["norms.3.weight"]
    torch.save(cn, tmp_path / "broken_cn.pth")
    with pytest.raises(LayoutError):  # without norms.3 it is not the DINOv3 ConvNeXt layout
        teachers.load(str(tmp_path / "broken_cn.pth"))
    cn = official_convnext_state()
    del cn["stages.2.1.pwconv2.bias"]
    torch.save(cn, tmp_path / "broken_cn2.pth")
    with pytest.raises(Exception, match=r"stages\.2\.1\.pwconv2\.bias"):
        teachers.load(str(tmp_path / "broken_cn2.pth"))


def test_a_declared_architecture_must_match_the_file():
    with pytest.raises(DINOv3LayoutError, match="embed_dim=384"):
        dinov3_teacher(official_state(), "dinov3_vits16", declared={"embed_dim": 384})
    with pytest.raises(DINOv3LayoutError, match="type='dinov3_convnext'"):
        dinov3_teacher(official_state(), "x", declared={"type": "dinov3_convnext"})


def _no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a network request was made")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("offline", [True, False])
def test_a_gated_file_is_never_downloaded_and_the_error_says_where_to_put_it(tmp_path, monkeypatch, offline):
    _no_network(monkeypatch)
    if not offline:
        monkeypatch.delenv("ROBKIT_OFFLINE")
    with pytest.raises(dl.DownloadError) as e:
        teachers.load("dinov3_vits16", download=True)
    msg = str(e.value)
    folder = tmp_path / "home" / "teachers"
    assert "dinov3_vits16_pretrain_lvd1689m-08c60483.pth" in msg and str(folder) in msg
    assert str(folder / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth") in msg
    assert "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/" in msg
    assert "licence" in msg and "None" not in msg
    assert not folder.exists() or not any(folder.iterdir())  # nothing written, not even a .part


def test_info_and_fetch_explain_how_to_obtain_a_gated_file(tmp_path, monkeypatch):
    from robkit.cli import main

    _no_network(monkeypatch)
    runner = CliRunner()
    r = runner.invoke(main, ["teachers", "info", "dinov3_vits16"])
    assert r.exit_code == 0, r.output
    target = tmp_path / "home" / "teachers" / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    hub = tmp_path / "hub" / "checkpoints" / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    assert str(target) in r.output and str(hub) in r.output and "will download" not in r.output
    assert "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/" in r.output
    f = runner.invoke(main, ["teachers", "fetch", "dinov3_vits16"])
    assert f.exit_code != 0 and str(target) in f.output and "Traceback" not in f.output


def test_a_file_that_is_not_the_release_is_refused(tmp_path):
    cache = tmp_path / "home" / "teachers"
    cache.mkdir(parents=True)
    torch.save(official_state(), cache / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    with pytest.raises(DINOv3LayoutError, match="08c60483"):  # its sha256 does not start with the name's hash
        teachers.load("dinov3_vits16")


@pytest.mark.parametrize("where", ["robkit", "hub"])
def test_a_gated_file_put_in_place_loads_by_name(tmp_path, monkeypatch, where):
    _no_network(monkeypatch)
    src = tmp_path / "src.pth"
    torch.save(official_state(), src)
    prefix = dl.sha256_file(src, memo=False)[:8]
    name = f"dinov3_vittiny16_pretrain_sat493m-{prefix}.pth"
    cat = tmp_path / "catalog"
    (cat / "teachers").mkdir(parents=True)
    doc = {
        "family": "dinov3",
        "url": None,
        "file_only": True,
        "get_from": "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/",
        "sha256": None,
        "normalization": {"mean": [0.430, 0.411, 0.296], "std": [0.213, 0.156, 0.143]},
        "resolution": 224,
        "records": [
            {
                "name": "dinov3_tiny_test",
                "file_name": name,
                "hub_file_name": name,
                "sha256_prefix": prefix,
                "arch": {"name": "tiny", **arch_from_state(official_state())},
            }
        ],
    }
    (cat / "teachers" / "tiny.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("ROBKIT_CATALOG_PATH", str(cat))
    registry.cache_clear()
    dest = (tmp_path / "home" / "teachers") if where == "robkit" else (tmp_path / "hub" / "checkpoints")
    dest.mkdir(parents=True)
    src.rename(dest / name)
    t = teachers.load("dinov3_tiny_test")
    assert t.family == "dinov3" and t.mean == (0.430, 0.411, 0.296) and t.std == (0.213, 0.156, 0.143)
    assert t.source == str(dest / name)


def test_verify_runs_a_dinov3_file(tmp_path):
    from robkit.cli import main

    torch.save(official_state(), tmp_path / "dinov3.pth")
    v = CliRunner().invoke(main, ["teachers", "verify", str(tmp_path / "dinov3.pth")])
    assert v.exit_code == 0, v.output
    assert (
        "family:  dinov3" in v.output
        and "patch_features (2, 196, 64)" in v.output
        and "verify: OK" in v.output
    )
