"""RoB losses against independent float64 re-computations of the official (VISSL) definitions.

The references below use explicit Python loops over (teacher crop, student crop) pairs and over
images, their own softmax, and the pair lists written the way VISSL writes them, so they share no
code with ``robkit.objectives.rob``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robkit.objectives.rob import (
    RoBDINOLoss,
    RoBiBOTLoss,
    RoBMSNLoss,
    RoBSwAVLoss,
    build_rob_loss,
    pair_mask,
)
from robkit.objectives.sinkhorn import vissl_sinkhorn_knopp

B, K = 3, 7
TOL = {"rtol": 1e-9, "atol": 1e-10}


def _softmax(row: np.ndarray, temp: float) -> np.ndarray:
    z = np.exp(row / temp - (row / temp).max())
    return z / z.sum()


def _log_softmax(row: np.ndarray, temp: float) -> np.ndarray:
    z = row / temp
    return z - (z.max() + math.log(np.exp(z - z.max()).sum()))


def _ce(target: np.ndarray, student_row: np.ndarray, student_temp: float) -> float:
    return float(-(target * _log_softmax(student_row, student_temp)).sum())


def _crop(x: np.ndarray, c: int) -> np.ndarray:
    return x[c * B : (c + 1) * B]


def _dino_pairs(n_teacher: int, n_student: int, cross_view: bool) -> list[tuple[int, int]]:
    pairs = []
    for t in range(n_teacher):
        for s in range(n_student):
            same = s == t
            local = s >= n_teacher
            if (cross_view and not same) or (not cross_view and (same or local)):
                pairs.append((t, s))
    return pairs


def _term(student: np.ndarray, targets: list[np.ndarray], t: int, s: int, st: float) -> float:
    """One pair: CE summed over K, mean over the B images (explicit per-image loop)."""
    return sum(_ce(targets[t][b], _crop(student, s)[b], st) for b in range(B)) / B


def _ref_dino(student, teacher, st, tt, n_teacher, cross_view, normalization="pairs"):
    targets = [np.stack([_softmax(r, tt) for r in _crop(teacher, t)]) for t in range(n_teacher)]
    n_student = student.shape[0] // B
    terms = [_term(student, targets, t, s, st) for t, s in _dino_pairs(n_teacher, n_student, cross_view)]
    return sum(terms) / (len(terms) if normalization == "pairs" else n_student)


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ----------------------------------------------------------------------------------- pairing


def test_pair_mask_exact_lists():
    assert pair_mask(2, 4) == [(0, 0), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert pair_mask(2, 4, cross_view=True) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    assert pair_mask(2, 2) == [(0, 0), (1, 1)]
    assert pair_mask(2, 2, cross_view=True) == [(0, 1), (1, 0)]
    assert pair_mask(1, 3) == [(0, 0), (0, 1), (0, 2)]
    assert pair_mask(1, 3, cross_view=True) == [(0, 1), (0, 2)]


@pytest.mark.parametrize("n_student", [2, 4, 6, 10])
@pytest.mark.parametrize("cross_view", [False, True])
def test_pair_mask_counts_and_rule(n_student, cross_view):
    pairs = pair_mask(2, n_student, cross_view)
    assert len(pairs) == 2 * (n_student - 1)  # both modes give 2(S-1) terms for T=2
    assert pairs == _dino_pairs(2, n_student, cross_view)
    for t in range(2):
        assert ((t, t) in pairs) is not cross_view
        assert ((t, 1 - t) in pairs) is cross_view


def test_pair_mask_rejects_bad_counts():
    with pytest.raises(ValueError, match="n_teacher"):
        pair_mask(3, 2)
    with pytest.raises(ValueError, match="n_teacher"):
        pair_mask(0, 4)


# ----------------------------------------------------------------------------------- DINO


@pytest.mark.parametrize("n_student", [2, 4, 6, 10])
@pytest.mark.parametrize("cross_view", [False, True])
@pytest.mark.parametrize(("st", "tt"), [(0.1, 0.07), (0.2, 0.04)])
def test_dino_matches_reference(n_student, cross_view, st, tt):
    student = _rand(n_student * B, K, seed=n_student, scale=2.0)
    teacher = _rand(2 * B, K, seed=100 + n_student, scale=2.0)
    loss_fn = RoBDINOLoss(student_temp=st, teacher_temp=tt, cross_view=cross_view)
    loss, parts = loss_fn(student, teacher)
    expected = _ref_dino(student.numpy(), teacher.numpy(), st, tt, 2, cross_view)
    assert loss.dtype == torch.float64
    np.testing.assert_allclose(loss.item(), expected, **TOL)
    assert parts["ce"] == pytest.approx(expected)


@pytest.mark.parametrize("n_student", [2, 4, 6, 10])
@pytest.mark.parametrize("cross_view", [False, True])
def test_dino_paper_normalisation_is_constant_factor(n_student, cross_view):
    student = _rand(n_student * B, K, seed=1)
    teacher = _rand(2 * B, K, seed=2)
    official, _ = RoBDINOLoss(cross_view=cross_view)(student, teacher)
    paper, _ = RoBDINOLoss(cross_view=cross_view, normalization="paper")(student, teacher)
    expected_paper = _ref_dino(student.numpy(), teacher.numpy(), 0.1, 0.07, 2, cross_view, "paper")
    np.testing.assert_allclose(paper.item(), expected_paper, **TOL)
    # official = paper * N / (2 (N - 1))
    np.testing.assert_allclose(official.item(), paper.item() * n_student / (2 * (n_student - 1)), **TOL)


def test_dino_half_precision_is_upcast():
    student = _rand(4 * B, K, seed=5)
    teacher = _rand(2 * B, K, seed=6)
    loss, _ = RoBDINOLoss()(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    expected = _ref_dino(
        student.bfloat16().double().numpy(), teacher.bfloat16().double().numpy(), 0.1, 0.07, 2, False
    )
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)


def test_layout_errors_are_actionable():
    with pytest.raises(ValueError, match="n_teacher_crops=2"):
        RoBDINOLoss()(torch.randn(4 * B, K), torch.randn(2 * B + 1, K))
    with pytest.raises(ValueError, match="not a multiple of the batch size 3"):
        RoBDINOLoss()(torch.randn(4 * B + 1, K), torch.randn(2 * B, K))
    with pytest.raises(ValueError, match="expected 6"):
        RoBDINOLoss(n_student_crops=6)(torch.randn(4 * B, K), torch.randn(2 * B, K))
    with pytest.raises(ValueError, match="normalization"):
        RoBDINOLoss(normalization="views")
    with pytest.raises(ValueError, match="teacher_temp"):
        RoBDINOLoss(teacher_temp=0.0)


# ----------------------------------------------------------------------------------- MSN


@pytest.mark.parametrize("n_student", [2, 4, 6, 10])
@pytest.mark.parametrize("cross_view", [False, True])
@pytest.mark.parametrize("tt", [0.025, 0.1])
def test_msn_matches_reference(n_student, cross_view, tt):
    student = _rand(n_student * B, K, seed=n_student, scale=3.0)
    # teacher MSN head output: cosine similarities in [-1, 1]
    teacher_cos = torch.tanh(_rand(2 * B, K, seed=7))
    loss, _ = RoBMSNLoss(teacher_temp=tt, cross_view=cross_view)(student, teacher_cos)
    expected = _ref_dino(student.numpy(), teacher_cos.numpy(), 0.1, tt, 2, cross_view)
    np.testing.assert_allclose(loss.item(), expected, **TOL)

    probs = torch.tensor(np.stack([_softmax(r, tt) for r in teacher_cos.numpy()]))
    from_probs, _ = RoBMSNLoss(cross_view=cross_view)(student, teacher_probs=probs)
    np.testing.assert_allclose(from_probs.item(), expected, **TOL)


def test_msn_needs_exactly_one_teacher_input():
    s, t = torch.randn(4 * B, K), torch.randn(2 * B, K)
    with pytest.raises(ValueError, match="exactly one"):
        RoBMSNLoss()(s)
    with pytest.raises(ValueError, match="exactly one"):
        RoBMSNLoss()(s, t, teacher_probs=t.softmax(-1))


# ----------------------------------------------------------------------------------- iBOT


def _ref_ibot(sc, tc, sp, tp, masks, st, tt, tpt, l1, l2, cross_view, patch_norm="per_image"):
    cls = _ref_dino(sc, tc, st, tt, 2, cross_view)
    if sp is None:
        return l1 * cls
    view_terms, total, total_count = [], 0.0, 0
    for t in range(2):  # the patch term always pairs the same view s == t
        per_image = []
        for b in range(B):
            row = t * B + b
            masked_sum, count = 0.0, 0
            for p in range(sp.shape[1]):
                if masks[row, p]:
                    masked_sum += _ce(_softmax(tp[row, p], tpt), sp[row, p], st)
                    count += 1
            per_image.append(masked_sum / max(1, count))
            total += masked_sum
            total_count += count
        view_terms.append(sum(per_image) / B)
    patch = sum(view_terms) / 2 if patch_norm == "per_image" else total / max(1, total_count)
    return l1 * cls + l2 * patch


def _ibot_inputs(n_student: int, n_patches: int, seed: int):
    sc = _rand(n_student * B, K, seed=seed, scale=2.0)
    tc = _rand(2 * B, K, seed=seed + 1, scale=2.0)
    sp = _rand(2 * B, n_patches, K, seed=seed + 2, scale=2.0)
    tp = _rand(2 * B, n_patches, K, seed=seed + 3, scale=2.0)
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * B, n_patches, generator=g) < 0.4
    masks[1] = False  # some images unmasked: they count as zero in the per-image mean
    masks[B + 2] = False
    masks[0, 0] = True
    return sc, tc, sp, tp, masks


@pytest.mark.parametrize("n_student", [2, 4, 6, 10])
@pytest.mark.parametrize("cross_view", [False, True])
@pytest.mark.parametrize(
    ("st", "tt", "tpt", "l1", "l2"), [(0.1, 0.07, 0.07, 1.0, 1.0), (0.2, 0.04, 0.05, 0.5, 2.0)]
)
def test_ibot_matches_reference(n_student, cross_view, st, tt, tpt, l1, l2):
    sc, tc, sp, tp, masks = _ibot_inputs(n_student, 6, seed=n_student)
    loss_fn = RoBiBOTLoss(
        student_temp=st,
        teacher_temp=tt,
        teacher_patch_temp=tpt,
        lambda1=l1,
        lambda2=l2,
        cross_view=cross_view,
    )
    loss, parts = loss_fn(sc, tc, sp, tp, masks)
    expected = _ref_ibot(
        sc.numpy(), tc.numpy(), sp.numpy(), tp.numpy(), masks.numpy(), st, tt, tpt, l1, l2, cross_view
    )
    np.testing.assert_allclose(loss.item(), expected, **TOL)
    np.testing.assert_allclose(l1 * parts["cls"] + l2 * parts["patch"], expected, **TOL)

    # [2B, H, W] masks (as block_masks returns them) are the same as flattened ones
    loss_hw, _ = loss_fn(sc, tc, sp, tp, masks.reshape(2 * B, 2, 3))
    assert loss_hw.item() == loss.item()

    # CLS only (CNN students): no patch tensors
    cls_only, parts = loss_fn(sc, tc)
    expected = _ref_ibot(sc.numpy(), tc.numpy(), None, None, None, st, tt, tpt, l1, l2, cross_view)
    np.testing.assert_allclose(cls_only.item(), expected, **TOL)
    assert parts["patch"] == 0.0


def test_ibot_patch_term_ignores_unmasked_patches():
    sc, tc, sp, tp, masks = _ibot_inputs(4, 6, seed=3)
    loss, _ = RoBiBOTLoss()(sc, tc, sp, tp, masks)
    sp2 = sp.clone()
    sp2[~masks] = _rand(int((~masks).sum()), K, seed=99, scale=5.0)
    loss2, _ = RoBiBOTLoss()(sc, tc, sp2, tp, masks)
    np.testing.assert_allclose(loss.item(), loss2.item(), **TOL)


def test_ibot_patch_pairing_is_same_view_even_when_cross_view():
    sc, tc, sp, tp, masks = _ibot_inputs(4, 6, seed=4)
    same, same_parts = RoBiBOTLoss()(sc, tc, sp, tp, masks)
    cross, cross_parts = RoBiBOTLoss(cross_view=True)(sc, tc, sp, tp, masks)
    assert same_parts["patch"] == cross_parts["patch"]
    assert same_parts["cls"] != cross_parts["cls"]


@pytest.mark.parametrize("masked_views", [[0, 1, 2, 3, 4, 5], [0, 2, 3], [4]])
def test_ibot_paper_patch_normalisation_factor(masked_views):
    sc, tc, sp, tp, _ = _ibot_inputs(6, 8, seed=5)
    m = 3  # every masked view has exactly m masked patches
    masks = torch.zeros(2 * B, 8, dtype=torch.bool)
    for i, v in enumerate(masked_views):
        masks[v, torch.roll(torch.arange(8), i)[:m]] = True
    official, op = RoBiBOTLoss(lambda1=0.0)(sc, tc, sp, tp, masks)
    paper, pp = RoBiBOTLoss(lambda1=0.0, patch_normalization="paper")(sc, tc, sp, tp, masks)
    expected = _ref_ibot(
        sc.numpy(),
        tc.numpy(),
        sp.numpy(),
        tp.numpy(),
        masks.numpy(),
        0.1,
        0.07,
        0.07,
        0.0,
        1.0,
        False,
        "paper",
    )
    np.testing.assert_allclose(paper.item(), expected, **TOL)
    # documented factor: official = paper * n_masked_views / (T * B)
    np.testing.assert_allclose(official.item(), paper.item() * len(masked_views) / (2 * B), **TOL)


def test_ibot_argument_errors():
    sc, tc, sp, tp, masks = _ibot_inputs(4, 6, seed=6)
    with pytest.raises(ValueError, match="together"):
        RoBiBOTLoss()(sc, tc, sp, tp)
    with pytest.raises(ValueError, match=r"\[T\*B, P\]"):
        RoBiBOTLoss()(sc, tc, sp, tp, masks[:, :5])
    with pytest.raises(ValueError, match="patch_normalization"):
        RoBiBOTLoss(patch_normalization="global")


# ----------------------------------------------------------------------------------- SwAV


def _ref_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    q = np.exp(scores / eps - (scores / eps).max()).T  # [K, B]
    q = q / q.sum()
    n_proto, n_img = q.shape
    for _ in range(iters):
        for k in range(n_proto):
            q[k] *= (1.0 / n_proto) / q[k].sum()
        for b in range(n_img):
            q[:, b] *= (1.0 / n_img) / q[:, b].sum()
    return (q / q.sum(axis=0, keepdims=True)).T


def _ref_swav(student, teacher, st, eps, iters, n_teacher, cross_view):
    n_student = student.shape[0] // B
    per_teacher = []
    for i in range(n_teacher):
        scores = _crop(teacher, i)
        if iters == 0:
            target = np.stack([_softmax(r, eps) for r in scores])
        else:
            target = _ref_sinkhorn(scores, eps, iters)
        # the student crop lists exactly as VISSL's SwAV distillation loss writes them
        if n_teacher == 1:
            ids = list(range(1 if cross_view else 0, n_student))
        elif cross_view:
            ids = [p for p in range(n_student) if p != i]
        else:
            ids = [i] + list(range(2, n_student))
        crop_terms = [_term(student, [target], 0, p, st) for p in ids]
        per_teacher.append(sum(crop_terms) / len(ids))
    return sum(per_teacher) / n_teacher


@pytest.mark.parametrize("n_student", [2, 4, 6, 10])
@pytest.mark.parametrize("n_teacher", [1, 2])
@pytest.mark.parametrize("iters", [0, 3])
@pytest.mark.parametrize("cross_view", [False, True])
def test_swav_matches_reference(n_student, n_teacher, iters, cross_view):
    student = _rand(n_student * B, K, seed=n_student, scale=2.0)
    teacher = torch.tanh(_rand(n_teacher * B, K, seed=50 + n_student))  # cosine-like scores
    loss_fn = RoBSwAVLoss(sinkhorn_iterations=iters, n_teacher_crops=n_teacher, cross_view=cross_view)
    loss, _ = loss_fn(student, teacher)
    expected = _ref_swav(student.numpy(), teacher.numpy(), 0.1, 0.03, iters, n_teacher, cross_view)
    np.testing.assert_allclose(loss.item(), expected, **TOL)


def test_swav_temperatures_and_sinkhorn_marginals():
    student = _rand(4 * B, K, seed=1)
    teacher = torch.tanh(_rand(2 * B, K, seed=2))
    loss, _ = RoBSwAVLoss(student_temp=0.2, epsilon=0.05, sinkhorn_iterations=3)(student, teacher)
    expected = _ref_swav(student.numpy(), teacher.numpy(), 0.2, 0.05, 3, 2, False)
    np.testing.assert_allclose(loss.item(), expected, **TOL)
    # many iterations: every sample's target sums to 1 and prototypes are used equally
    targets = RoBSwAVLoss(epsilon=0.5, sinkhorn_iterations=200).targets(_rand(20, 4, seed=3), batch=20)
    np.testing.assert_allclose(targets.sum(1).numpy(), 1.0, atol=1e-9)
    np.testing.assert_allclose(targets.sum(0).numpy(), 20 / 4, rtol=1e-6)


def _sinkhorn_worker(rank: int, folder: str, scores: torch.Tensor) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2
    )
    try:
        half = scores.shape[0] // 2
        codes = vissl_sinkhorn_knopp(scores[rank * half : (rank + 1) * half], epsilon=0.03, iterations=3)
        torch.save(codes, f"{folder}/codes{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_sinkhorn_uses_the_global_batch_when_distributed(tmp_path):
    # two processes holding half a batch each must get the codes of one process holding all of it
    scores = torch.tanh(_rand(8, 5, seed=11))
    # fork: no re-import of torch in the children, so the test stays fast on CPU
    torch.multiprocessing.start_processes(
        _sinkhorn_worker, args=(str(tmp_path), scores), nprocs=2, start_method="fork"
    )
    codes = torch.cat([torch.load(tmp_path / f"codes{r}.pt") for r in range(2)])
    np.testing.assert_allclose(codes.numpy(), _ref_sinkhorn(scores.numpy(), 0.03, 3), rtol=1e-9, atol=1e-12)
    # and differ from per-process Sinkhorn on each half
    local = torch.cat([vissl_sinkhorn_knopp(h, 0.03, 3) for h in scores.split(4)])
    assert not torch.allclose(codes, local)


# ----------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("family", ["dino", "msn", "swav", "ibot"])
def test_gradients_reach_the_student_only(family):
    sc = _rand(4 * B, K, seed=1).requires_grad_()
    tc = _rand(2 * B, K, seed=2).requires_grad_()
    loss_fn = build_rob_loss(family)
    if family == "ibot":
        sp = _rand(2 * B, 4, K, seed=3).requires_grad_()
        tp = _rand(2 * B, 4, K, seed=4).requires_grad_()
        masks = torch.ones(2 * B, 4, dtype=torch.bool)
        loss, _ = loss_fn(sc, tc, sp, tp, masks)
    else:
        loss, _ = loss_fn(sc, tc)
    loss.backward()
    assert sc.grad is not None and sc.grad.abs().sum() > 0
    assert tc.grad is None
    if family == "ibot":
        assert sp.grad is not None and sp.grad.abs().sum() > 0
        assert tp.grad is None


def test_gradient_matches_finite_difference():
    sc = _rand(4 * B, K, seed=8).requires_grad_()
    tc = _rand(2 * B, K, seed=9)
    loss, _ = RoBDINOLoss()(sc, tc)
    (grad,) = torch.autograd.grad(loss, sc)
    h = 1e-6
    for idx in [(0, 0), (5, 3), (11, 6)]:
        plus, minus = sc.detach().clone(), sc.detach().clone()
        plus[idx] += h
        minus[idx] -= h
        numeric = (
            _ref_dino(plus.numpy(), tc.numpy(), 0.1, 0.07, 2, False)
            - _ref_dino(minus.numpy(), tc.numpy(), 0.1, 0.07, 2, False)
        ) / (2 * h)
        assert grad[idx].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


# ----------------------------------------------------------------------------------- factory


def test_factory_builds_each_family_with_keywords():
    assert isinstance(build_rob_loss("DINO", teacher_temp=0.04), RoBDINOLoss)
    assert build_rob_loss("msn").teacher_temp == 0.025
    assert build_rob_loss("swav", sinkhorn_iterations=3, n_teacher_crops=1).sinkhorn_iterations == 3
    assert build_rob_loss("ibot", lambda2=0.5).lambda2 == 0.5
    with pytest.raises(ValueError, match="did you mean 'ibot'"):
        build_rob_loss("ibto")
    with pytest.raises(TypeError, match="accepted keywords"):
        build_rob_loss("dino", teacher_temperature=0.07)
