"""Model cards: the JSON sidecar every exported file carries (``<file>.json``).

The card tells an app developer how to feed the file and a reviewer where it came from:
teacher, recipe, data, epochs, metrics, normalisation, input layout/dtype/range, output,
labels, parity, latency (once benched) and the file's sha256.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from robkit import __version__

CARD_VERSION = 1


def sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a Core ML package folder (its files in sorted order, names included)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_bytes(path: str | os.PathLike) -> int:
    path = Path(path)
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def card_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def _data_spec(meta: dict[str, Any]) -> Any:
    """The training data of a robkit checkpoint (``data.spec``), or an older ``config.data``."""
    data = meta.get("data")
    if isinstance(data, dict):
        return data.get("spec")
    return data or (meta.get("config") or {}).get("data")


def base_card(
    *,
    meta: dict[str, Any],
    arch: str,
    target: dict[str, Any],
    input_spec: dict[str, Any],
    output_spec: dict[str, Any],
    labels: list[str] | None,
    checkpoint: str | None,
) -> dict[str, Any]:
    """The card fields known before conversion (provenance and I/O contract)."""
    config = meta.get("config") or {}
    teacher = meta.get("teacher")
    return {
        "robkit_card": CARD_VERSION,
        "robkit_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "description": f"{arch} student ({meta.get('method', '?')}) exported for {target['name']}",
        "model": arch,
        "arch": arch,
        "checkpoint": checkpoint,
        "teacher": teacher.get("name") if isinstance(teacher, dict) else teacher,
        "method": meta.get("method"),
        "recipe": config.get("name") or config.get("recipe"),
        "data": _data_spec(meta),
        "epochs": (config.get("train") or {}).get("epochs", config.get("epochs")),
        "progress": meta.get("progress"),
        "metrics": meta.get("metrics") or {},
        "target": target["name"],
        "format": target["format"],
        "precision": target["precision"],
        "normalization": {
            **(meta.get("normalization") or {}),
            "applied_in_model": input_spec["range"] != "normalized",
        },
        "input": input_spec,
        "output": output_spec,
        "labels": labels,
        "latency": None,
    }


def write_card(path: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write ``<path>.json`` with the file's size and sha256 filled in."""
    card = {**card, "file": Path(path).name, "file_bytes": file_bytes(path), "file_sha256": sha256(path)}
    out = card_path(path)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, out)
    return out


def read_card(path: str | os.PathLike) -> dict[str, Any] | None:
    p = card_path(path)
    return json.loads(p.read_text()) if p.is_file() else None


def update_card(path: str | os.PathLike, **fields: Any) -> None:
    """Merge ``fields`` into an existing card (e.g. latency after ``robkit bench``)."""
    card = read_card(path) or {}
    card.update(fields)
    out = card_path(path)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=2, default=str) + "\n")
    os.replace(tmp, out)
