"""Multi-crop sampler: crop geometry, resolutions, replay, photometric ops against torchvision v2
and SSLight's pixel-scale ratio."""

import itertools
import math

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from robkit.data.views import MultiCropViews, ViewParams, _color_jitter, _gaussian_blur, blur_radius

DINO_JITTER = (0.4, 0.4, 0.2, 0.1)
ALPHA = 0.001


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
        r = (w / h)[sampled & ~fallback]  # the whole image keeps the image's own aspect ratio
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


# ---------------------------------------------------------------------- photometric ops vs torchvision v2


def _ks_critical(n: int, m: int) -> float:
    """Two-sample Kolmogorov-Smirnov critical distance at ``ALPHA`` (asymptotic)."""
    return math.sqrt(-math.log(ALPHA / 2) / 2) * math.sqrt((n + m) / (n * m))


def test_color_jitter_equals_torchvision_ops_in_each_images_order():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(26, 3, 12, 12, generator=g)
    cp = MultiCropViews().sample_crop(0, torch.full((26, 2), 12), g)
    order = torch.tensor(list(itertools.permutations(range(4))) + [(0, 1, 2, 3), (3, 2, 1, 0)])
    on = torch.ones(26, dtype=torch.bool)
    on[-2:] = False  # switched off: unchanged
    y = _color_jitter(x, cp.jitter, on, order)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(24):
        e = x[i]
        for op in order[i].tolist():
            e = ops[op](e, float(cp.jitter[i, op]))
        assert torch.allclose(y[i], e, atol=1e-5, rtol=0), f"image {i}, order {order[i].tolist()}"
    assert torch.equal(y[-2:], x[-2:])


def test_jitter_orders_are_drawn_per_image_and_uniform_over_the_24_permutations():
    v = _views()
    n = 24000
    cp = v.sample_crop(0, torch.full((n, 2), 28), torch.Generator().manual_seed(0))
    order = cp.jitter_order
    assert order.shape == (n, 4) and order.dtype == torch.long
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))  # permutations
    code = order @ torch.tensor([64, 16, 4, 1])
    counts = torch.unique(code, return_counts=True)[1]
    assert counts.numel() == 24
    chi2 = float(((counts - n / 24) ** 2 / (n / 24)).sum())
    assert chi2 < stats.chi2.ppf(1 - ALPHA, 23), chi2
    # images of one batch get different orders (~18 distinct among 32), every crop index too
    assert torch.unique(code[:32]).numel() >= 10
    other = v.sample_crop(1, torch.full((32, 2), 28), torch.Generator().manual_seed(1)).jitter_order
    assert torch.unique(other @ torch.tensor([64, 16, 4, 1])).numel() >= 10
    # selecting rows (one process's share of the batch) keeps each image's own order
    rows = torch.tensor([5, 0, 17])
    assert torch.equal(cp.index(rows).jitter_order, order[rows])


