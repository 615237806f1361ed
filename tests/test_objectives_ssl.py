"""DINO, SwAV and MoCo-v2* losses against independent float64 references written with explicit
loops over the pairs (lightly's ``test_dino_loss`` pattern), plus a 2-process gloo run.

The references below use numpy only and re-derive every quantity from the papers' equations and
the official implementations' behaviour described in the module docstrings; they never call
robkit helpers.
"""

from __future__ import annotations

import itertools
import math
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from robkit.objectives.dino import DINOLoss
from robkit.objectives.mocov2 import MoCoV2Loss
from robkit.objectives.multicrop import balanced_alpha
from robkit.objectives.sinkhorn import sinkhorn_knopp
from robkit.objectives.swav import SwAVLoss

# ----------------------------------------------------------------------------- references


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def _weighted(gg: list[float], gl: list[float], alpha: float | None, global_only: bool = False) -> float:
    """Eq. 2 (alpha None: uniform mean over all pair terms) or eq. 3, written out longhand."""
    if global_only:
        return sum(gg) / len(gg)
    if alpha is None or not gg or not gl:
        return (sum(gg) + sum(gl)) / (len(gg) + len(gl))
    return alpha * sum(gg) / len(gg) + (1 - alpha) * sum(gl) / len(gl)


def ref_teacher_temp(epoch: int, final: float, warm: float, warm_epochs: int) -> float:
    if epoch >= warm_epochs:
        return final
    if warm_epochs == 1:
        return warm
    return warm + (final - warm) * epoch / (warm_epochs - 1)


def ref_dino(student, teacher, center, ng, nl, tau_s, tau_t, alpha, global_only=False):
    b = teacher.shape[0] // ng
    gg, gl = [], []
    for q in range(ng):
        for v in range(ng + nl):
            if v == q:
                continue
            per_sample = []
            for i in range(b):
                t = (teacher[q * b + i] - center) / tau_t
                p_t = np.exp(t - t.max())
                p_t /= p_t.sum()
                log_p_s = _log_softmax(student[v * b + i] / tau_s)
                per_sample.append(-(p_t * log_p_s).sum())
            (gg if v < ng else gl).append(float(np.mean(per_sample)))
    return _weighted(gg, gl, alpha, global_only), gg, gl


def ref_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    q = np.exp(scores / eps).T.copy()  # prototypes x samples
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        for r in range(k):
            q[r] /= q[r].sum() * k
        for c in range(b):
            q[:, c] /= q[:, c].sum() * b
    return (q * b).T


def ref_swav(scores, ng, nl, assign, tau, eps, iters, alpha, prefix=None):
    s = ng + nl
    b = scores.shape[0] // s
    gg, gl = [], []
    for q in assign:
        own = scores[q * b : (q + 1) * b]
        if prefix is not None and prefix[q] is not None:
            own = np.concatenate([prefix[q], own])
        codes = ref_sinkhorn(own, eps, iters)[-b:]
        for v in range(s):
            if v == q:
                continue
            ce = [-(codes[i] * _log_softmax(scores[v * b + i] / tau)).sum() for i in range(b)]
            (gg if (q < ng and v < ng) else gl).append(float(np.mean(ce)))
    return _weighted(gg, gl, alpha)


def ref_moco(queries, keys, queue, nl, tau, alpha, global_only=False):
    b = keys.shape[0]
    k = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    ces = []
    for c in range(1 + nl):
        per_sample = []
        for i in range(b):
            q = queries[c * b + i] / np.linalg.norm(queries[c * b + i])
            logits = np.array([q @ k[i]] + [q @ queue[:, j] for j in range(queue.shape[1])]) / tau
            per_sample.append(-_log_softmax(logits)[0])
        ces.append(float(np.mean(per_sample)))
    return _weighted(ces[:1], ces[1:], alpha, global_only)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------- DINO

DINO_GRID = list(itertools.product([(2, 0), (2, 3), (2, 6), (1, 3), (3, 2)], [None, 0.4, 0.0], [0.1, 0.2]))


