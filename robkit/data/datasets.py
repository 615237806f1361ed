"""Image data sets: Fashion-MNIST idx files (the embedded default) and folders of images.

Every data set yields ``(image, label)`` with ``image`` a ``uint8`` tensor ``[3, S, S]`` on a
fixed square canvas, so batches stack and augmentation runs batched on tensors.  Folder images
keep their aspect ratio: they are resized to fit the canvas and padded; ``valid_hw`` records the
image's area on the canvas so crops are sampled inside it.  Labels are ``-1`` when unknown.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from robkit.utils.errors import RobkitError

log = logging.getLogger(__name__)

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class DataError(RobkitError, RuntimeError):
    """A data set could not be found or read."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array (LeCun's MNIST format)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes: dict[int, npt.DTypeLike] = {
        0x08: np.uint8,
        0x09: np.int8,
        0x0B: ">i2",
        0x0C: ">i4",
        0x0D: ">f4",
        0x0E: ">f8",
    }
    if dtype_code not in dtypes:
        raise DataError(f"{path}: unknown idx element type 0x{dtype_code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated idx file ({arr.size} of {int(np.prod(shape))} values)")
    return arr.reshape(shape)


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the Fashion-MNIST idx files: ``root``, ``$ROBKIT_FASHION_MNIST`` or the
    system data set; :class:`DataError` if none has them.
    """
    candidates = [Path(root)] if root else []
    if os.environ.get("ROBKIT_FASHION_MNIST"):
        candidates.append(Path(os.environ["ROBKIT_FASHION_MNIST"]))
    candidates += [Path(d) for d in FASHION_MNIST_DIRS]
    for c in candidates:
        if any((c / (FASHION_MNIST_FILES["train"][0] + ext)).exists() for ext in ("", ".gz")):
            return c
    raise DataError(
        "Fashion-MNIST idx files not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "). Install them with `apt-get install dataset-fashion-mnist`, or set ROBKIT_FASHION_MNIST "
        "to a folder holding train-images-idx3-ubyte(.gz) and friends."
    )


def _idx_file(root: Path, stem: str) -> Path:
    for ext in (".gz", ""):
        if (root / (stem + ext)).exists():
            return root / (stem + ext)
    raise DataError(f"{root / stem}(.gz) is missing")


@dataclass
class ImageTensorDataset(torch.utils.data.Dataset):
    """Images held in memory as ``uint8 [N, 3, S, S]`` (replicated from grayscale if needed)."""

    images: torch.Tensor  # uint8 [N, C, S, S], C in {1, 3}
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...] = ()
    name: str = "tensors"

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        return img, int(self.labels[i])

    @property
    def canvas_px(self) -> int:
        """Side of the square images in px."""
        return int(self.images.shape[-1])

    def valid_hw(self, i: int) -> tuple[int, int]:
        """``(h, w)`` of image ``i`` on the canvas: the whole canvas."""
        return self.canvas_px, self.canvas_px

    def subset(self, n: int, seed: int = 0) -> ImageTensorDataset:
        """``n`` images chosen at random (stratification is left to the caller)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n]
        return ImageTensorDataset(self.images[idx], self.labels[idx], self.classes, self.name)


