"""Data catalogs (teachers, recipes, export targets): YAML records looked up by name.

The catalogs live in the repository's top-level ``teachers/``, ``recipes/`` and ``export/``
folders; the package reaches them through ``robkit/catalogs/`` (symbolic links in a source
tree, real copies in an installed wheel).  Extra folders can be added with the
``ROBKIT_CATALOG_PATH`` environment variable (``os.pathsep``-separated; each holds
``teachers/``, ``recipes/`` and/or ``export/`` sub-folders).

A file holds either one record (a mapping with ``name``) or many (a mapping with a
``records`` list); file-level keys other than ``records`` are defaults for every record.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from robkit.utils.errors import RobkitError
from robkit.utils.suggest import did_you_mean

KINDS = ("teachers", "recipes", "export")


class CatalogError(RobkitError, KeyError):
    """A name is not in a catalog; the message lists close names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def catalog_dirs(kind: str) -> list[Path]:
    """Folders searched for records of ``kind``, built-in first."""
    if kind not in KINDS:
        raise ValueError(f"unknown catalog kind {kind!r}; expected one of {KINDS}")
    dirs = [Path(__file__).resolve().parent / "catalogs" / kind]
    for extra in filter(None, os.environ.get("ROBKIT_CATALOG_PATH", "").split(os.pathsep)):
        dirs.append(Path(extra) / kind)
    return [d for d in dirs if d.is_dir()]


@dataclass(frozen=True)
class Record:
    """One catalog entry: its name, its fields and the file it came from."""

    name: str
    fields: dict[str, Any]
    source: Path
    family: str = ""

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        """The field ``key``, or ``default`` where the record has none."""
        return self.fields.get(key, default)


@dataclass
class Registry:
    """Name → record lookup with wildcard listing and typo suggestions."""

    kind: str
    records: dict[str, Record] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records.values())

    def __len__(self) -> int:
        return len(self.records)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching the shell-style wildcard ``pattern`` (case-sensitive)."""
        return sorted(n for n in self.records if fnmatch.fnmatchcase(n, pattern))

    def get(self, name: str) -> Record:
        """The record called ``name``; :class:`CatalogError` with close names if there is none."""
        if name in self.records:
            return self.records[name]
        hint = did_you_mean(name, self.records)
        raise CatalogError(
            f"no {self.kind[:-1] if self.kind.endswith('s') else self.kind} named {name!r}.{hint} "
            f"`robkit {self.kind if self.kind != 'export' else 'export targets'} list` shows all {len(self)}."
        )


def _records_in(path: Path, kind: str) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a catalog file must hold a mapping, got {type(doc).__name__}")
    family = str(doc.get("family", path.stem))
    if "records" in doc:
        defaults = {k: v for k, v in doc.items() if k != "records"}
        out = []
        for rec in doc["records"]:
            merged = {**defaults, **rec}
            out.append(Record(str(merged["name"]), merged, path, family))
        return out
    if "name" not in doc:
        doc = {**doc, "name": path.stem}
    return [Record(str(doc["name"]), doc, path, family)]


@cache
def registry(kind: str) -> Registry:
    """The merged registry of ``kind``; a later folder overrides an earlier one by name."""
    reg = Registry(kind)
    for d in catalog_dirs(kind):
        for path in sorted(d.glob("*.yaml")):
            for rec in _records_in(path, kind):
                reg.records[rec.name] = rec
    return reg