def test_jitter_pipeline_matches_torchvision_random_apply_color_jitter_in_distribution():
    """DINO's ``RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)`` on the same images, other seed."""
    n = 2000
    g = torch.Generator().manual_seed(0)
    # two-tone, saturated, high-contrast images, where clamping and hue's effect on grey matter
    c1 = 0.05 + 0.9 * (torch.rand(n, 3, 1, 1, generator=g) > 0.5).float()
    c2 = 0.05 + 0.9 * (torch.rand(n, 3, 1, 1, generator=g) > 0.5).float()
    mask = (torch.rand(n, 1, 8, 8, generator=g) > 0.5).float()
    x = c1 * mask + c2 * (1 - mask)
    v = MultiCropViews(jitter=DINO_JITTER, jitter_p=0.8)
    cp = v.sample_crop(0, torch.full((n, 2), 8), torch.Generator().manual_seed(1))
    ours = _color_jitter(x, cp.jitter, cp.jitter_on, cp.jitter_order)
    tv = v2.RandomApply([v2.ColorJitter(*DINO_JITTER)], p=0.8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny per-image calls: threads only add overhead
    try:
        with torch.random.fork_rng():
            torch.manual_seed(2)
            ref = torch.stack([tv(xi) for xi in x])
    finally:
        torch.set_num_threads(threads)

    def worst_ks(y: torch.Tensor) -> float:
        stat = lambda t: (t.mean((1, 2, 3)), t.std((1, 2, 3)), t[:, 1].mean((1, 2)))  # noqa: E731
        return max(float(stats.ks_2samp(a.numpy(), b.numpy()).statistic) for a, b in zip(stat(y), stat(ref)))

    crit = _ks_critical(n, n)
    assert worst_ks(ours) < crit
    # the comparison has the power to see a wrong probability (always on) at this sample size
    always = _color_jitter(x, cp.jitter, torch.ones(n, dtype=torch.bool), cp.jitter_order)
    assert worst_ks(always) > crit


def test_gaussian_blur_equals_torchvision_inside_the_image_per_image_sigma():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    sigma = torch.tensor([0.0, 0.1, 0.5, 1.0, 1.7, 2.0])
    y = _gaussian_blur(x, sigma)
    assert torch.equal(y[0], x[0])  # sigma 0: no blur
    for i in range(1, 6):
        s = float(sigma[i])
        r = blur_radius(s, 32, 32)
        assert r == math.ceil(3 * s)  # the whole 3-sigma reach fits a 32 px crop
        e = TF.gaussian_blur(x[i], kernel_size=[2 * r + 1] * 2, sigma=[s, s])
        assert torch.allclose(y[i], e, atol=1e-5, rtol=0)  # both pad by reflection
        m = 6  # the widest radius: borders padded the same way, the inside cannot depend on padding
        assert torch.allclose(y[i, :, m:-m, m:-m], e[:, m:-m, m:-m], atol=1e-5, rtol=0)
    # small crops: the kernel is clamped to what reflect padding allows (radius < size)
    assert blur_radius(2.0, 18, 18) == 6 and blur_radius(2.0, 5, 5) == 4 and blur_radius(2.0, 1, 1) == 0
    small = torch.rand(2, 3, 5, 5, generator=g)
    out = _gaussian_blur(small, torch.tensor([2.0, 2.0]))
    assert out.shape == small.shape and bool(torch.isfinite(out).all())
    assert torch.allclose(out, TF.gaussian_blur(small, kernel_size=[9, 9], sigma=[2.0, 2.0]), atol=1e-5)


@pytest.mark.parametrize("size", [32, 224])
def test_blur_sigma_is_dinos_range_in_pixels_of_the_rendered_crop(size):
    v = MultiCropViews(
        global_size_px=size, local_size_px=size // 2, global_blur_p=(1.0, 1.0), local_blur_p=1.0
    )
    n = 4000
    for c in (0, v.n_global):  # a global and a local crop
        sig = v.sample_crop(c, torch.full((n, 2), 256), torch.Generator().manual_seed(0)).blur_sigma
        assert float(sig.min()) >= 0.1 and float(sig.max()) <= 2.0
        d = float(stats.kstest(sig.numpy(), stats.uniform(loc=0.1, scale=1.9).cdf).statistic)
        assert d < math.sqrt(-math.log(ALPHA / 2) / 2) / math.sqrt(n), d


def test_rendering_a_share_of_the_batch_gives_those_images_views():
    """Each image's views depend on its own parameters only (per-image jitter order and blur width)."""
    v = _views(global_blur_p=(1.0, 1.0), local_blur_p=1.0)
    imgs = torch.randint(0, 256, (16, 3, 28, 28), dtype=torch.uint8)
    out, params = v(imgs, torch.Generator().manual_seed(4))
    rows = torch.tensor([3, 11])
    part = v.render(imgs[rows], ViewParams([cp.index(rows) for cp in params.crops]))
    for a, b in zip(part, out):
        assert torch.allclose(a, b[rows], atol=1e-5)
