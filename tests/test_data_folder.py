"""Image folders at ImageNet scale: torchvision decoding (PIL fallback), corrupt files, the cached index."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from robkit.data import datasets as DS
from robkit.data.datasets import ImageFolder, data_fingerprint, fit_to_canvas, open_dataset


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))


def _photo(w=60, h=40, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 4 + 30 * c) % 256 for c in range(3)], -1) + rng.integers(0, 8, (h, w, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8) + (yy[..., None] % 2).astype(np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def _pil_reference(path, canvas_px):
    """The PIL-only decode of the same file, through the same canvas fit."""
    with Image.open(path) as im:
        from PIL import ImageOps

        rgb = ImageOps.exif_transpose(im).convert("RGB")
    return fit_to_canvas(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1), canvas_px)


@pytest.mark.parametrize(
    "name, mode",
    [
        ("a.jpg", "RGB"),
        ("b.png", "RGB"),
        ("c.webp", "RGB"),
        ("d.png", "L"),
        ("e.png", "RGBA"),
        ("f.png", "P"),
    ],
)
def test_torchvision_decoding_matches_pil(tmp_path, name, mode):
    root = tmp_path / "imgs"
    root.mkdir()
    kw = {"quality": 95} if name.endswith((".jpg", ".webp")) else {}
    _photo(mode=mode).save(root / name, **kw)
    ds = ImageFolder(root, canvas_px=32)
    img, _, hw = ds.get_with_hw(0)
    ref, ref_hw = _pil_reference(root / name, 32)
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and hw == ref_hw == (21, 32)
    # libjpeg-turbo and PIL's libjpeg may differ by a grey level or two (IDCT, upsampling)
    assert (img.float() - ref.float()).abs().mean() < 3.0


def test_formats_torchvision_cannot_read_go_through_pil(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    root.mkdir()
    _photo().save(root / "a.bmp")
    monkeypatch.setattr(DS, "_decode_torchvision", lambda p: pytest.fail(f"torchvision used for {p}"))
    img, _, hw = ImageFolder(root, canvas_px=32).get_with_hw(0)
    assert hw == (21, 32) and torch.equal(img, _pil_reference(root / "a.bmp", 32)[0])


def test_corrupt_and_truncated_files_are_skipped_once_and_reported(tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "0-garbage.jpg").write_bytes(os.urandom(500))
    _photo().save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "1-truncated.jpg").write_bytes(data[: len(data) // 3])
    _photo(seed=3).save(root / "2-good.png")
    ds = ImageFolder(root, canvas_px=32)
    names = [p.name for p, _ in ds.files]
    assert names == ["0-garbage.jpg", "1-truncated.jpg", "2-good.png", "full.jpg"]
    with caplog.at_level("WARNING"):
        img, _, _ = ds.get_with_hw(0)  # the garbage file is replaced by the next readable image
        ds.get_with_hw(0)
    assert {p.name for p in ds.skipped} >= {"0-garbage.jpg"}
    assert sum("0-garbage.jpg" in r.message for r in caplog.records) == 1
    assert img.shape == (3, 32, 32)


def test_exif_orientation_is_applied_by_both_decoders(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    _photo(60, 40).save(root / "r.jpg", quality=95, exif=exif)
    img, _, hw = ImageFolder(root, canvas_px=30).get_with_hw(0)
    ref, ref_hw = _pil_reference(root / "r.jpg", 30)
    assert hw == ref_hw == (30, 20)  # displayed portrait: taller than wide
    assert (img.float() - ref.float()).abs().mean() < 3.0


def _tree(root, n=3):
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _photo(seed=i).save(root / c / f"{i}.png")


def _bump(folder):
    st = os.stat(folder)
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_the_index_is_cached_and_follows_added_and_removed_files(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _tree(root)
    for d in (root, root / "cat", root / "dog"):  # older than the racy window: the listing is cached
        os.utime(d, ns=(0, 10**18))
    first = ImageFolder(root)
    assert DS.folder_index_path(root).is_file()
    assert first.classes == ("cat", "dog") and len(first.files) == 6
    real_scan = DS.scan_image_folder
    monkeypatch.setattr(DS, "scan_image_folder", lambda r: pytest.fail("listed again"))
    second = ImageFolder(root)
    assert second.files == first.files and second.index_fingerprint == first.index_fingerprint
    assert data_fingerprint(second) == data_fingerprint(first)
    monkeypatch.setattr(DS, "scan_image_folder", real_scan)
    _photo(seed=9).save(root / "dog" / "new.png")
    _bump(root / "dog")
    third = ImageFolder(root)
    assert root / "dog" / "new.png" in [p for p, _ in third.files]
    assert data_fingerprint(third)["sha256"] != data_fingerprint(first)["sha256"]
    (root / "cat" / "0.png").unlink()
    _bump(root / "cat")
    assert root / "cat" / "0.png" not in [p for p, _ in ImageFolder(root).files]


def test_a_cached_start_stats_no_image_and_the_limit_changes_the_fingerprint(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _tree(root)
    for d in (root, root / "cat", root / "dog"):
        os.utime(d, ns=(0, 10**18))
    full = ImageFolder(root)
    stats = []
    real_stat = os.stat

    def counting_stat(p, *a, **k):
        stats.append(str(p))
        return real_stat(p, *a, **k)

    monkeypatch.setattr(os, "stat", counting_stat)
    fp = data_fingerprint(ImageFolder(root))
    monkeypatch.setattr(os, "stat", real_stat)
    assert not [p for p in stats if p.endswith(".png")]  # only the three folders
    assert fp == data_fingerprint(full)
    assert data_fingerprint(open_dataset(str(root), limit=4))["sha256"] != fp["sha256"]


def test_an_unwritable_cache_does_not_fail_and_the_cache_can_be_off(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _tree(root, n=1)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("ROBKIT_HOME", str(blocker))  # folder-index/ cannot be made under a file
    assert len(ImageFolder(root).files) == 2
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home2"))
    ImageFolder(root, index_cache=False)
    assert not (tmp_path / "home2").exists()
