"""Student-side masking: iBOT block masks (RoB-iBOT) and MSN patch drop (RoB-MSN)."""

from __future__ import annotations

import math

import pytest
import torch

from robkit.objectives.masking import block_masks, patch_keep_index


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _counts(masks: torch.Tensor) -> torch.Tensor:
    return masks.flatten(1).sum(1)


# ----------------------------------------------------------------------------------- block masks


def test_shape_dtype_and_reproducibility():
    masks = block_masks(64, (14, 14), generator=_gen(0))
    assert masks.shape == (64, 14, 14) and masks.dtype == torch.bool
    assert torch.equal(masks, block_masks(64, (14, 14), generator=_gen(0)))
    assert not torch.equal(masks, block_masks(64, (14, 14), generator=_gen(1)))
    # without a generator the global torch RNG drives the draws
    torch.manual_seed(3)
    first = block_masks(16, (7, 9))
    torch.manual_seed(3)
    assert torch.equal(first, block_masks(16, (7, 9)))
    assert block_masks(0, (14, 14)).shape == (0, 14, 14)


@pytest.mark.parametrize("grid", [(14, 14), (7, 7), (6, 10)])
def test_counts_never_exceed_the_largest_ratio(grid):
    n_patches = grid[0] * grid[1]
    counts = _counts(block_masks(400, grid, generator=_gen(1)))
    assert counts.max() <= math.floor(0.5 * n_patches)
    assert counts.max() >= 0.4 * n_patches  # the upper end of [0.1, 0.5] is reached


def test_p_zero_controls_the_unmasked_fraction():
    assert _counts(block_masks(50, (14, 14), p_zero=1.0, generator=_gen(2))).sum() == 0
    counts = _counts(block_masks(200, (14, 14), p_zero=0.0, generator=_gen(2)))
    assert (counts > 0).all()
    # ratio uniform in [0.1, 0.5]: mean masked fraction a little under 0.3 (placement stops early)
    assert 0.25 <= counts.float().mean() / 196 <= 0.30
    zero_fraction = (_counts(block_masks(1000, (14, 14), generator=_gen(3))) == 0).float().mean()
    assert abs(zero_fraction - 0.5) < 0.06  # p_zero = 1/2, as pred_ratio [0.0, 0.3]


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_fixed_ratio_reaches_target_without_overshoot(ratio):
    target = ratio * 196
    counts = _counts(block_masks(200, (14, 14), ratio_range=(ratio, ratio), p_zero=0.0, generator=_gen(4)))
    assert counts.max() <= math.floor(target)
    assert counts.float().mean() >= 0.85 * target


def _bounding_box(mask: torch.Tensor) -> tuple[int, int]:
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_single_block_is_a_filled_rectangle_with_bounded_aspect():
    # target 16.5 patches on 14x14: the first block has area 16-16.5 (minimum (14 // 3)^2 = 16)
    # before rounding; a small second block may follow when rounding left room for it
    masks = block_masks(200, (14, 14), ratio_range=(16.5 / 196, 16.5 / 196), p_zero=0.0, generator=_gen(5))
    assert (_counts(masks) <= 16).all()
    shapes = set()
    for mask in masks:
        h, w = _bounding_box(mask)
        if h * w == int(mask.sum()):  # a single filled rectangle
            # log aspect in [log 0.3, log 1/0.3]: one block is at most 2x7; two adjacent blocks can
            # merge into a 2x8 rectangle, never into anything as thin as 1x16
            assert 1 / 4 <= h / w <= 4 and min(h, w) >= 2
            shapes.add((h, w))
    assert len(shapes) > 3  # the aspect ratio is random
    squares = block_masks(20, (14, 14), ratio_range=(16.5 / 196, 16.5 / 196), p_zero=0.0, min_aspect=1.0)
    for mask in squares:
        assert _bounding_box(mask) == (4, 4) and int(mask.sum()) == 16  # min area (14 // 3)^2


def test_masks_are_blocky_not_scattered():
    masks = block_masks(100, (14, 14), ratio_range=(0.3, 0.3), p_zero=0.0, generator=_gen(6)).float()
    padded = torch.nn.functional.pad(masks, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    with_masked_neighbour = ((neighbours > 0) & (masks > 0)).sum() / masks.sum()
    # i.i.d. masking at 30 % would give about 1 - 0.7^4 = 0.76
    assert with_masked_neighbour > 0.97


def test_small_grids():
    # min block area floored at one patch: a 2x2 grid still gets masked patches
    counts = _counts(block_masks(50, (2, 2), ratio_range=(0.5, 0.5), p_zero=0.0, generator=_gen(7)))
    assert counts.max() == 2 and counts.float().mean() > 1.5
    # blocks must be strictly smaller than the grid: a one-patch-wide grid is never masked
    assert _counts(block_masks(20, (1, 8), ratio_range=(0.5, 0.5), p_zero=0.0)).sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio_range": (0.5, 0.1)}, "ratio_range"),
        ({"ratio_range": (0.1, 1.5)}, "ratio_range"),
        ({"p_zero": 1.5}, "p_zero"),
        ({"min_aspect": 0.0}, "min_aspect"),
        ({"min_aspect": 3.0}, "min_aspect"),
        ({"grid_hw": (0, 14)}, "grid"),
    ],
)
def test_block_mask_errors(kwargs, match):
    args = {"n": 4, "grid_hw": (14, 14)} | kwargs
    with pytest.raises(ValueError, match=match):
        block_masks(**args)


# ----------------------------------------------------------------------------------- patch drop


@pytest.mark.parametrize(
    ("n", "drop", "keep"), [(196, 0.15, 166), (196, 0.1, 176), (49, 0.05, 46), (10, 0.7, 3), (64, 0.5, 32)]
)
def test_patch_keep_index_size_order_uniqueness(n, drop, keep):
    index = patch_keep_index(n, drop, generator=_gen(0))
    assert index.dtype == torch.long and index.shape == (keep,)
    assert keep == math.floor(n * (1 - drop))
    assert torch.equal(index, index.sort().values)
    assert index.unique().numel() == keep
    assert 0 <= int(index.min()) and int(index.max()) < n


def test_patch_keep_index_randomness():
    assert torch.equal(patch_keep_index(196, 0.15, _gen(1)), patch_keep_index(196, 0.15, _gen(1)))
    assert not torch.equal(patch_keep_index(196, 0.15, _gen(1)), patch_keep_index(196, 0.15, _gen(2)))
    g = _gen(3)
    kept = torch.zeros(196)
    for _ in range(500):
        kept[patch_keep_index(196, 0.5, g)] += 1
    # every patch is kept about half the time (binomial std ~ 11 over 500 draws)
    assert (kept - 250).abs().max() < 60
    assert torch.equal(patch_keep_index(196, 0.0), torch.arange(196))


@pytest.mark.parametrize(("n", "drop"), [(196, 1.0), (196, -0.1), (0, 0.1), (3, 0.9)])
def test_patch_keep_index_errors(n, drop):
    with pytest.raises(ValueError):
        patch_keep_index(n, drop)
