"""Recipes (the papers' settings as YAML data) resolved into one run configuration.

A recipe record has sections ``views``, ``loss``, ``head``, ``optim``, ``ema``, ``train``
(and ``rob`` for distillation); ``extends: OTHER`` deep-merges another recipe underneath
(a section with ``_replace: true`` replaces the inherited one instead of merging into it).
Any field can be overridden from the command line as ``section.key=value`` (YAML-parsed); the merged
record is then parsed into a typed :class:`robkit.engine.recipe.Recipe`, which refuses unknown fields.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from robkit.catalog import CatalogError, registry
from robkit.engine.recipe import SECTIONS
from robkit.utils.errors import RecipeError
from robkit.utils.suggest import did_you_mean


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``, section by section (``_replace: true`` swaps a section)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and v.get("_replace"):  # `_replace: true` swaps the whole section
            out[k] = {kk: copy.deepcopy(vv) for kk, vv in v.items() if kk != "_replace"}
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_recipe(name: str) -> dict[str, Any]:
    """The fully merged recipe ``name`` (``extends`` chains resolved)."""
    reg = registry("recipes")
    rec = reg.get(name)
    fields = {k: v for k, v in rec.fields.items() if k != "records"}
    seen = {name}
    while "extends" in fields:
        parent = fields.pop("extends")
        if parent in seen:
            raise RecipeError(f"recipe {name!r}: circular 'extends' through {parent!r}")
        seen.add(parent)
        base = {k: v for k, v in reg.get(parent).fields.items() if k != "records"}
        fields = deep_merge(base, fields)
    fields["name"] = name
    return fields


def resolve_recipe_name(recipe: str, method: str, student_kind: str) -> str:
    """``--recipe sslight`` → ``dino-sslight-cnn`` etc.; a full recipe name is returned as is."""
    reg = registry("recipes")
    for cand in (recipe, f"{method}-{recipe}-{student_kind}", f"{method}-{recipe}"):
        if cand in reg:
            rec_method = reg.get(cand).get("method")
            if rec_method and rec_method != method and cand != recipe:
                continue
            return cand
    options = reg.names(f"{method}-*")
    raise CatalogError(
        f"no recipe {recipe!r} for method {method!r} and a {student_kind} student. "
        f"Recipes for {method}: {', '.join(options) or 'none'}. `robkit recipes list` shows all."
    )


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``["optim.base_lr=0.1", "views.n_local=4"]`` → nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like section.key=value (e.g. optim.base_lr=0.1)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or parts[0] not in SECTIONS:
            raise RecipeError(
                f"override {item!r}: the key must start with one of {', '.join(SECTIONS)}."
                + did_you_mean(parts[0], SECTIONS)
            )
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _scalar(raw)
    return out


def _scalar(raw: str) -> Any:
    """A YAML-typed value, with ``4e-3``-style numbers read as floats (YAML 1.1 wants ``4.0e-3``)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value
