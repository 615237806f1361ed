"""Student-side input masking for RoB-iBOT (block masks) and RoB-MSN (patch drop).

Only the student is masked; the frozen teacher always sees the full global crops.

* :func:`block_masks` -- iBOT's block-wise masking (Zhou et al. 2022, following BEiT) with the
  settings of VISSL's RoB-iBOT recipes (``pred_ratio [0.0, 0.3]``, ``pred_ratio_var [0.0, 0.2]``).
  The student replaces masked patch embeddings by a learned mask token and predicts the teacher's
  patch distributions there (:class:`robkit.objectives.rob.RoBiBOTLoss`).
* :func:`patch_keep_index` -- MSN's patch drop (Assran et al. 2022, VISSL ``MSNDropMasking``).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

_ATTEMPTS = 10  # tries per block before giving up, as BEiT / iBOT


def _python_rng(generator: torch.Generator | None) -> random.Random:
    # One torch draw seeds a Python RNG for the many scalar draws below: reproducible with a
    # seeded generator (or torch.manual_seed), and far cheaper than a torch call per scalar.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return random.Random(seed)


def _mask_ratio(rng: random.Random, ratio_range: tuple[float, float], p_zero: float) -> float:
    # iBOT draws one of pred_ratio = [0.0, 0.3] with equal probability, then uniform within
    # +/- pred_ratio_var = [0.0, 0.2]: 0 with probability 1/2, else uniform in [0.1, 0.5].
    if rng.random() < p_zero:
        return 0.0
    return rng.uniform(*ratio_range)


def _block_mask(
    rng: random.Random, height: int, width: int, target: float, log_aspect: tuple[float, float]
) -> np.ndarray:
    """One ``[H, W]`` mask: add random rectangles until ``target`` patches, never exceeding it."""
    mask = np.zeros((height, width), dtype=bool)
    # iBOT's minimum block area is (min(H, W) // 3)^2 patches (16 on the 14x14 grid of a 224-px
    # /16 crop); it is floored at 1 so grids narrower than 3 patches can still be masked.
    min_area = max(1, (min(height, width) // 3) ** 2)
    count = 0
    while count < target:
        budget = target - count
        added = 0
        for _ in range(_ATTEMPTS):
            # uniform(a, b) with a > b is still uniform between them, as Python's random.uniform
            # behaves in the official code when the remaining budget is below the minimum area.
            area = rng.uniform(min_area, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            # Official bound: a block is strictly smaller than the grid in both directions.
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= budget:
                    mask[top : top + h, left : left + w] = True
                    added = new
            if added > 0:
                break
        if added == 0:
            break  # ten failed placements in a row: stop below the target, as iBOT does
        count += added
    return mask


def block_masks(
    n: int,
    grid_hw: tuple[int, int],
    ratio_range: tuple[float, float] = (0.1, 0.5),
    p_zero: float = 0.5,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Block-wise iBOT masks ``BoolTensor [n, H, W]`` (True = replaced by the mask token).

    For each of the ``n`` images (one per global crop, crop-major like the student tensors) a
    ratio is drawn: 0 with probability ``p_zero``, else uniform in ``ratio_range``; the target is
    ``ratio * H * W`` patches.  Rectangles are added (area uniform between the minimum block area
    and the remaining budget, log aspect ratio uniform in ``[log min_aspect, -log min_aspect]``,
    placed uniformly, strictly smaller than the grid) as long as they add at least one new patch and
    do not overshoot the target; ten failed placements in a row end the image early, so the masked
    count is at most ``floor(ratio * H * W)`` and usually close to it.  The minimum block area is
    iBOT's ``(min(H, W) // 3) ** 2`` floored at one patch for grids narrower than 3 patches (where
    iBOT's value would be 0).  A 1-patch-wide grid can never be masked, because blocks must be
    strictly smaller than the grid in both directions, as in iBOT.

    ``generator`` seeds the draws (one ``torch.randint`` from it); the same seed gives the same
    masks.
    """
    height, width = grid_hw
    lo, hi = ratio_range
    if n < 0 or height < 1 or width < 1:
        raise ValueError(
            f"block_masks needs n >= 0 and a grid of at least 1x1 patches, got n={n}, grid_hw={grid_hw}"
        )
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(
            f"ratio_range must satisfy 0 <= low <= high <= 1, got {ratio_range} (iBOT RoB: (0.1, 0.5))"
        )
    if not 0.0 <= p_zero <= 1.0:
        raise ValueError(f"p_zero is a probability in [0, 1], got {p_zero} (iBOT RoB: 0.5)")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(
            f"min_aspect must be in (0, 1], got {min_aspect}; the range is [min, 1/min] (iBOT: 0.3)"
        )
    rng = _python_rng(generator)
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    masks = np.zeros((n, height, width), dtype=bool)
    for i in range(n):
        target = _mask_ratio(rng, (lo, hi), p_zero) * height * width
        masks[i] = _block_mask(rng, height, width, target, log_aspect)
    return torch.from_numpy(masks)


def patch_keep_index(
    n_patches: int, drop_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MSN patch drop: sorted indices ``LongTensor [floor(n_patches * (1 - drop_ratio))]`` to keep.

    One random permutation per call, shared by every image of the forward pass (VISSL
    ``MSNDropMasking`` draws a single permutation for the whole batch), kept indices sorted so the
    surviving tokens stay in raster order.  Index the patch tokens *after* adding positional
    embeddings; the class token is always kept.  VISSL applies the drop only to sequences of
    global crops (at least ``global_view_tokens + 1`` tokens, 197 for 224-px /16 crops): local
    crops are never dropped.  The keep count is ``floor(n * (1 - drop))`` computed in floating
    point like the official code.  ``drop_ratio == 0`` returns every index without consuming
    random numbers (VISSL skips the drop entirely).
    """
    if n_patches < 1:
        raise ValueError(f"n_patches must be >= 1, got {n_patches}")
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(
            f"drop_ratio is the fraction of patches dropped, in [0, 1), got {drop_ratio} (MSN: 0.1-0.15)"
        )
    if drop_ratio == 0.0:
        return torch.arange(n_patches)
    n_keep = int(math.floor(n_patches * (1.0 - drop_ratio)))
    if n_keep == 0:
        raise ValueError(
            f"drop_ratio={drop_ratio} keeps no patch out of {n_patches}; use a smaller drop_ratio"
        )
    return torch.randperm(n_patches, generator=generator)[:n_keep].sort().values
