"""Finding a teacher file: robkit's cache, torch.hub's cache, then the URL.

Order (``resolve``): ``$ROBKIT_HOME/teachers/<file_name>`` (``ROBKIT_HOME`` defaults to
``~/.cache/robkit``), then ``torch.hub.get_dir()/checkpoints/<hub_file_name>`` (the name the
official hub code / ``load_state_dict_from_url`` gives the file), then a download of ``url``.
A record with ``file_only: true`` (or no ``url``: a release behind a licence form, e.g. DINOv3) is
never downloaded: the error says where to request the file (``get_from``) and where to put it.

Downloads go to ``<file_name>.part`` next to the target, resume with an HTTP ``Range`` request
when a partial file is there, are checked against the expected sha256, and are moved into
place with ``os.replace`` only when complete and verified, so the cache never holds a partial
or wrong file under the real name.  The official projects publish no sha256 for these files;
with none in the catalog, the hash of the first download is recorded in
``$ROBKIT_HOME/teachers/sha256.json`` and later loads are checked against it (trust on first use).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from robkit import __version__
from robkit.utils.errors import RobkitError
from robkit.utils.files import atomic_write_json, child_path, robkit_home
from robkit.utils.files import sha256_file as _sha256_file

CHUNK = 1 << 20


class DownloadError(RobkitError, RuntimeError):
    """A teacher file could not be fetched or failed verification."""


def teachers_dir() -> Path:
    """Where robkit keeps downloaded teacher files: ``<robkit_home>/teachers``."""
    return robkit_home() / "teachers"


def hub_checkpoints_dir() -> Path:
    """torch.hub's checkpoint folder, ``torch.hub.get_dir()/checkpoints``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def offline() -> bool:
    """Whether ``ROBKIT_OFFLINE`` forbids downloads."""
    return os.environ.get("ROBKIT_OFFLINE", "").lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------------------------
# hashes


def _hash_db_path() -> Path:
    return teachers_dir() / "sha256.json"


