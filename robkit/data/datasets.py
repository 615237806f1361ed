"""Image data sets: Fashion-MNIST idx files (the embedded default) and folders of images.

Every data set yields ``(image, label)`` with ``image`` a ``uint8`` tensor ``[3, S, S]`` on a
fixed square canvas, so batches stack and augmentation runs batched on tensors.  Folder images
keep their aspect ratio: they are resized to fit the canvas and padded; ``valid_hw`` records the
image's area on the canvas so crops are sampled inside it.  Labels are ``-1`` when unknown.

A folder's file listing is cached (:func:`folder_index`) so that an ImageNet-sized folder
(1.28 M files) starts in seconds, and its images are decoded with torchvision (libjpeg-turbo,
libpng, libwebp) with PIL as the fallback for other formats and files torchvision refuses.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
import torchvision.io as tvio
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError

from robkit.utils.errors import RobkitError
from robkit.utils.files import atomic_write_bytes, robkit_home

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
# What torchvision.io.decode_image reads (0.29: JPEG, PNG, GIF, WebP); the rest goes through PIL.
TORCHVISION_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}
FOLDER_INDEX_VERSION = 1
# A folder changed this close to its scan may change again within the same mtime tick (1-2 s on
# FAT, SMB and some NFS servers) without its mtime showing it, so such a listing is used but not
# cached: git's "racy clean" problem.
RACY_MTIME_NS = 2_000_000_000


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


@dataclass
class FolderIndex:
    """The listing of an image folder, in data set order, as cached by :func:`folder_index`.

    ``paths`` are relative to ``root`` with ``/`` separators; ``labels[i]`` is the class index of
    ``paths[i]`` (``-1`` for files directly in ``root``) and ``sizes[i]`` its size in bytes.
    ``dir_mtimes`` maps every folder scanned (``"."`` is ``root``) to its ``st_mtime_ns``.
    """

    root: str  # absolute, symlinks resolved
    classes: list[str]
    paths: list[str]
    labels: list[int]
    sizes: list[int]
    dir_mtimes: dict[str, int]
    fingerprint: str = ""
    complete: bool = True  # False when a sub-folder could not be read: never cached

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = self._compute_fingerprint()

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(f"robkit-folder-index/{FOLDER_INDEX_VERSION}\n".encode())
        h.update(("\n".join(self.classes) + "\n\n").encode())
        h.update("".join(f"{p}|{n}\n" for p, n in zip(self.paths, self.sizes)).encode())
        h.update("".join(f"{d}|{m}\n" for d, m in sorted(self.dir_mtimes.items())).encode())
        return h.hexdigest()

    def is_current(self) -> bool:
        """Whether every scanned folder still has its recorded mtime (so no file was added, removed
        or renamed in it).
        """
        for rel, mtime_ns in self.dir_mtimes.items():
            try:
                if os.stat(os.path.join(self.root, rel)).st_mtime_ns != mtime_ns:
                    return False
            except OSError:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in the cache (columns, not records: smaller and faster to parse)."""
        return {
            "version": FOLDER_INDEX_VERSION,
            "suffixes": sorted(IMAGE_SUFFIXES),
            "root": self.root,
            "classes": self.classes,
            "paths": self.paths,
            "labels": self.labels,
            "sizes": self.sizes,
            "dir_mtimes": self.dir_mtimes,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, obj: Any, root: str) -> FolderIndex | None:
        """The index stored in ``obj`` if it was written by this version for ``root``, else ``None``."""
        if not isinstance(obj, dict) or obj.get("version") != FOLDER_INDEX_VERSION:
            return None
        if obj.get("root") != root or obj.get("suffixes") != sorted(IMAGE_SUFFIXES):
            return None
        try:
            index = cls(
                root=root,
                classes=list(obj["classes"]),
                paths=list(obj["paths"]),
                labels=list(obj["labels"]),
                sizes=list(obj["sizes"]),
                dir_mtimes={str(k): int(v) for k, v in obj["dir_mtimes"].items()},
                fingerprint=str(obj["fingerprint"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if not len(index.paths) == len(index.labels) == len(index.sizes) or not index.fingerprint:
            return None
        return index


def _is_hidden(name: str) -> bool:
    # Dot files include macOS's "._name.JPEG" resource forks, which look like images but are not.
    return name.startswith(".")


def _scan_tree(root: str, rel_dir: str, index: FolderIndex, label: int) -> None:
    """Add the images under ``root/rel_dir`` (recursively, symlinked sub-folders not followed, as
    ``Path.rglob``) to ``index``, sorted like ``sorted(Path.rglob("*"))``.
    """
    found: list[tuple[list[str], str, int]] = []
    stack = [rel_dir]
    while stack:
        rel = stack.pop()
        folder = os.path.join(root, rel)
        try:
            # mtime before listing: a change made during the scan shows at the next start.
            index.dir_mtimes[rel] = os.stat(folder).st_mtime_ns
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            log.warning(
                "cannot list image folder %s (%s: %s); its images are left out", folder, type(e).__name__, e
            )
            index.complete = False
            continue
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            child = f"{rel}/{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(child)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    found.append((child.split("/"), child, entry.stat().st_size))
            except OSError:  # vanished or a broken link: not an image we can read
                continue
    found.sort(key=lambda f: f[0])
    index.paths += [p for _, p, _ in found]
    index.sizes += [n for _, _, n in found]
    index.labels += [label] * len(found)


def scan_image_folder(root: str | os.PathLike) -> FolderIndex:
    """List an image folder with ``os.scandir``: one class per non-hidden sub-folder (sorted, images
    found recursively), then the images directly in ``root`` (label ``-1``).
    """
    root_s = str(Path(root).resolve())
    dir_mtimes = {".": os.stat(root_s).st_mtime_ns}
    with os.scandir(root_s) as it:
        entries = [e for e in it if not _is_hidden(e.name)]
    classes = sorted(e.name for e in entries if e.is_dir())
    index = FolderIndex(root_s, classes, [], [], [], dir_mtimes, fingerprint="-")
    for ci, name in enumerate(classes):
        _scan_tree(root_s, name, index, ci)
    flat = sorted(
        (e.name, e.stat().st_size)
        for e in entries
        if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file()
    )
    index.paths += [name for name, _ in flat]
    index.sizes += [n for _, n in flat]
    index.labels += [-1] * len(flat)
    index.fingerprint = index._compute_fingerprint()
    return index


def folder_index_path(root: str | os.PathLike) -> Path:
    """Where the index of ``root`` is cached: ``<robkit_home>/folder-index/<sha256 of the absolute
    root>.json.gz``.
    """
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()
    return robkit_home() / "folder-index" / f"{key}.json.gz"


def folder_index(root: str | os.PathLike, cache: bool = True) -> FolderIndex:
    """The listing of ``root``: from the cache when every folder it scanned has kept its mtime,
    else scanned again (and the cache rewritten atomically).

    Adding, removing or renaming a file changes its folder's mtime, so those are seen.  Editing a
    file's content in place (same name) is not: no file is stat-ed at a cached start.  Touch its
    folder, or pass ``cache=False``, after such an edit.  A cache that cannot be read or written is
    not an error: the folder is scanned and the run goes on.
    """
    root_s = str(Path(root).resolve())
    path = folder_index_path(root_s) if cache else None
    if path is not None:
        try:
            cached = FolderIndex.from_json(json.loads(gzip.decompress(path.read_bytes())), root_s)
        except FileNotFoundError:
            cached = None
        except (OSError, EOFError, ValueError) as e:  # unreadable or damaged: rebuild it
            log.debug("ignoring the folder index %s (%s: %s)", path, type(e).__name__, e)
            cached = None
        if cached is not None and cached.is_current():
            return cached
    scan_started_ns = time.time_ns()
    index = scan_image_folder(root_s)
    racy = any(m > scan_started_ns - RACY_MTIME_NS for m in index.dir_mtimes.values())
    if path is not None and index.complete and not racy:
        try:
            data = json.dumps(index.to_json(), separators=(",", ":")).encode()
            atomic_write_bytes(path, gzip.compress(data, compresslevel=6, mtime=0))
        except OSError as e:
            log.debug("could not cache the folder index at %s (%s: %s)", path, type(e).__name__, e)
    return index


def _decode_torchvision(path: Path) -> torch.Tensor:
    """``uint8 [3, H, W]`` with torchvision's decoders, EXIF orientation applied (JPEG, PNG)."""
    img = tvio.decode_image(
        tvio.read_file(str(path)), mode=tvio.ImageReadMode.RGB, apply_exif_orientation=True
    )
    if img.ndim == 4:  # an animated GIF: its first frame, as PIL gives
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = TF.to_dtype(img, torch.uint8, scale=True)
    return img


def _decode_pil(path: Path) -> torch.Tensor:
    """``uint8 [3, H, W]`` with PIL, EXIF orientation applied as torchvision does."""
    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def read_image_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image to ``uint8 [3, H, W]`` RGB (grayscale, palette, CMYK and alpha converted;
    EXIF orientation applied): torchvision for JPEG/PNG/GIF/WebP, PIL for the rest and for any file
    torchvision refuses.  Raises ``OSError``/``ValueError``/PIL's errors if neither can read it.
    """
    path = Path(path)
    if path.suffix.lower() in TORCHVISION_SUFFIXES:
        try:
            return _decode_torchvision(path)
        except RuntimeError as e:  # torchvision's decoders raise RuntimeError for any bad file
            log.debug("torchvision could not decode %s (%s); trying PIL", path, e)
    return _decode_pil(path)


def fit_to_canvas(img: torch.Tensor, canvas_px: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``uint8 [3, H, W]`` resized (bilinear, antialiased) to fit a ``canvas_px`` square, aspect kept,
    and padded with zeros at the bottom/right → ``(uint8 [3, canvas_px, canvas_px], (h, w))``.
    """
    h, w = int(img.shape[-2]), int(img.shape[-1])
    s = canvas_px / max(w, h)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if (nh, nw) != (h, w):
        img = TF.resize(img, [nh, nw], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    canvas = torch.zeros(3, canvas_px, canvas_px, dtype=torch.uint8)
    canvas[:, :nh, :nw] = img
    return canvas, (nh, nw)


class ImageFolder(torch.utils.data.Dataset):
    """A folder of images, flat or with one sub-folder per class.

    Images are decoded to RGB (:func:`read_image_rgb`), resized to fit a ``canvas_px`` square
    (aspect kept) and padded at the bottom/right.  An unreadable or corrupt file is reported once,
    counted in ``skipped``, and replaced by the next readable image, so a run never dies on one bad
    file.

    The listing comes from :func:`folder_index`, cached under ``<robkit_home>/folder-index`` unless
    ``index_cache=False``: it is rebuilt when a file is added, removed or renamed, but an in-place
    edit of a file's content under the same name is not detected.  ``files`` may be cut or
    sampled after construction; :meth:`files_fingerprint` follows.
    """

    def __init__(self, root: str | os.PathLike, canvas_px: int = 256, index_cache: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        index = folder_index(self.root, cache=index_cache)
        if not index.paths:
            raise DataError(
                f"no images found in {self.root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, flat or in "
                "class sub-folders)"
            )
        self.classes = tuple(index.classes) if index.classes else ()
        root_s = str(self.root)
        self.files: list[tuple[Path, int]] = [(Path(root_s, p), c) for p, c in zip(index.paths, index.labels)]
        self.index_fingerprint = index.fingerprint
        self._indexed_files = self.files  # the listing the fingerprint describes
        self.canvas_px = canvas_px
        self.name = f"folder:{self.root.name}"
        self.skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> torch.Tensor:
        """``int64 [N]`` class index of every file (``-1`` outside class sub-folders)."""
        return torch.tensor([c for _, c in self.files], dtype=torch.long)

    def files_fingerprint(self) -> str | None:
        """sha256 of the files in use, from the index (no file is stat-ed); ``None`` when ``files``
        holds entries that are not from the index.

        A prefix of the listing (``open_dataset(limit=...)``) is named by its length, any other
        selection (evaluation's stratified sample) by its positions in the listing.
        """
        full, files = self._indexed_files, self.files
        h = hashlib.sha256(f"{self.index_fingerprint}|{len(files)}\n".encode())
        if len(files) <= len(full) and all(a is b for a, b in zip(files, full)):
            return h.hexdigest()
        position = {id(f): i for i, f in enumerate(full)}
        used = [position.get(id(f), -1) for f in files]
        if -1 in used:
            return None
        h.update(np.asarray(used, dtype="<i8").tobytes())
        return h.hexdigest()

    def _load(self, path: Path) -> tuple[torch.Tensor, tuple[int, int]]:
        return fit_to_canvas(read_image_rgb(path), self.canvas_px)

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
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, RuntimeError) as e:
                if path not in self.skipped:
                    self.skipped.add(path)
                    log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                continue
            return img, label, hw
        raise DataError(f"none of the {len(self.files)} images in {self.root} could be read")


def stratified_sample(
    labels: torch.Tensor,
    seed: int,
    shots: int | None = None,
    fraction: float | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted indices of ``shots`` images of every class, or ``fraction`` of each class's images
    (rounded, at least one), drawn with ``seed``; images in ``exclude`` are never drawn.

    The per-class draw keeps the class balance of the labelled subsets of semi-supervised protocols
    (SimCLR's 1 % / 10 % ImageNet splits, used by SSLight's Table 9, are class-balanced the same way).
    """
    if (shots is None) == (fraction is None):
        raise ValueError("stratified_sample: pass exactly one of shots or fraction")
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"the labelled fraction must be in (0, 1], got {fraction}")
    labels = labels.long().cpu()
    allowed = torch.ones(labels.shape[0], dtype=torch.bool)
    if exclude is not None and exclude.numel():
        allowed[exclude.long()] = False
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        pool = torch.nonzero((labels == c) & allowed).flatten()
        n = shots if shots is not None else max(1, int(round((fraction or 0.0) * pool.numel())))
        if pool.numel() < n:
            raise ValueError(
                f"class {c} has {pool.numel()} available training images, fewer than {n} shots; "
                "use fewer shots or a larger --train-limit."
            )
        picked.append(pool[torch.randperm(pool.numel(), generator=g)[:n]])
    if not picked:
        raise DataError("no labelled images to sample from (every label is -1: a flat folder has no classes)")
    return torch.cat(picked).sort().values


def select(ds: Any, indices: torch.Tensor) -> Any:
    """The images ``indices`` of ``ds`` as a data set of the same kind (labels, classes and name kept).

    An :class:`ImageFolder` keeps its index, so the selection's fingerprint names the files by their
    positions in the listing.
    """
    idx = indices.long()
    if isinstance(ds, ImageTensorDataset):
        return ImageTensorDataset(ds.images[idx], ds.labels[idx], ds.classes, ds.name)
    if isinstance(ds, ImageFolder):
        out = copy.copy(ds)
        out.files = [ds.files[i] for i in idx.tolist()]
        out.skipped = set()
        return out
    raise DataError(f"cannot select images of a {type(ds).__name__} data set; use a folder or Fashion-MNIST")


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
    """``{"name", "images", "sha256"}``: pixels of in-memory data sets; for an :class:`ImageFolder`
    its index (relative paths, sizes, folder mtimes) and the files in use; for other lists of files
    the path, size and mtime of each.
    """
    h = hashlib.sha256()
    if hasattr(ds, "images") and isinstance(ds.images, torch.Tensor):
        h.update(str(tuple(ds.images.shape)).encode())
        h.update(ds.images.contiguous().numpy().tobytes())
    elif hasattr(ds, "files"):
        files_fp = ds.files_fingerprint() if isinstance(ds, ImageFolder) else None
        if files_fp is not None:
            h.update(f"folder-index|{files_fp}\n".encode())
        else:
            root = Path(getattr(ds, "root", "."))
            for f in ds.files:
                p = Path(f[0] if isinstance(f, tuple) else f)
                st = p.stat()
                h.update(f"{os.path.relpath(p, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(str(getattr(ds, "canvas_px", "")).encode())
    else:
        raise DataError(f"cannot fingerprint a {type(ds).__name__} data set; use a folder or Fashion-MNIST")
    return {"name": getattr(ds, "name", type(ds).__name__), "images": len(ds), "sha256": h.hexdigest()}
