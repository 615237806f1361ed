"""LARS, SSLight parameter groups, schedules and gradient clipping against hand-written updates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robkit.engine.optim import LARS, build_optimizer, param_groups
from robkit.engine.schedules import clip_gradients, cosine_schedule, lr_for_batch
from robkit.models.students import build_student


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def _expected_split(model: nn.Module) -> tuple[set[int], set[int], set[int]]:
    """(weights, depthwise, no-decay) decided from the modules, not from tensor shapes."""
    depthwise, no_decay, all_params = set(), set(), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            all_params.add(id(p))
            is_dw = (
                isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
            )
            if is_dw and name == "weight":
                depthwise.add(id(p))
            elif name == "bias" or isinstance(module, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
                no_decay.add(id(p))
            elif name in ("cls_token", "pos_embed"):
                no_decay.add(id(p))
    return all_params - depthwise - no_decay, depthwise, no_decay


@pytest.mark.parametrize("exclude_dw", [True, False])
def test_param_groups_of_mobilenet_v2_student(exclude_dw):
    model = build_student("mobilenet_v2")
    groups = _by_name(
        param_groups(
            model,
            weight_decay=1e-6,
            exclude_depthwise_from_lars=exclude_dw,
            depthwise_wd_factor=0.5,
            bias_wd_factor=0.0,
        )
    )
    weights, depthwise, no_decay = _expected_split(model)
    assert len(depthwise) == 17  # one depthwise conv per inverted-residual block of MobileNetV2
    assert _ids(groups["weights"]["params"]) == weights
    assert _ids(groups["depthwise"]["params"]) == depthwise
    assert _ids(groups["no_decay"]["params"]) == no_decay
    assert groups["weights"]["lars_exclude"] is False and groups["weights"]["weight_decay"] == 1e-6
    assert groups["depthwise"]["lars_exclude"] is exclude_dw
    assert (
        groups["depthwise"]["weight_decay"] == pytest.approx(0.5e-6)
        and groups["depthwise"]["wd_factor"] == 0.5
    )
    assert groups["no_decay"]["lars_exclude"] is True and groups["no_decay"]["weight_decay"] == 0.0


def test_param_groups_vit_tokens_and_frozen_parameters():
    model = build_student("vit_tiny")
    frozen = next(p for n, p in model.named_parameters() if n.endswith("patch_embed.proj.weight"))
    frozen.requires_grad_(False)
    groups = _by_name(param_groups(model, weight_decay=0.04))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)].rsplit(".", 1)[-1] for p in groups["no_decay"]["params"]}
    assert {"cls_token", "pos_embed", "bias"} <= no_decay
    assert "depthwise" not in groups
    weights, _, expected_no_decay = _expected_split(model)
    assert _ids(groups["weights"]["params"]) == weights
    assert _ids(groups["no_decay"]["params"]) == expected_no_decay
    assert id(frozen) not in _ids(p for g in groups.values() for p in g["params"])


def _hand_lars(params, grads, groups_meta, steps, lr, momentum, eta):
    """LARS as written in SSLight/DINO, one tensor at a time, with python scalars for the norms."""
    params = [p.clone() for p in params]
    mus = [None] * len(params)
    for step in range(steps):
        for i, (p, meta) in enumerate(zip(params, groups_meta)):
            wd, exclude = meta
            d = grads[step][i] + wd * p
            if not exclude:
                pn, dn = math.sqrt(float((p * p).sum())), math.sqrt(float((d * d).sum()))
                if pn > 0 and dn > 0:
                    d = d * (eta * pn / dn)
            mus[i] = d.clone() if mus[i] is None else momentum * mus[i] + d
            params[i] = p - lr * mus[i]
    return params


def test_lars_step_equals_hand_written_update():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, groups=4),
        nn.Linear(5, 2),
        nn.Linear(2, 2, bias=False),
    ).double()
    with torch.no_grad():
        model[4].weight.zero_()  # a zero weight: the trust ratio must fall back to 1
    groups = param_groups(model, weight_decay=0.01, exclude_depthwise_from_lars=True, depthwise_wd_factor=0.5)
    opt = LARS(groups, lr=0.3, momentum=0.9, trust_coefficient=0.001)
    ordered = [p for g in groups for p in g["params"]]
    meta = [(g["weight_decay"], g["lars_exclude"]) for g in groups for _ in g["params"]]
    grads = []
    for _ in range(3):
        grads.append([torch.randn_like(p) for p in ordered])
    expected = _hand_lars([p.detach() for p in ordered], grads, meta, 3, 0.3, 0.9, 0.001)
    for step in range(3):
        for p, g in zip(ordered, grads[step]):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(ordered, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    assert {g["name"] for g in groups} == {"weights", "depthwise", "no_decay"}


def test_lars_zero_norms_fall_back_to_plain_sgd():
    p = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))  # ||p|| = 0: no trust scaling
    r = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))  # ||g|| = 0: no 0/0, no NaN
    opt = LARS([{"params": [p, r], "weight_decay": 0.0, "lars_exclude": False}], lr=0.1)
    p.grad, r.grad = torch.ones_like(p), torch.zeros_like(r)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3, 2), -0.1, dtype=torch.float64))
    torch.testing.assert_close(r.detach(), torch.ones(2, 2, dtype=torch.float64))


def test_build_optimizer_names_and_errors():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    groups = param_groups(model, 0.04)
    assert isinstance(build_optimizer("lars", groups, 0.1, 1e-6), LARS)
    adamw = build_optimizer("adamw", param_groups(model, 0.04), 1e-3, 0.04, betas=(0.9, 0.95))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.04, 0.0]
    assert isinstance(build_optimizer("sgd", param_groups(model, 0.0), 0.1, 0.0), torch.optim.SGD)
    with pytest.raises(ValueError, match="Did you mean 'lars'"):
        build_optimizer("lasr", groups, 0.1, 0.0)


def test_cosine_schedule_warmup_then_cosine():
    base, final, total, warm, start = 0.48, 0.0048, 50, 10, 0.01
    sched = cosine_schedule(base, final, total, warm, start)
    assert sched.shape == (total,)
    n = total - warm
    for i in range(total):
        if i < warm:
            expected = start + (base - start) * i / (warm - 1)
        else:
            expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * (i - warm) / n))
        assert float(sched[i]) == pytest.approx(expected, rel=1e-12)
    assert float(sched[0]) == pytest.approx(start) and float(sched[warm - 1]) == pytest.approx(base)
    assert float(sched[warm]) == pytest.approx(base)
    assert final < float(sched[-1]) < float(sched[-2])  # DINO's cosine approaches, never hits, the end
    assert torch.all(sched[warm:].diff() <= 0)
    torch.testing.assert_close(cosine_schedule(0.04, 0.04, 7), torch.full((7,), 0.04, dtype=torch.float64))
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(0.1, 0.0, 5, warmup_steps=6)


def test_lr_for_batch_is_the_linear_scaling_rule():
    assert lr_for_batch(0.48, 1024) == pytest.approx(1.92)


@pytest.mark.parametrize("per_parameter", [True, False])
def test_clip_gradients(per_parameter):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    grads = [torch.randn_like(p) * 5 for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    norm = clip_gradients(model, 2.0, per_parameter=per_parameter)
    assert float(norm) == pytest.approx(total)
    for p, g in zip(model.parameters(), grads):
        own = math.sqrt(float((g * g).sum()))
        scale = min(1.0, 2.0 / ((own if per_parameter else total) + 1e-6))
        torch.testing.assert_close(p.grad, g * scale)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    clip_gradients(model, 0.0)  # 0 = off
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