def _read_db() -> dict[str, Any]:
    try:
        with open(_hash_db_path(), encoding="utf-8") as f:
            db = json.load(f)
        return db if isinstance(db, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_db(db: dict[str, Any]) -> None:
    path = _hash_db_path()
    try:
        atomic_write_json(path, db, indent=1, sort_keys=True)
    except OSError:  # a read-only cache still works, it just re-hashes
        pass


def sha256_file(path: str | os.PathLike, memo: bool = True) -> str:
    """sha256 of a file; memoised by (path, size, mtime) so multi-GB teachers hash once."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    db = _read_db() if memo else {}
    hit = db.get("memo", {}).get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return str(hit[2])
    digest = _sha256_file(path)
    if memo and teachers_dir().exists():
        db = _read_db()
        db.setdefault("memo", {})[key] = [st.st_size, st.st_mtime_ns, digest]
        _write_db(db)
    return digest


def recorded_sha256(file_name: str) -> str | None:
    """The hash recorded at the first download of ``file_name`` (when the catalog has none)."""
    return _read_db().get("recorded", {}).get(file_name)


def record_sha256(file_name: str, digest: str) -> None:
    """Record ``digest`` as the hash of ``file_name`` unless one is recorded already (trust on first use)."""
    db = _read_db()
    db.setdefault("recorded", {}).setdefault(file_name, digest)
    _write_db(db)


def expected_sha256(record: Any) -> tuple[str | None, str]:
    """``(hash, where it comes from)``: the catalog's, else the one recorded at first download."""
    if record.get("sha256"):
        return str(record["sha256"]).lower(), "catalog"
    rec = recorded_sha256(record["file_name"])
    return (rec, "recorded at first download") if rec else (None, "none known")


# --------------------------------------------------------------------------------------------
# download


def download_url(
    url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True, timeout: float = 60.0
) -> str:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify, ``os.replace``; returns the sha256."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"robkit/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the partial file is already complete
            resp = None
        else:
            raise
    if resp is not None:
        with resp:
            status = getattr(resp, "status", None)
            mode = "wb"
            if start and status == 206:
                m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                if m and int(m.group(1)) == start:
                    mode = "ab"
                else:  # a server that answers a different range: start over
                    resp.close()
                    part.unlink()
                    return download_url(url, dest, sha256, progress, timeout)
            if mode == "wb":
                start = 0
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            with (
                open(part, mode) as f,
                tqdm(
                    total=total,
                    initial=start,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
    digest = sha256_file(part, memo=False)
    if sha256 and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"sha256 mismatch for {url}: expected {sha256.lower()}, got {digest}. The download was deleted; "
            "retry, and if it persists the file on the server differs from the one the catalog describes."
        )
    os.replace(part, dest)
    return digest


def cached_file(record: Any) -> Path | None:
    """The teacher's file if it is already on disk (robkit cache, then torch.hub cache)."""
    own = child_path(
        teachers_dir(), record["file_name"], f"teacher {getattr(record, 'name', '?')!r} file_name"
    )
    if own.is_file():
        return own
    hub_name = record.get("hub_file_name")
    if hub_name:
        hub = child_path(
            hub_checkpoints_dir(), hub_name, f"teacher {getattr(record, 'name', '?')!r} hub_file_name"
        )
        if hub.is_file():
            return hub
    return None


def cache_status(record: Any) -> str:
    """Whether the teacher is cached: ``yes`` (robkit's cache), ``hub`` (torch.hub's), ``partial`` or ``-``."""
    f = cached_file(record)
    if f is None:
        return "-" if not (teachers_dir() / (record["file_name"] + ".part")).exists() else "partial"
    return "hub" if f.parent == hub_checkpoints_dir() else "yes"


def is_file_only(record: Any) -> bool:
    """Whether the teacher's file cannot be downloaded by robkit (``file_only: true`` or no ``url``):
    a release behind a licence form, whose links are sent to each requester.
    """
    return bool(record.get("file_only")) or not record.get("url")


def placement(record: Any) -> str:
    """Where a teacher's file must be put for robkit to find it: its robkit cache path, and torch.hub's."""
    own = teachers_dir() / record["file_name"]
    hub = f" or {hub_checkpoints_dir() / record['hub_file_name']}" if record.get("hub_file_name") else ""
    return f"{own}{hub}"


def obtain_hint(record: Any) -> str:
    """How to get a file-only teacher: the official request page, and where to put the file."""
    where = record.get("get_from") or record.get("source_repo") or "the project's release page"
    return (
        f"request access at {where} (the licence form sends the download links by e-mail), download "
        f"{record['file_name']} and put it at {placement(record)}; or set ROBKIT_HOME to a folder that "
        "holds teachers/<file>, or load the file by its path"
    )


def _file_only_error(record: Any) -> DownloadError:
    return DownloadError(
        f"teacher {record.name!r} is not cached and robkit cannot download it: its weights are released "
        "only to those who accept the licence.\n"
        f"  file:   {record['file_name']}\n"
        f"  folder: {teachers_dir()}\n"
        f"To use it, {obtain_hint(record)}."
    )


def _offline_error(record: Any, reason: str) -> DownloadError:
    folder = teachers_dir()
    hub = f" (or {hub_checkpoints_dir() / record['hub_file_name']})" if record.get("hub_file_name") else ""
    return DownloadError(
        f"teacher {record.name!r} is not cached and cannot be downloaded ({reason}).\n"
        f"  URL:    {record['url']}\n"
        f"  file:   {record['file_name']}\n"
        f"  folder: {folder}{hub}\n"
        f"Download the URL on a machine with network access and put it at {folder / record['file_name']}, "
        "or set ROBKIT_HOME to a folder that holds teachers/<file>."
    )


def resolve(record: Any, download: bool = True, progress: bool = True) -> Path:
    """Path of the teacher file for a catalog ``record``, downloading it if needed."""
    found = cached_file(record)
    if found is not None:
        return found
    if is_file_only(record):  # never a network request for a gated release
        raise _file_only_error(record)
    if not download or offline():
        raise _offline_error(record, "downloads disabled" if not download else "ROBKIT_OFFLINE is set")
    dest = child_path(
        teachers_dir(), record["file_name"], f"teacher {getattr(record, 'name', '?')!r} file_name"
    )
    expected, _ = expected_sha256(record)
    try:
        digest = download_url(record["url"], dest, expected, progress=progress)
    except (urllib.error.URLError, OSError) as e:
        reason = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
        raise _offline_error(record, reason) from e
    if not record.get("sha256"):
        record_sha256(record["file_name"], digest)
    return dest
