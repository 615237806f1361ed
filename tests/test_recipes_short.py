"""Short-budget recipes fit their dynamics to the steps they run (issue: "It learns").

The "-small" records run 10 epochs of Fashion-MNIST at batch 256; the "-short" records run the
demo's small budget (a few hundred steps at batch 64).  For each, the warm-ups end well inside the
run, nothing is frozen for most of it, and the EMA teacher moves away from its initialisation.
"""

from __future__ import annotations

import math

import pytest

from robkit.demo import BUDGETS
from robkit.engine.config import load_recipe
from robkit.engine.schedules import cosine_schedule

FMNIST_TRAIN = 60000


def _runs():
    small = BUDGETS["small"]
    yield small.ssl_recipe, small.teacher_steps, 1  # the demo's teacher
    yield small.ssl_recipe, small.steps, 1  # the demo's SSLight student
    yield small.rob_recipe, small.steps, 1  # the demo's RoB student
    for name in ("dino-sslight-small", "dino-baseline-small", "rob-dino-small"):
        r = load_recipe(name)
        epochs = r["train"]["epochs"]
        yield name, epochs * (FMNIST_TRAIN // r["train"]["batch_size"]), epochs


@pytest.mark.parametrize("name,steps,epochs", list(_runs()))
def test_short_budget_dynamics_fit_the_steps_run(name, steps, epochs):
    r = load_recipe(name)
    spe = steps // epochs
    optim = r["optim"]
    warm = round(optim.get("warmup_epochs", 0) * spe)
    assert 1 <= warm <= 0.25 * steps, f"LR warm-up of {warm} steps in a run of {steps}"
    lr = cosine_schedule(1.0, 0.0, steps, warm)
    assert float(lr.max()) == pytest.approx(1.0)  # the peak LR is reached
    assert float(lr[int(0.9 * steps)]) < 0.1  # and decays inside the run
    freeze = optim.get("freeze_last_layer_epochs", 0) * spe
    assert freeze <= 0.1 * steps, f"last layer frozen for {freeze} of {steps} steps"
    if r["method"] == "dino":
        w = r["loss"].get("warmup_teacher_temp_epochs", 0)
        assert w <= 0.5 * epochs, f"teacher-temperature warm-up of {w} epochs in a run of {epochs}"
        ema = r["ema"]
        m = cosine_schedule(ema["momentum"], ema.get("momentum_end", 1.0), steps)
        kept = math.prod(float(x) for x in m)  # share of the initial weights left in the EMA teacher
        assert kept < 0.25, f"the EMA teacher keeps {kept:.0%} of its initialisation after {steps} steps"


def test_the_demo_budget_uses_the_short_recipes_and_published_recipes_keep_their_schedules():
    small = BUDGETS["small"]
    assert load_recipe(small.ssl_recipe)["train"]["batch_size"] == small.batch_size
    assert load_recipe(small.rob_recipe)["train"]["batch_size"] == small.batch_size
    # the papers' records are untouched by the short-budget settings
    assert load_recipe("dino-sslight-cnn")["ema"]["momentum"] == 0.996
    assert load_recipe("dino-sslight-cnn")["optim"]["name"] == "lars"
    assert load_recipe("rob-dino")["optim"]["base_lr"] == 5.0e-4


def test_a_slow_cpu_gets_fewer_steps_for_every_run_and_a_fast_one_the_budget():
    from robkit.demo import fit_steps

    small = BUDGETS["small"]
    assert fit_steps(small, 1.0, 0.7) == small.steps  # AVX-512 class: the whole budget fits
    slow = fit_steps(small, 2.3, 1.5)  # AVX2-only class (measured 2.3 s / 1.5 s per step)
    assert small.min_steps < slow < small.steps
    # the fitted runs, with the rest of the demo, stay inside the target
    assert 2.3 * (slow + 105) + 1.5 * 2.15 * slow <= small.seconds
    assert fit_steps(small, 20.0, 10.0) == small.min_steps  # never below the floor of the recipes' dynamics
    assert fit_steps(BUDGETS["tiny"], 20.0, 10.0) == BUDGETS["tiny"].steps  # no target: the steps as given


@pytest.mark.parametrize("steps", [BUDGETS["small"].min_steps, 100])
def test_fitted_runs_keep_the_short_recipes_dynamics(steps):
    """At the fewest steps the demo fits, the EMA horizon scaled to them still lets the EMA teacher leave
    its initialisation, and the warm-ups (fractions of the one-epoch run) still end inside it."""
    from robkit.demo import ema_for_steps
    from robkit.engine.config import deep_merge

    small = BUDGETS["small"]
    r = deep_merge(load_recipe(small.ssl_recipe), ema_for_steps(small.ssl_recipe, small.steps, steps))
    ema = r["ema"]
    assert ema["momentum"] < load_recipe(small.ssl_recipe)["ema"]["momentum"]
    m = cosine_schedule(ema["momentum"], ema.get("momentum_end", 1.0), steps)
    assert math.prod(float(x) for x in m) < 0.25
    warm = round(r["optim"]["warmup_epochs"] * steps)
    assert 1 <= warm <= 0.25 * steps
    assert ema_for_steps(small.ssl_recipe, small.steps, small.steps) == {}
    assert ema_for_steps(small.rob_recipe, small.steps, steps) == {}  # RoB has no EMA teacher
