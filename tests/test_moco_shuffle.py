"""MoCo's "shuffle BN" across processes (He et al. 2020, sec. 3.3), on 2 gloo processes.

The key images of all processes are gathered, permuted with one permutation (rank 0's draw,
broadcast), each process runs the key encoder on its slice, and the keys are shuffled back so
each process holds the keys of its own images.  Each process holds rows ``rank::world`` of the
global batch, as the trainer gives them.  The references below apply the permutation by hand
with plain indexing and never call the shuffle helpers.
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from robkit.engine.tasks import MoCoTask
from robkit.models.heads import MLPHead
from robkit.utils import distributed as dist_utils

WORLD, B_LOCAL, FEAT = 2, 4, 6
SEEDS = (101, 202)  # per-rank generator seeds, different on each rank as the trainer's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _linear() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(FEAT, 4).double()


def _bn_net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(FEAT, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4)).double().train()


class _CaptureKeys(nn.Module):
    """A stand-in MoCo loss that records the keys the task hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: torch.Tensor | None = None

    def forward(self, q, k):
        self.keys = k.detach().clone()
        return q.sum() * 0, {}


def _task() -> MoCoTask:
    torch.manual_seed(3)
    student = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
    )
    return (
        MoCoTask(student, MLPHead([4, 8, 5], use_bn=True), _CaptureKeys(), key_momentum=0.9).double().train()
    )


def _data() -> dict:
    g = torch.Generator().manual_seed(0)
    n = WORLD * B_LOCAL
    return {
        "x": torch.randn(n, FEAT, generator=g, dtype=torch.float64),
        "g0": torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
        "g1": torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
    }


def _worker(rank: int, world: int, port: int, data: dict, out: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = data["x"][rank::world]  # this process's rows of the global batch
        res: dict = {}
        with torch.no_grad():
            lin = _linear()
            gen = torch.Generator().manual_seed(SEEDS[rank])
            xs, perm = dist_utils.batch_shuffle(x, gen)
            res["lin_shuffled_in"], res["perm"] = xs, perm
            res["lin_keys"] = dist_utils.batch_unshuffle(lin(xs), perm)
            res["lin_plain"] = lin(x)

            bn = _bn_net()
            gen = torch.Generator().manual_seed(SEEDS[rank])
            xs, perm = dist_utils.batch_shuffle(x, gen)
            res["bn_keys"] = dist_utils.batch_unshuffle(bn(xs), perm)
            res["bn_plain"] = _bn_net()(x)

        task = _task()
        task.reseed(SEEDS[rank])
        task([data["g0"][rank::world], data["g1"][rank::world]], 0.0)
        res["task_keys"] = task.loss.keys
        out[rank] = res
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process() -> tuple[dict, dict]:
    torch.set_num_threads(1)
    data = _data()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(WORLD, _free_port(), data, out), nprocs=WORLD, join=True)
    return data, {r: out[r] for r in range(WORLD)}


def _gathered(x: torch.Tensor) -> torch.Tensor:
    """The rows of all processes concatenated in rank order (not the global batch order)."""
    return torch.cat([x[r::WORLD] for r in range(WORLD)])


def _rank0_perm() -> torch.Tensor:
    return torch.randperm(WORLD * B_LOCAL, generator=torch.Generator().manual_seed(SEEDS[0]))


def _shuffled_reference(encoder_factory, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Keys of each process's own rows when process r encodes gathered rows perm[r*b:(r+1)*b]."""
    x_all, perm = _gathered(x), _rank0_perm()
    with torch.no_grad():  # a fresh encoder per process: one forward on its slice of the permuted batch
        chunks = [encoder_factory()(x_all[perm[r * B_LOCAL : (r + 1) * B_LOCAL]]) for r in range(WORLD)]
    keys_all = torch.empty_like(torch.cat(chunks))
    keys_all[perm] = torch.cat(chunks)  # row j of the permuted batch is gathered row perm[j]
    return {r: keys_all[r * B_LOCAL : (r + 1) * B_LOCAL] for r in range(WORLD)}


def test_every_process_uses_rank0s_permutation_and_gets_a_slice_of_the_gathered_batch(two_process):
    data, out = two_process
    perm = _rank0_perm()
    x_all = _gathered(data["x"])
    for r in range(WORLD):
        assert torch.equal(out[r]["perm"], perm)  # broadcast from rank 0, though each rank drew its own
        assert torch.equal(out[r]["lin_shuffled_in"], x_all[perm[r * B_LOCAL : (r + 1) * B_LOCAL]])
    # the shuffle actually moved images between processes
    own = [set(range(r * B_LOCAL, (r + 1) * B_LOCAL)) for r in range(WORLD)]
    assert any(set(perm[r * B_LOCAL : (r + 1) * B_LOCAL].tolist()) != own[r] for r in range(WORLD))


def test_unshuffle_gives_each_process_the_keys_of_its_own_images(two_process):
    """Without BatchNorm the encoder is row-wise, so shuffled-then-unshuffled keys equal the plain ones."""
    _, out = two_process
    for r in range(WORLD):
        torch.testing.assert_close(out[r]["lin_keys"], out[r]["lin_plain"], rtol=1e-12, atol=1e-12)


def test_shuffle_bn_keys_mix_processes_and_match_a_hand_applied_permutation(two_process):
    data, out = two_process
    ref = _shuffled_reference(_bn_net, data["x"])
    for r in range(WORLD):
        # BatchNorm statistics now come from images of both processes: the keys change
        assert not torch.allclose(out[r]["bn_keys"], out[r]["bn_plain"], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(out[r]["bn_keys"], ref[r], rtol=1e-12, atol=1e-12)


def test_moco_task_keys_are_computed_on_the_shuffled_batch(two_process):
    data, out = two_process
    task = _task()
    task._momentum_update()  # the task updates its key encoder before computing the keys
    key_encoder = task.key_encoder

    ref = _shuffled_reference(lambda: lambda x: copy.deepcopy(key_encoder)([x]), data["g0"])
    for r in range(WORLD):
        with torch.no_grad():
            plain = copy.deepcopy(key_encoder)([data["g0"][r::WORLD]])
        assert not torch.allclose(out[r]["task_keys"], plain, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(out[r]["task_keys"], ref[r], rtol=1e-12, atol=1e-12)


def test_one_process_does_not_shuffle_or_draw():
    x = torch.randn(5, 3)
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    xs, perm = dist_utils.batch_shuffle(x, gen)
    assert xs is x and torch.equal(perm, torch.arange(5))
    assert torch.equal(gen.get_state(), state)
    y = torch.randn(5, 2)
    assert dist_utils.batch_unshuffle(y, perm) is y

    task = _task()
    task.reseed(7)
    views = [torch.randn(4, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    task(views, 0.0)
    reference = _task()
    with torch.no_grad():
        reference._momentum_update()
        keys = reference.key_encoder(views[:1])
    assert torch.equal(task.loss.keys, keys)  # bitwise: the keys of the unshuffled batch
