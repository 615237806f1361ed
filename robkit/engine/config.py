"""Recipes (the papers' settings as YAML data) resolved into one run configuration.

A recipe record has sections ``views``, ``loss``, ``head``, ``optim``, ``ema``, ``train``
(and ``rob`` for distillation); ``extends: OTHER`` deep-merges another recipe underneath
(a section with ``_replace: true`` replaces the inherited one instead of merging into it).
Any field can be overridden from the command line as ``section.key=value`` (YAML-parsed).
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from robkit.catalog import CatalogError, registry
from robkit.utils.errors import RecipeError
from robkit.utils.suggest import did_you_mean

SECTIONS = ("views", "loss", "head", "optim", "ema", "train", "rob")
# Engine settings a recipe need not state, always accepted in the ``train`` section.
ENGINE_TRAIN_KEYS = ("precision", "channels_last", "compile")
# Distillation settings the RoB task reads (robkit.engine.build.build_rob_task), with their defaults
# there; a recipe states only the ones it changes.
ROB_KEYS = ("teacher_resolution", "teacher_precision", "mask_ratio_range", "mask_p_zero", "patch_drop")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
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
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def check_overrides(recipe: dict[str, Any], overrides: dict[str, Any], path: str = "") -> None:
    """Refuse an override of a field the recipe does not have (typos would otherwise be ignored).

    Every section is closed: ``train`` also takes the engine settings (:data:`ENGINE_TRAIN_KEYS`) and
    ``rob`` the distillation settings (:data:`ROB_KEYS`) a recipe need not state.
    """
    for k, v in overrides.items():
        here = f"{path}.{k}" if path else k
        if path == "train" and k in ENGINE_TRAIN_KEYS:
            continue
        if path == "rob" and k in ROB_KEYS:
            continue
        if path == "" and k == "rob" and "rob" not in recipe:
            if not str(recipe.get("method", "")).startswith("rob"):
                raise RecipeError(
                    f"override section 'rob' applies to distillation recipes only; {recipe.get('name')!r} "
                    "is a pre-training recipe (use `robkit distill` for RoB)"
                )
            check_overrides({}, v, "rob")
            continue
        if isinstance(recipe, dict) and k not in recipe:
            fields = sorted(recipe) + (list(ENGINE_TRAIN_KEYS) if path == "train" else [])
            fields += list(ROB_KEYS) if path == "rob" else []
            raise RecipeError(
                f"unknown recipe field {here!r}.{did_you_mean(k, fields)} Fields here: {', '.join(sorted(set(fields)))}"
            )
        if isinstance(v, dict) and isinstance(recipe.get(k), dict):
            check_overrides(recipe[k], v, here)