@pytest.mark.parametrize("crops,alpha,tau_s", DINO_GRID)
def test_dino_matches_loop_reference_with_centering(crops, alpha, tau_s):
    ng, nl = crops
    b, k, m = 3, 7, 0.9
    gen = torch.Generator().manual_seed(ng * 100 + nl)
    loss_fn = DINOLoss(
        k,
        ng,
        nl,
        student_temp=tau_s,
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=3,
        n_epochs=10,
        center_momentum=m,
        alpha=alpha,
    ).double()
    center = np.zeros(k)
    for epoch in (0, 1, 5):  # three calls: the center from each call feeds the next
        s = torch.randn((ng + nl) * b, k, generator=gen, dtype=torch.float64)
        t = 3 * torch.randn(ng * b, k, generator=gen, dtype=torch.float64)
        loss, parts = loss_fn(s, t, epoch)
        tau_t = ref_teacher_temp(epoch, 0.07, 0.04, 3)
        expected, gg, gl = ref_dino(s.numpy(), t.numpy(), center, ng, nl, tau_s, tau_t, alpha)
        assert float(loss) == pytest.approx(expected, rel=1e-10)
        assert parts["teacher_temp"] == pytest.approx(tau_t, rel=1e-12)
        assert (
            parts["loss_gg"] == pytest.approx(np.mean(gg), rel=1e-10) if gg else math.isnan(parts["loss_gg"])
        )
        assert (
            parts["loss_gl"] == pytest.approx(np.mean(gl), rel=1e-10) if gl else math.isnan(parts["loss_gl"])
        )
        center = m * center + (1 - m) * t.numpy().mean(axis=0)
        np.testing.assert_allclose(loss_fn.center.numpy()[0], center, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("warm_epochs", [1, 2, 5, 30])
def test_dino_teacher_temperature_schedule_per_epoch(warm_epochs):
    loss_fn = DINOLoss(
        4,
        2,
        0,
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=warm_epochs,
        n_epochs=40,
    )
    for epoch in sorted({0, 1, warm_epochs - 1, warm_epochs, warm_epochs + 3}):
        assert loss_fn.teacher_temp_at(epoch) == pytest.approx(
            ref_teacher_temp(epoch, 0.07, 0.04, warm_epochs)
        )
    # DINO's linspace reaches the final value at the last warm-up epoch already.
    assert loss_fn.teacher_temp_at(warm_epochs - 1) == pytest.approx(0.07 if warm_epochs > 1 else 0.04)


@pytest.mark.parametrize("warm_epochs", [1, 2, 5])
def test_dino_teacher_temperature_at_fractional_epochs_follows_the_whole_epoch(warm_epochs):
    """The engine passes fractional epochs; a whole-epoch warm-up keeps DINO's per-epoch steps."""
    loss_fn = DINOLoss(4, 2, 0, warmup_teacher_temp_epochs=warm_epochs, n_epochs=40)
    for epoch in (0.0, 0.4, 0.999, 1.5, warm_epochs - 0.01, warm_epochs + 0.5):
        assert loss_fn.teacher_temp_at(epoch) == pytest.approx(
            ref_teacher_temp(math.floor(epoch), 0.07, 0.04, warm_epochs)
        )


def test_dino_teacher_temperature_fractional_warmup_ramps_linearly():
    """Short budgets warm up over a fraction of an epoch: linear from 0.04 at 0 to 0.07 at W."""
    loss_fn = DINOLoss(4, 2, 0, warmup_teacher_temp_epochs=0.5, n_epochs=1)
    assert loss_fn.teacher_temp_at(0.0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp_at(0.25) == pytest.approx(0.055)
    assert loss_fn.teacher_temp_at(0.5) == pytest.approx(0.07)
    assert loss_fn.teacher_temp_at(0.9) == pytest.approx(0.07)


def test_dino_global_only_and_state_dict_and_gradients():
    ng, nl, b, k = 2, 4, 3, 6
    loss_fn = DINOLoss(k, ng, nl, warmup_teacher_temp_epochs=0, global_only=True).double()
    s = torch.randn((ng + nl) * b, k, dtype=torch.float64, requires_grad=True)
    t = torch.randn(ng * b, k, dtype=torch.float64, requires_grad=True)
    loss, _ = loss_fn(s, t, 0)
    expected, gg, _ = ref_dino(s.detach().numpy(), t.detach().numpy(), np.zeros(k), ng, nl, 0.1, 0.07, None)
    assert loss.item() == pytest.approx(np.mean(gg), rel=1e-10)
    assert loss.item() != pytest.approx(expected)  # the local terms really are left out
    assert not torch.all(loss_fn.center == 0)  # ...but the center is still updated
    loss.backward()
    assert t.grad is None  # the teacher is a target, never differentiated
    assert torch.all(s.grad[ng * b :] == 0) and s.grad[: ng * b].abs().sum() > 0
    assert "center" in loss_fn.state_dict()


@pytest.mark.parametrize("ng,nl", [(2, 6), (2, 10), (2, 2), (3, 4)])
def test_alpha_at_pair_ratio_equals_uniform_mean_dino_and_swav(ng, nl):
    # eq. 3 with alpha = P_gg / (P_gg + P_gl) is eq. 2 (the paper's 0.143 for 2 + 6 crops)
    p_gg, p_gl = ng * (ng - 1), ng * nl
    assert balanced_alpha(ng, nl) == pytest.approx(p_gg / (p_gg + p_gl))
    b, k = 4, 5
    s = torch.randn((ng + nl) * b, k, dtype=torch.float64)
    t = torch.randn(ng * b, k, dtype=torch.float64)
    uniform, _ = DINOLoss(k, ng, nl, alpha=None).double()(s, t, 0)
    balanced, _ = DINOLoss(k, ng, nl, alpha=balanced_alpha(ng, nl)).double()(s, t, 0)
    assert float(balanced) == pytest.approx(float(uniform), rel=1e-12)

    emb = _unit(torch.randn((ng + nl) * b, 8, dtype=torch.float64))
    protos = _unit(torch.randn(k, 8, dtype=torch.float64))
    args = (emb, emb @ protos.t(), protos, 0)
    crops = tuple(range(ng))
    uniform, _ = SwAVLoss(k, 8, ng, nl, crops_for_assign=crops, alpha=None)(*args)
    balanced, _ = SwAVLoss(k, 8, ng, nl, crops_for_assign=crops, alpha=balanced_alpha(ng, nl))(*args)
    assert float(balanced) == pytest.approx(float(uniform), rel=1e-12)
    assert balanced_alpha(2, 6) == pytest.approx(0.142857, abs=1e-6)


def test_dino_rejects_wrong_layout():
    loss_fn = DINOLoss(5, 2, 2)
    with pytest.raises(ValueError, match="student_logits"):
        loss_fn(torch.randn(3 * 4, 5), torch.randn(2 * 4, 5), 0)


# ----------------------------------------------------------------------------- SwAV


@pytest.mark.parametrize("eps,iters", [(0.05, 3), (0.03, 3), (0.05, 1), (0.1, 10)])
def test_sinkhorn_matches_reference_and_marginals(eps, iters):
    b, k = 6, 4
    g = torch.Generator().manual_seed(0)  # some random draws converge too slowly for the 500-step check
    x, protos = (
        torch.randn(b, 5, dtype=torch.float64, generator=g),
        torch.randn(k, 5, dtype=torch.float64, generator=g),
    )
    scores = _unit(x) @ _unit(protos).t()
    codes = sinkhorn_knopp(scores, eps, iters)
    np.testing.assert_allclose(codes.numpy(), ref_sinkhorn(scores.numpy(), eps, iters), rtol=1e-10)
    # the last step normalises samples: each code is a distribution over prototypes
    np.testing.assert_allclose(codes.sum(dim=1).numpy(), np.ones(b), rtol=1e-12)
    # with enough iterations prototypes are equipartitioned: each gets B/K of the (x B) mass
    converged = sinkhorn_knopp(scores, eps, 500)
    np.testing.assert_allclose(converged.sum(dim=0).numpy(), np.full(k, b / k), rtol=1e-6)


def test_sinkhorn_zero_iterations_is_softmax():
    scores = torch.rand(5, 7, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(sinkhorn_knopp(scores, 0.05, 0), F.softmax(scores / 0.05, dim=1))


SWAV_GRID = list(
    itertools.product([(2, 0), (2, 4), (2, 6)], [(0, 1), (0,)], [None, 0.4], [(0.1, 0.05), (0.2, 0.03)])
)


@pytest.mark.parametrize("crops,assign,alpha,temps", SWAV_GRID)
def test_swav_swapped_prediction_matches_loop_reference(crops, assign, alpha, temps):
    ng, nl = crops
    tau, eps = temps
    b, k, d = 4, 6, 5
    emb = _unit(torch.randn((ng + nl) * b, d, dtype=torch.float64, requires_grad=True))
    protos = _unit(torch.randn(k, d, dtype=torch.float64))
    scores = emb @ protos.t()
    loss_fn = SwAVLoss(
        k,
        d,
        ng,
        nl,
        temperature=tau,
        epsilon=eps,
        sinkhorn_iterations=3,
        crops_for_assign=assign,
        alpha=alpha,
    )
    loss, parts = loss_fn(emb, scores, protos, epoch=0)
    expected = ref_swav(scores.detach().numpy(), ng, nl, assign, tau, eps, 3, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert parts["queue_used"] == 0.0
    loss.backward()  # codes are computed without gradient, predictions carry it


def test_swav_queue_fills_shifts_and_is_used_once_full():
    ng, nl, b, k, d = 2, 2, 3, 5, 4
    length = 2 * b
    loss_fn = SwAVLoss(
        k, d, ng, nl, crops_for_assign=(0, 1), queue_length=length, queue_start_epoch=1
    ).double()
    gen = torch.Generator().manual_seed(0)
    protos = _unit(torch.randn(k, d, generator=gen, dtype=torch.float64))
    history: list[torch.Tensor] = []
    for step, epoch in enumerate([0, 1, 1, 1, 1]):
        emb = _unit(torch.randn((ng + nl) * b, d, generator=gen, dtype=torch.float64))
        scores = emb @ protos.t()
        queue_before = loss_fn.queue.clone()
        loss, parts = loss_fn(emb, scores, protos, epoch)
        full = len(history) * b >= length  # batches pushed by earlier calls fill the queue
        prefix = {
            q: (queue_before[i].numpy() @ protos.numpy().T if full else None) for i, q in enumerate((0, 1))
        }
        expected = ref_swav(scores.numpy(), ng, nl, (0, 1), 0.1, 0.05, 3, None, prefix=prefix)
        assert parts["queue_used"] == float(full), step
        assert float(loss) == pytest.approx(expected, rel=1e-10), step
        if epoch >= 1:
            history.append(emb)
            # newest batch in front, the previous one shifted behind it
            for i, q in enumerate((0, 1)):
                torch.testing.assert_close(loss_fn.queue[i, :b], emb[q * b : (q + 1) * b])
                if len(history) >= 2:
                    torch.testing.assert_close(loss_fn.queue[i, b : 2 * b], history[-2][q * b : (q + 1) * b])
        else:
            assert torch.all(loss_fn.queue == 0)  # before queue_start_epoch nothing is stored
    assert "queue" in loss_fn.state_dict()


def test_swav_queue_shorter_than_batch_is_an_error():
    loss_fn = SwAVLoss(5, 4, 2, 0, queue_length=2, queue_start_epoch=0)
    emb = _unit(torch.randn(2 * 3, 4))
    protos = _unit(torch.randn(5, 4))
    with pytest.raises(ValueError, match="queue_length=2"):
        loss_fn(emb, emb @ protos.t(), protos, 0)


# ----------------------------------------------------------------------------- MoCo-v2*


@pytest.mark.parametrize(
    "nl,alpha,global_only,tau",
    [
        (0, None, False, 0.2),
        (2, None, False, 0.2),
        (6, None, False, 0.2),
        (6, 0.4, False, 0.2),
        (2, 0.4, False, 0.07),
        (6, None, True, 0.2),
        (3, 0.7, False, 0.5),
    ],
)
def test_moco_infonce_with_queue_matches_reference(nl, alpha, global_only, tau):
    b, d, size = 4, 6, 12
    torch.manual_seed(nl)
    loss_fn = MoCoV2Loss(d, size, tau, nl, alpha=alpha, global_only=global_only).double()
    np.testing.assert_allclose(loss_fn.queue.norm(dim=0).numpy(), np.ones(size), rtol=1e-6)  # unit columns
    for _ in range(3):  # later calls see the keys enqueued by earlier ones as negatives
        q = torch.randn((1 + nl) * b, d, dtype=torch.float64)
        k = torch.randn(b, d, dtype=torch.float64)
        queue_before = loss_fn.queue.clone().numpy()
        loss, _ = loss_fn(q, k)
        assert float(loss) == pytest.approx(
            ref_moco(q.numpy(), k.numpy(), queue_before, nl, tau, alpha, global_only), rel=1e-10
        )


def test_moco_alpha_one_over_chunks_equals_uniform_mean():
    nl, b, d = 6, 4, 5
    q, k = torch.randn((1 + nl) * b, d, dtype=torch.float64), torch.randn(b, d, dtype=torch.float64)
    torch.manual_seed(0)
    uniform, _ = MoCoV2Loss(d, 8, n_local=nl).double()(q, k)
    torch.manual_seed(0)
    balanced, _ = MoCoV2Loss(d, 8, n_local=nl, alpha=1 / (1 + nl)).double()(q, k)
    assert float(balanced) == pytest.approx(float(uniform), rel=1e-12)


def test_moco_enqueue_pointer_wraps():
    b, d, size = 2, 3, 6
    loss_fn = MoCoV2Loss(d, size, n_local=1).double()
    initial = loss_fn.queue.clone()
    keys = [torch.randn(b, d, dtype=torch.float64) for _ in range(4)]
    pointers = []
    for k in keys:
        loss_fn(torch.randn(2 * b, d, dtype=torch.float64), k)
        pointers.append(int(loss_fn.queue_ptr))
    assert pointers == [2, 4, 0, 2]
    unit = [F.normalize(k, dim=1) for k in keys]
    torch.testing.assert_close(loss_fn.queue[:, 0:2], unit[3].t())  # 4th batch overwrote slot 0
    torch.testing.assert_close(loss_fn.queue[:, 2:4], unit[1].t())
    torch.testing.assert_close(loss_fn.queue[:, 4:6], unit[2].t())
    assert not torch.allclose(loss_fn.queue, initial)


def test_moco_queue_not_multiple_of_batch_is_an_error():
    loss_fn = MoCoV2Loss(4, 10, n_local=0)
    with pytest.raises(ValueError, match="multiple of the global batch 4"):
        loss_fn(torch.randn(4, 4), torch.randn(4, 4))


# ----------------------------------------------------------------------------- 2 processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(x: torch.Tensor, n_crops: int, b_global: int, rank: int, world: int) -> torch.Tensor:
    """This rank's images of every crop of a crop-major global batch (crop-major again)."""
    per = b_global // world
    return torch.cat([x[c * b_global + rank * per : c * b_global + (rank + 1) * per] for c in range(n_crops)])


def _worker(rank: int, world: int, port: int, data: dict, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b = data["b"]
        dino = DINOLoss(data["k"], 2, 2, warmup_teacher_temp_epochs=0).double()
        loss, _ = dino(_rows(data["s"], 4, b, rank, world), _rows(data["t"], 2, b, rank, world), 0)
        codes = sinkhorn_knopp(_rows(data["scores"], 1, b, rank, world), 0.05, 3)
        swav = SwAVLoss(data["k"], data["d"], 2, 2)
        sw_loss, _ = swav(
            _rows(data["emb"], 4, b, rank, world),
            _rows(data["emb"] @ data["protos"].t(), 4, b, rank, world),
            data["protos"],
            0,
        )
        torch.manual_seed(0)
        moco = MoCoV2Loss(data["d"], 2 * b, n_local=1).double()
        mo_loss, _ = moco(_rows(data["mq"], 2, b, rank, world), _rows(data["mk"], 1, b, rank, world))
        out[rank] = {
            "center": dino.center.clone(),
            "dino": float(loss),
            "codes": codes,
            "swav": float(sw_loss),
            "moco": float(mo_loss),
            "queue": moco.queue.clone(),
            "ptr": int(moco.queue_ptr),
        }
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process_on_concatenated_batch():
    b, k, d, world = 4, 6, 5, 2
    gen = torch.Generator().manual_seed(3)
    emb = _unit(torch.randn(4 * b, d, generator=gen, dtype=torch.float64))
    protos = _unit(torch.randn(k, d, generator=gen, dtype=torch.float64))
    data = {
        "b": b,
        "k": k,
        "d": d,
        "s": torch.randn(4 * b, k, generator=gen, dtype=torch.float64),
        "t": torch.randn(2 * b, k, generator=gen, dtype=torch.float64),
        "scores": emb[:b] @ protos.t(),
        "emb": emb,
        "protos": protos,
        "mq": torch.randn(2 * b, d, generator=gen, dtype=torch.float64),
        "mk": torch.randn(b, d, generator=gen, dtype=torch.float64),
    }
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), data, out), nprocs=world, join=True)

    single = DINOLoss(k, 2, 2, warmup_teacher_temp_epochs=0).double()
    loss, _ = single(data["s"], data["t"], 0)
    codes = sinkhorn_knopp(data["scores"], 0.05, 3)
    sw_loss, _ = SwAVLoss(k, d, 2, 2)(emb, emb @ protos.t(), protos, 0)
    torch.manual_seed(0)
    moco = MoCoV2Loss(d, 2 * b, n_local=1).double()
    mo_loss, _ = moco(data["mq"], data["mk"])
    for r in range(world):
        torch.testing.assert_close(out[r]["center"], single.center, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            out[r]["codes"], codes[r * b // world : (r + 1) * b // world], rtol=1e-10, atol=0
        )
        torch.testing.assert_close(out[r]["queue"], moco.queue)  # keys gathered in rank order
        assert out[r]["ptr"] == int(moco.queue_ptr)
    # every term is a batch mean over equal shards, so the shard losses average to the full one
    for name, full in (("dino", loss), ("swav", sw_loss), ("moco", mo_loss)):
        assert np.mean([out[r][name] for r in range(world)]) == pytest.approx(float(full), rel=1e-10), name