def fashion_mnist(
    split: str = "train",
    root: str | os.PathLike | None = None,
    limit: int | None = None,
) -> ImageTensorDataset:
    """Fashion-MNIST (Xiao et al. 2017): 28×28 grayscale, 10 classes; 60k train / 10k test."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    r = find_fashion_mnist(root)
    img_stem, lab_stem = FASHION_MNIST_FILES[split]
    images = torch.from_numpy(read_idx(_idx_file(r, img_stem)).copy())
    labels = torch.from_numpy(read_idx(_idx_file(r, lab_stem)).astype(np.int64))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ImageTensorDataset(images.unsqueeze(1), labels, FASHION_MNIST_CLASSES, f"fashion-mnist/{split}")


class ImageFolder(torch.utils.data.Dataset):
    """A folder of images, flat or with one sub-folder per class.

    Images are decoded to RGB, resized to fit a ``canvas_px`` square (aspect kept) and padded
    at the bottom/right.  An unreadable or corrupt file is reported once, counted in
    ``skipped``, and replaced by the next readable image, so a run never dies on one bad file.
    """

    def __init__(self, root: str | os.PathLike, canvas_px: int = 256) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        subdirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        files: list[tuple[Path, int]] = []
        if subdirs:
            self.classes = tuple(d.name for d in subdirs)
            for ci, d in enumerate(subdirs):
                files += [(p, ci) for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            self.classes = ()
        files += [
            (p, -1) for p in sorted(self.root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise DataError(
                f"no images found in {self.root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, flat or in "
                "class sub-folders)"
            )
        self.files = files
        self.canvas_px = canvas_px
        self.name = f"folder:{self.root.name}"
        self.skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> torch.Tensor:
        """``int64 [N]`` class index of every file (``-1`` outside class sub-folders)."""
        return torch.tensor([c for _, c in self.files], dtype=torch.long)

    def _load(self, path: Path) -> tuple[torch.Tensor, tuple[int, int]]:
        im: Image.Image
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = self.canvas_px / max(w, h)
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            im = im.resize((nw, nh), Image.BICUBIC)  # type: ignore[attr-defined]  # set at runtime
            arr = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        canvas = torch.zeros(3, self.canvas_px, self.canvas_px, dtype=torch.uint8)
        canvas[:, :nh, :nw] = arr
        return canvas, (nh, nw)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label, _ = self.get_with_hw(i)
        return img, label

    def get_with_hw(self, i: int) -> tuple[torch.Tensor, int, tuple[int, int]]:
        """``(canvas, label, (h, w) of the image on the canvas)``; works across worker processes."""
        for k in range(len(self.files)):
            j = (i + k) % len(self.files)
            path, label = self.files[j]
            try:
                img, hw = self._load(path)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                if path not in self.skipped:
                    self.skipped.add(path)
                    log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                continue
            return img, label, hw
        raise DataError(f"none of the {len(self.files)} images in {self.root} could be read")


def open_dataset(
    spec: str | os.PathLike = "fashion-mnist",
    split: str = "train",
    limit: int | None = None,
    canvas_px: int = 256,
) -> ImageTensorDataset | ImageFolder:
    """``"fashion-mnist"`` (the embedded default), a folder of idx files, or a folder of images."""
    spec_s = str(spec)
    if spec_s in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return fashion_mnist(split, limit=limit)
    p = Path(spec_s)
    if p.is_dir() and any(p.glob("*-idx3-ubyte*")):
        return fashion_mnist(split, root=p, limit=limit)
    if p.is_dir() and (p / split).is_dir():
        p = p / split
    ds = ImageFolder(p, canvas_px=canvas_px)
    if limit is not None and limit < len(ds):
        ds.files = ds.files[:limit]
    return ds


def to_model_input(
    images: torch.Tensor, size: int, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` → float ``[B, 3, size, size]`` resized (bilinear, antialiased) and normalised."""
    x = images.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def data_fingerprint(ds: Any) -> dict[str, Any]:
    """``{"name", "images", "sha256"}``: pixels of in-memory data sets; path, size and mtime of files."""
    h = hashlib.sha256()
    if hasattr(ds, "images") and isinstance(ds.images, torch.Tensor):
        h.update(str(tuple(ds.images.shape)).encode())
        h.update(ds.images.contiguous().numpy().tobytes())
    elif hasattr(ds, "files"):
        root = Path(getattr(ds, "root", "."))
        for f in ds.files:
            p = Path(f[0] if isinstance(f, tuple) else f)
            st = p.stat()
            h.update(f"{os.path.relpath(p, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(str(getattr(ds, "canvas_px", "")).encode())
    else:
        raise DataError(f"cannot fingerprint a {type(ds).__name__} data set; use a folder or Fashion-MNIST")
    return {"name": getattr(ds, "name", type(ds).__name__), "images": len(ds), "sha256": h.hexdigest()}
