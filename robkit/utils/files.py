"""Files: atomic writes, sha256 and code-free loading of PyTorch files.

A file robkit writes is either the old file or the complete new one (temp file in the same folder,
flush + fsync, ``os.replace``); a file robkit reads never runs code (``weights_only=True``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import torch

from robkit.utils.errors import RobkitError

CHUNK = 1 << 20


class CheckpointError(RobkitError, RuntimeError):
    """A checkpoint could not be read or does not describe what was asked."""


def robkit_home() -> Path:
    """The cache folder of robkit: ``$ROBKIT_HOME``, default ``~/.cache/robkit``."""
    return Path(os.environ.get("ROBKIT_HOME") or "~/.cache/robkit").expanduser()


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on a clean exit it is fsynced and renamed onto ``path``.

    On an error the temp file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **cast(dict[str, Any], {} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (non-JSON values as ``str``) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: ``path`` is either the old file or the new one."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def hash_stream(chunks: Iterator[bytes], h: Any | None = None) -> Any:
    """Feed byte chunks into a hash object (sha256 by default) and return it."""
    h = h or hashlib.sha256()
    for block in chunks:
        h.update(block)
    return h


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            yield block


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of one file's bytes, read in 1 MiB blocks."""
    return hash_stream(_file_chunks(Path(path))).hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder (e.g. a Core ML package): its files in sorted order, names included."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        hash_stream(_file_chunks(p), h)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, non-JSON values as ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# Harmless classes that official checkpoints pickle (DINO/iBOT store their argparse.Namespace).
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a legacy pickle stream (protocol 2+ starts with 0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header (``{``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict (tensors only: the format cannot hold code)."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - safetensors comes with timm
        raise CheckpointError(f"{path} is a safetensors file: `pip install safetensors` to read it") from e
    try:
        return load_file(str(path), device=str(map_location))
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged file
        raise CheckpointError(f"could not read safetensors file {path}: {e}. Is the file complete?") from e


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a PyTorch file without executing code from it (``weights_only=True`` + an allow-list), or a
    safetensors file (timm and Hugging Face releases) as a state dict.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass the .pt/.pth file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if _looks_like_safetensors(path):
        return _load_safetensors(path, map_location)
    if not _looks_like_torch_file(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); "
            "pass a file written by torch.save, e.g. RUN/checkpoint.pt or an official .pth"
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it contains Python objects that could run code when unpickled "
            f"({str(e).splitlines()[0]}). robkit only loads tensors, numbers, strings and containers. "
            "If you trust the file, re-save its state_dict with plain tensors."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"could not read checkpoint {path}: {e}. Is the file complete?") from e


class UnsafePathError(RobkitError, ValueError):
    """A file name from a catalog or a download would land outside the folder it belongs in."""


def child_path(folder: str | os.PathLike, name: str, what: str = "file name") -> Path:
    """``folder / name`` for a plain file name; refuses absolute names, separators and ``..``."""
    s = str(name)
    if not s or s in (".", "..") or "/" in s or "\\" in s or "\x00" in s or Path(s).is_absolute():
        raise UnsafePathError(
            f"{what} {s!r} is not a plain file name: it must not be empty, absolute, or contain '/', '\\\\' "
            f"or '..', so that it stays inside {folder}. Fix the catalog entry."
        )
    return Path(folder) / s
