"""Multi-crop views rendered in batches on tensors, with explicit, replayable parameters.

``MultiCropViews`` turns a batch of ``uint8 [B, 3, S, S]`` images into the crop-major list of
views the objectives expect (global crops first, then local crops).  All randomness is drawn
up front into a ``ViewParams`` record (crop boxes, flips, colour-jitter factors and order,
grey-scale, blur sigma, solarisation), so a view can be re-rendered exactly later, e.g. to
replay the global views whose teacher targets were cached.

Geometry follows ``RandomResizedCrop`` (area fraction ``scale``, aspect ratio in (3/4, 4/3),
ten tries then the whole image); crops are resampled with ``torchvision.ops.roi_align``
(bilinear when enlarging, area-averaging when shrinking, so small locals do not alias).
Photometric augmentation follows DINO's transforms (Caron et al. 2021), applied to the rendered
crop in this order:

* colour jitter with probability ``jitter_p`` (0.8): brightness, contrast, saturation and hue
  factors drawn per image, applied in an order drawn per image (a uniform random permutation of
  the four operations, as each call of torchvision's ``ColorJitter`` draws one); the maths are
  torchvision's tensor ops (grey levels with its weights 0.2989 / 0.587 / 0.114);
* grey-scale (p 0.2);
* Gaussian blur with a per-view probability and sigma uniform in ``blur_sigma`` (0.1, 2.0) in
  pixels of the rendered crop, whatever its size, as DINO blurs the output of
  ``RandomResizedCrop`` (PIL ``GaussianBlur(radius=sigma)``); the kernel is truncated at
  ``ceil(3 sigma)`` pixels per image (PIL's blur reaches about as far), at most ``size - 1`` so
  that the reflect padding fits inside the crop (:func:`blur_radius`);
* solarisation (per-view probability).

SSLight (Tan et al. 2023) tunes this sampler: crop scales ``S_g``/``S_l``, resolutions
``GC``/``LC``, the number of locals ``N_l``; ``pixel_scale_ratio`` reports eq. 1's
``mean(PS_g / PS_l)`` so ``LC`` can be chosen to make it about 1 (sec. 3.3.2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from robkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD
from robkit.utils.errors import RecipeError


@dataclass
class CropParams:
    """Random parameters of one crop index for a batch of B images (all tensors have B rows)."""

    boxes: torch.Tensor  # float [B, 4] x0, y0, x1, y1 in canvas pixels
    flip: torch.Tensor  # bool [B]
    jitter: torch.Tensor  # float [B, 4] brightness, contrast, saturation factors, hue shift
    jitter_on: torch.Tensor  # bool [B]
    jitter_order: torch.Tensor  # long [B, 4]: op (0 b, 1 c, 2 s, 3 h) at each position, per image
    gray: torch.Tensor  # bool [B]
    blur_sigma: torch.Tensor  # float [B], 0 = no blur (in output pixels)
    solarize: torch.Tensor  # bool [B]

    def index(self, idx: torch.Tensor) -> CropParams:
        """The parameters of the images ``idx`` (rows selected from every tensor)."""
        return CropParams(
            self.boxes[idx],
            self.flip[idx],
            self.jitter[idx],
            self.jitter_on[idx],
            self.jitter_order[idx],
            self.gray[idx],
            self.blur_sigma[idx],
            self.solarize[idx],
        )

    def to(self, device: torch.device | str) -> CropParams:
        """The same parameters on ``device`` (drawn on the host, rendered where the model runs)."""
        return CropParams(
            *(
                getattr(self, f.name).to(device, non_blocking=True)
                for f in dataclasses.fields(self)  # in declaration order, as the constructor takes them
            )
        )


@dataclass
class ViewParams:
    """The drawn parameters of every crop of one batch, one :class:`CropParams` per crop index."""

    crops: list[CropParams]


@dataclass(frozen=True)
class MultiCropViews:
    """DINO-style multi-crop sampler; keyword defaults are DINO's (Caron et al. 2021, sec. 3 / appendix).

    Per-view lists (``global_blur_p``, ``global_solarize_p``) hold one value per global crop.
    """

    n_global: int = 2
    n_local: int = 8
    global_size_px: int = 224
    local_size_px: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    global_blur_p: tuple[float, ...] | float = (1.0, 0.1)
    local_blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    global_solarize_p: tuple[float, ...] | float = (0.0, 0.2)
    local_solarize_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    _tries: int = field(default=10, repr=False)

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise RecipeError(f"views.{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        if self.n_global < 1:
            raise RecipeError(f"views.n_global must be >= 1, got {self.n_global}")

    @property
    def n_crops(self) -> int:
        """Number of crops per image, global and local."""
        return self.n_global + self.n_local

    def crop_size(self, c: int) -> int:
        """Side in px of crop ``c`` (global crops first, then local)."""
        return self.global_size_px if c < self.n_global else self.local_size_px

    def _per_view(self, values: tuple[float, ...] | float, c: int) -> float:
        if isinstance(values, (int, float)):
            return float(values)
        return float(values[min(c, len(values) - 1)])

    # ------------------------------------------------------------------ sampling
    def _boxes(self, valid_hw: torch.Tensor, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
        b = valid_hw.shape[0]
        h, w = valid_hw[:, 0:1].float(), valid_hw[:, 1:2].float()
        area = h * w
        t = self._tries
        s = torch.empty(b, t).uniform_(scale[0], scale[1], generator=g)
        logr = torch.empty(b, t).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=g)
        r = torch.exp(logr)
        cw, ch = torch.sqrt(area * s * r), torch.sqrt(area * s / r)
        ok = (cw <= w) & (ch <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
        rows = torch.arange(b)
        cw_sel = torch.where(first >= 0, cw[rows, first.clamp(min=0)], w[:, 0])
        ch_sel = torch.where(first >= 0, ch[rows, first.clamp(min=0)], h[:, 0])
        u = torch.rand(b, 2, generator=g)
        x0 = u[:, 0] * (w[:, 0] - cw_sel)
        y0 = u[:, 1] * (h[:, 0] - ch_sel)
        return torch.stack([x0, y0, x0 + cw_sel, y0 + ch_sel], dim=1)

    def sample_crop(self, c: int, valid_hw: torch.Tensor, g: torch.Generator) -> CropParams:
        """Draw the parameters of crop ``c`` for a batch; ``valid_hw`` is ``long [B, 2]``."""
        b = valid_hw.shape[0]
        is_global = c < self.n_global
        scale = self.global_scale if is_global else self.local_scale
        boxes = self._boxes(valid_hw, scale, g)
        flip = torch.rand(b, generator=g) < self.flip_p
        bj, cj, sj, hj = self.jitter
        u = torch.rand(b, 4, generator=g)
        jitter = torch.stack(
            [
                1 - bj + 2 * bj * u[:, 0],
                1 - cj + 2 * cj * u[:, 1],
                1 - sj + 2 * sj * u[:, 2],
                -hj + 2 * hj * u[:, 3],
            ],
            dim=1,
        )
        jitter_on = torch.rand(b, generator=g) < self.jitter_p
        # one uniform random permutation per image (argsort of i.i.d. uniforms), like a fresh
        # ``torch.randperm(4)`` per ``ColorJitter`` call, without a loop over the images
        order = torch.rand(b, 4, generator=g).argsort(dim=1)
        gray = torch.rand(b, generator=g) < self.grayscale_p
        blur_p = self._per_view(self.global_blur_p, c) if is_global else self.local_blur_p
        # in pixels of the rendered crop (DINO blurs the output of RandomResizedCrop), not rescaled
        sig = torch.empty(b).uniform_(self.blur_sigma[0], self.blur_sigma[1], generator=g)
        sig = torch.where(torch.rand(b, generator=g) < blur_p, sig, torch.zeros(b))
        sol_p = self._per_view(self.global_solarize_p, c) if is_global else self.local_solarize_p
        solarize = torch.rand(b, generator=g) < sol_p
        return CropParams(boxes, flip, jitter, jitter_on, order, gray, sig, solarize)

    def sample(self, valid_hw: torch.Tensor, g: torch.Generator, crops: range | None = None) -> ViewParams:
        """Draw the parameters of every crop for a batch; ``valid_hw`` is ``long [B, 2]``."""
        crops = crops if crops is not None else range(self.n_crops)
        return ViewParams([self.sample_crop(c, valid_hw, g) for c in crops])

    # ------------------------------------------------------------------ rendering
    def render(self, images: torch.Tensor, params: ViewParams, first_crop: int = 0) -> list[torch.Tensor]:
        """Render the crops of ``params`` from ``uint8``/float ``[B, 3, S, S]`` images → normalised views.

        Rendered on the images' device; ``params`` (drawn on the host) are moved there.
        """
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        out: list[torch.Tensor] = []
        i = 0
        # Blur radii are read from the host copy of the parameters: reading them on the device
        # would make every step wait for it.
        radii = [
            blur_radius(float(cp.blur_sigma.max()), size, size) if bool((cp.blur_sigma > 0).any()) else 0
            for cp, size in ((c, self.crop_size(first_crop + k)) for k, c in enumerate(params.crops))
        ]
        crops = [cp.to(x.device) for cp in params.crops]
        while i < len(crops):  # one roi_align per run of same-size crops
            size = self.crop_size(first_crop + i)
            j = i
            while j < len(crops) and self.crop_size(first_crop + j) == size:
                j += 1
            out.extend(self._render_group(x, crops[i:j], size, radii[i:j]))
            i = j
        return out

    def _render_group(
        self, x: torch.Tensor, crops: list[CropParams], size: int, radii: list[int]
    ) -> list[torch.Tensor]:
        b = x.shape[0]
        n = len(crops)
        boxes = torch.cat([cp.boxes for cp in crops], 0).to(x.dtype)
        idx = torch.arange(b, dtype=boxes.dtype, device=x.device).repeat(n).unsqueeze(1)
        v = roi_align(
            x,
            torch.cat([idx, boxes], 1),
            output_size=size,
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        )  # [n*B, 3, size, size]
        flip = torch.cat([cp.flip for cp in crops])
        v = torch.where(flip.view(-1, 1, 1, 1), v.flip(-1), v)
        views = []
        for k, cp in enumerate(crops):
            vk = v[k * b : (k + 1) * b]
            vk = _color_jitter(vk, cp.jitter, cp.jitter_on, cp.jitter_order)
            vk = torch.where(cp.gray.view(-1, 1, 1, 1), _gray(vk).expand_as(vk), vk)
            vk = _gaussian_blur(vk, cp.blur_sigma, radii[k])
            vk = torch.where(cp.solarize.view(-1, 1, 1, 1), torch.where(vk >= 0.5, 1.0 - vk, vk), vk)
            views.append(vk)
        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return [(vk - m) / s for vk in views]

    def __call__(
        self, images: torch.Tensor, g: torch.Generator, valid_hw: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], ViewParams]:
        """Draw and render every crop of a batch: ``(views, params)``; ``valid_hw`` defaults to the
        whole images.
        """
        if valid_hw is None:
            valid_hw = torch.tensor([[images.shape[-2], images.shape[-1]]]).expand(images.shape[0], 2)
        params = self.sample(valid_hw, g)
        return self.render(images, params), params

    # ------------------------------------------------------------------ SSLight eq. 1
    def pixel_scale_ratio(self, canvas_px: int = 224, n: int = 20000, seed: int = 0) -> float:
        """Monte-Carlo ``mean(PS_g / PS_l)`` with ``PS = final size / cropped size`` (SSLight eq. 1)."""
        g = torch.Generator().manual_seed(seed)
        hw = torch.full((n, 2), canvas_px)
        bg = self._boxes(hw, self.global_scale, g)
        bl = self._boxes(hw, self.local_scale, g)

        def side(bx: torch.Tensor) -> torch.Tensor:
            return torch.sqrt((bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1]))

        ps_g = self.global_size_px / side(bg)
        ps_l = self.local_size_px / side(bl)
        return float((ps_g / ps_l).mean())


def _gray(x: torch.Tensor) -> torch.Tensor:
    # torchvision's tensor grey levels (PIL's ``convert("L")`` uses 0.299 for red)
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(
        maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc)
    )
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    return torch.stack([r, g, b], 1)


def _brightness(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (y * f.view(-1, 1, 1, 1)).clamp(0, 1)


def _contrast(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    return ((y - m) * f.view(-1, 1, 1, 1) + m).clamp(0, 1)


def _saturation(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    gy = _gray(y)
    return ((y - gy) * f.view(-1, 1, 1, 1) + gy).clamp(0, 1)


def _hue(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(y)
    hsv = torch.stack([(hsv[:, 0] + f.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return _hsv_to_rgb(hsv).clamp(0, 1)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _color_jitter(x: torch.Tensor, f: torch.Tensor, on: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-image brightness/contrast/saturation/hue in a per-image order (torchvision ``ColorJitter`` maths).

    ``f``: ``[B, 4]`` factors (hue as a shift), ``on``: ``bool [B]``, ``order``: ``long [B, 4]``
    with ``order[i, p]`` the operation applied at position ``p`` to image ``i``.  At each position,
    each operation runs once on the images that have it there, so the work is the same as with
    one order for the batch and there is no loop over images.
    """
    rows = on.nonzero().squeeze(1)
    if rows.numel() == 0:
        return x
    y, f, order = x[rows], f[rows], order[rows]  # y is a copy: updated in place below
    for p in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            sel = (order[:, p] == op).nonzero().squeeze(1)
            if sel.numel() == y.shape[0]:
                y = fn(y, f[:, op])
            elif sel.numel() > 0:
                y.index_copy_(0, sel, fn(y[sel], f[sel, op]))
    return x.index_copy(0, rows, y)


