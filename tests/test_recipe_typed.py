"""Recipes are parsed into frozen, typed, closed sections; the specs' defaults are the objectives' own."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import test_distill as D  # tiny official-layout teacher files

from robkit import teachers
from robkit.catalog import registry
from robkit.data.views import MultiCropViews
from robkit.engine.build import build_rob_task, resolve_config
from robkit.engine.config import load_recipe
from robkit.engine.recipe import (
    LOSS_SPECS,
    DINOLossSpec,
    MoCoLossSpec,
    Recipe,
    RoBLossSpec,
    SwAVLossSpec,
    parse_recipe,
)
from robkit.models.students import build_student
from robkit.objectives import rob as rob_losses
from robkit.objectives.dino import DINOLoss
from robkit.objectives.mocov2 import MoCoV2Loss
from robkit.objectives.swav import SwAVLoss
from robkit.utils.errors import RecipeError

ALL = registry("recipes").names()


@pytest.mark.parametrize("name", ALL)
def test_every_catalog_recipe_parses_and_its_record_round_trips(name):
    r = parse_recipe(load_recipe(name))
    assert isinstance(r, Recipe) and isinstance(r.views, MultiCropViews)
    assert isinstance(r.loss, LOSS_SPECS[r.method])
    assert parse_recipe(r.to_dict()) == r
    assert (r.rob is not None) == r.is_distillation


def test_sections_are_frozen():
    r = parse_recipe(load_recipe("dino-sslight-cnn"))
    for obj, field in ((r, "name"), (r.optim, "base_lr"), (r.views, "n_local"), (r.loss, "alpha")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, 1)


def _defaults(fn) -> dict:
    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize(
    "spec, objective", [(DINOLossSpec, DINOLoss), (SwAVLossSpec, SwAVLoss), (MoCoLossSpec, MoCoV2Loss)]
)
def test_loss_spec_defaults_are_the_objectives_defaults(spec, objective):
    obj = _defaults(objective.__init__)
    for f in dataclasses.fields(spec):
        assert f.name in obj, f"{spec.__name__}.{f.name} is not a keyword of {objective.__name__}"
        assert f.default == obj[f.name], (f.name, f.default, obj[f.name])


def test_rob_loss_spec_fields_are_keywords_of_some_rob_loss():
    accepted = set()
    for cls in rob_losses._FAMILIES.values():
        accepted |= set(inspect.signature(cls.__init__).parameters)
    assert {f.name for f in dataclasses.fields(RoBLossSpec)} <= accepted
    assert all(f.default is None for f in dataclasses.fields(RoBLossSpec))  # unset: the family's default


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"optim": {"base_lrr": 0.1}}, "'optim.base_lrr'. Did you mean 'base_lr'"),
        ({"views": {"n_locals": 4}}, "Did you mean 'n_local'"),
        ({"loss": {"teacher_tmp": 0.04}}, "Did you mean 'teacher_temp'"),
        ({"head": {"out_dims": 4}}, "Did you mean 'out_dim'"),
        ({"ema": {"momentun": 0.9}}, "Did you mean 'momentum'"),
        ({"train": {"epoch": 2}}, "Did you mean 'epochs'"),
        ({"rob": {"patch_drop": 0.1}}, "distillation recipes only"),
        ({"optim": {"base_lr": "fast"}}, "'optim.base_lr' must be a number, got 'fast'"),
        ({"train": {"epochs": 1.5}}, "'train.epochs' must be an integer"),
        ({"views": {"global_scale": [0.3]}}, "'views.global_scale' must be a list of 2"),
        ({"loss": {"global_only": "yes"}}, "'loss.global_only' must be true/false"),
    ],
)
def test_unknown_or_mistyped_fields_are_refused_with_the_field_named(override, needle):
    with pytest.raises(RecipeError) as e:
        resolve_config("dino", "mobilenet_v3_small", "sslight", override, small_images=True)
    assert needle in str(e.value)


def test_rob_section_typos_are_refused():
    with pytest.raises(RecipeError, match="Did you mean 'patch_drop'"):
        resolve_config("rob", "mobilenet_v3_small", "rob-dino", {"rob": {"patch_dropp": 0.1}}, True)


def test_a_field_the_recipe_does_not_state_but_the_spec_has_is_accepted_and_used():
    base = resolve_config("dino", "mobilenet_v3_small", "sslight", {}, small_images=True)
    assert base.optim.min_lr_batch is None
    r = resolve_config("dino", "mobilenet_v3_small", "sslight", {"optim": {"min_lr_batch": 256}}, True)
    assert r.optim.min_lr_batch == 256 and r.optim.base_lr == base.optim.base_lr
    assert r.views.global_scale == (0.3, 1.0)  # lists become tuples


def test_a_loss_field_the_teachers_family_does_not_take_is_a_recipe_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    t = teachers.load(str(D._dino_file(tmp_path)))
    cfg = resolve_config("rob", "mobilenet_v3_small", "rob-dino", {"loss": {"lambda1": 0.5}}, True)
    with pytest.raises(RecipeError, match="lambda1"):
        build_rob_task(t, "dino", build_student("mobilenet_v3_small"), cfg, channels_last=False)


def test_overrides_read_exponent_floats_as_numbers():
    from robkit.engine.config import parse_overrides

    ov = parse_overrides(["optim.base_lr=4e-3", "optim.min_lr=1.0e-6", "views.n_local=4", "ema.name=cosine"])
    assert ov["optim"] == {"base_lr": 0.004, "min_lr": 1e-6}
    assert ov["views"]["n_local"] == 4 and isinstance(ov["views"]["n_local"], int)
    assert ov["ema"]["name"] == "cosine"
