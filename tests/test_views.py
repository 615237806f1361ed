"""Multi-crop sampler: crop geometry, resolutions, replay and SSLight's pixel-scale ratio."""

import math

import pytest
import torch

from robkit.data.views import MultiCropViews


def _views(**kw):
    base = dict(
        n_global=2,
        n_local=4,
        global_size_px=32,
        local_size_px=16,
        global_scale=(0.3, 1.0),
        local_scale=(0.05, 0.3),
    )
    return MultiCropViews(**{**base, **kw})


def test_crops_respect_scale_ranges_ratio_and_image_bounds():
    v = _views()
    g = torch.Generator().manual_seed(0)
    hw = torch.tensor([[28, 28]] * 500 + [[20, 28]] * 500)
    params = v.sample(hw, g)
    for c, cp in enumerate(params.crops):
        lo, hi = v.global_scale if c < v.n_global else v.local_scale
        w = cp.boxes[:, 2] - cp.boxes[:, 0]
        h = cp.boxes[:, 3] - cp.boxes[:, 1]
        area = (hw[:, 0] * hw[:, 1]).float()
        frac = w * h / area
        fits = (cp.boxes[:, 0] >= -1e-4) & (cp.boxes[:, 1] >= -1e-4)
        fits &= (cp.boxes[:, 2] <= hw[:, 1] + 1e-4) & (cp.boxes[:, 3] <= hw[:, 0] + 1e-4)
        assert bool(fits.all()), "a crop leaves the image"
        sampled = (frac >= lo - 1e-4) & (frac <= hi + 1e-4)
        fallback = frac > 0.999  # RandomResizedCrop's whole-image fallback after 10 tries
        assert bool((sampled | fallback).all())
        r = (w / h)[sampled]
        assert float(r.min()) >= 3 / 4 - 1e-3 and float(r.max()) <= 4 / 3 + 1e-3
        # the draws cover the range rather than sitting at one value
        assert float(frac[sampled].max() - frac[sampled].min()) > 0.5 * (hi - lo)


def test_render_sizes_normalisation_and_exact_replay():
    v = _views()
    imgs = torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8)
    out, params = v(imgs, torch.Generator().manual_seed(3))
    assert [tuple(t.shape) for t in out] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 4
    again = v.render(imgs, params)
    for a, b in zip(out, again):
        assert torch.equal(a, b)
    # re-render only the global crops from the stored parameters (teacher-target caching)
    params.crops = params.crops[:2]
    glob = v.render(imgs, params)
    assert torch.equal(glob[0], out[0]) and torch.equal(glob[1], out[1])


def test_identity_crop_without_photometric_changes_reproduces_the_image():
    v = _views(
        flip_p=0.0,
        jitter_p=0.0,
        grayscale_p=0.0,
        global_blur_p=(0.0, 0.0),
        local_blur_p=0.0,
        global_solarize_p=(0.0, 0.0),
        global_size_px=28,
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    imgs = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    params = v.sample(torch.tensor([[28, 28]] * 4), torch.Generator().manual_seed(0))
    params.crops[0].boxes[:] = torch.tensor([0.0, 0.0, 28.0, 28.0])
    out = v.render(imgs, params)
    assert torch.allclose(out[0], imgs.float() / 255, atol=1e-5)


def test_flip_and_solarize_are_what_they_claim():
    v = _views(
        jitter_p=0.0,
        grayscale_p=0.0,
        global_blur_p=(0.0, 0.0),
        local_blur_p=0.0,
        global_solarize_p=(0.0, 0.0),
        global_size_px=28,
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    imgs = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    params = v.sample(torch.tensor([[28, 28]] * 2), torch.Generator().manual_seed(0))
    cp = params.crops[0]
    cp.boxes[:] = torch.tensor([0.0, 0.0, 28.0, 28.0])
    cp.flip[:] = torch.tensor([True, False])
    cp.solarize[:] = torch.tensor([False, True])
    out = v.render(imgs, params)[0]
    x = imgs.float() / 255
    assert torch.allclose(out[0], x[0].flip(-1), atol=1e-5)
    assert torch.allclose(out[1], torch.where(x[1] >= 0.5, 1 - x[1], x[1]), atol=1e-5)


@pytest.mark.parametrize("scale,lc,expected", [(0.14, 103, 1.0), (0.3, 128, 1.0)])
def test_pixel_scale_ratio_matches_sslight_rule(scale, lc, expected):
    """SSLight sec. 3.3.2: with S_g = S_l = S, mean(PS_g/PS_l) ~ 1 at LC = 103 (S=0.14) and 128 (S=0.3)."""
    v = MultiCropViews(global_scale=(scale, 1.0), local_scale=(0.05, scale), local_size_px=lc)
    assert v.pixel_scale_ratio() == pytest.approx(expected, abs=0.06)
    # and the ratio scales inversely with the local resolution
    v2 = MultiCropViews(global_scale=(scale, 1.0), local_scale=(0.05, scale), local_size_px=lc // 2)
    assert v2.pixel_scale_ratio() == pytest.approx(2 * v.pixel_scale_ratio(), rel=0.05)


def test_bad_scale_is_refused_with_the_value():
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropViews(global_scale=(0.5, 1.5))
    assert math.isfinite(_views().pixel_scale_ratio(28))