def blur_radius(sigma: float, h: int, w: int) -> int:
    """Half-width of the blur kernel for ``sigma`` px: ``ceil(3 sigma)``, at most ``min(h, w) - 1``.

    PIL's ``GaussianBlur`` (what DINO uses) reaches about three sigmas; torchvision's takes an
    explicit kernel size, here ``2 * radius + 1``.  Reflect padding needs ``radius < min(h, w)``.
    """
    return max(0, min(int(math.ceil(3 * sigma)), min(h, w) - 1))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma in pixels (0 = unchanged), reflect padding.

    Image ``i`` gets torchvision's ``gaussian_blur(kernel_size=2 r + 1, sigma=sigma[i])`` with
    ``r = blur_radius(sigma[i], h, w)``: one convolution as wide as the largest radius, each
    image's taps beyond its own radius set to zero, so a view does not depend on the rest of the
    batch.  ``radius``: the largest radius, when the caller knows it without reading ``sigma``.
    """
    b, c, h, w = x.shape
    if radius is None:
        radius = blur_radius(float(sigma.max()), h, w) if bool((sigma > 0).any()) else 0
    if radius == 0:
        return x
    r_img = torch.clamp(torch.ceil(3 * sigma.double()), max=min(h, w) - 1).view(-1, 1)  # as blur_radius
    k = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device).view(1, -1)
    sig = sigma.clamp(min=1e-3).view(-1, 1).to(x.dtype)
    ker = torch.exp(-0.5 * (k / sig) ** 2) * (k.abs() <= r_img)
    ker = ker / ker.sum(1, keepdim=True)  # [B, K]
    ker = ker.repeat_interleave(c, 0)  # [B*C, K]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), ker.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), ker.view(b * c, 1, -1, 1), groups=b * c)
    y = y.view(b, c, h, w)
    return torch.where((sigma > 0).view(-1, 1, 1, 1), y, x)
