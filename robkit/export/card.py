"""Model cards: the JSON sidecar every exported file carries (``<file>.json``).

The card tells an app developer how to feed the file and a reviewer where it came from:
teacher, recipe, data, epochs, metrics, normalisation, input layout/dtype/range, output,
labels, parity, latency (once benched) and the file's sha256.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from robkit import __version__
from robkit.utils.files import atomic_write_json, sha256_path

CARD_VERSION = 1


def sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a Core ML package folder (its files in sorted order, names included)."""
    return sha256_path(path)


def file_bytes(path: str | os.PathLike) -> int:
    """Size in bytes of a file, or the total of a folder's files (a Core ML package)."""
    path = Path(path)
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def card_path(path: str | os.PathLike) -> Path:
    """The card's path for an exported file: ``<file>.json``."""
    return Path(str(path) + ".json")


def _data_spec(meta: dict[str, Any]) -> Any:
    """The training data of a robkit checkpoint (``data.spec``), or an older ``config.data``."""
    data = meta.get("data")
    if isinstance(data, dict):
        return data.get("spec")
    return data or (meta.get("config") or {}).get("data")


def _license(meta: dict[str, Any]) -> str | None:
    """The checkpoint's licence, else its teacher's (a distilled student inherits the teacher's terms)."""
    if meta.get("license"):
        return str(meta["license"])
    teacher = meta.get("teacher")
    if isinstance(teacher, dict):
        if teacher.get("license"):
            return str(teacher["license"])
        teacher = teacher.get("name")
    if not teacher:
        return None
    from robkit.catalog import CatalogError, registry

    try:
        lic = registry("teachers").get(str(teacher)).get("license")
    except CatalogError:
        return None
    return str(lic) if lic else None


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
        "license": _license(meta),
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
    return atomic_write_json(card_path(path), card)


def read_card(path: str | os.PathLike) -> dict[str, Any] | None:
    """The card of an exported file, or ``None`` if it has none."""
    p = card_path(path)
    return json.loads(p.read_text()) if p.is_file() else None


def update_card(path: str | os.PathLike, **fields: Any) -> None:
    """Merge ``fields`` into an existing card (e.g. latency after ``robkit bench``)."""
    card = read_card(path) or {}
    card.update(fields)
    atomic_write_json(card_path(path), card)


def flat_metadata(card: dict[str, Any]) -> dict[str, str]:
    """The card's provenance and I/O contract as flat ``robkit.<key>`` string entries (JSON values)."""
    keys = (
        "model",
        "arch",
        "teacher",
        "method",
        "recipe",
        "normalization",
        "input",
        "labels",
        "robkit_version",
        "target",
        "output",
    )
    return {
        f"robkit.{k}": (v if isinstance(v, str) else json.dumps(v))
        for k in keys
        if (v := card.get(k)) is not None
    }
