"""The training engine: exact resume, DDP equivalence, NaN guard, checkpoints, corrupt images."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from robkit.engine.build import pretrain
from robkit.engine.trainer import TrainingDiverged
from robkit.models.checkpoint import load_student, safe_load

# A tiny DINO set-up on a 64-image slice of Fashion-MNIST: 4 steps of 16 images per epoch.
TINY = {
    "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "use_bn": False},
    "views": {"n_local": 2, "global_size_px": 16, "local_size_px": 8},
    "train": {"epochs": 2, "batch_size": 16, "precision": "fp32"},
    "optim": {"warmup_epochs": 1},
}


def _run(tmp, name, **kw):
    engine = {"progress": False, "tensorboard": False, "checkpoint_every_steps": 0}
    engine.update(kw.pop("engine", {}))
    ov = kw.pop("overrides", TINY)
    return pretrain(
        method=kw.pop("method", "dino"),
        student=kw.pop("student", "mobilenet_v3_small"),
        recipe="sslight",
        data="fashion-mnist",
        data_limit=64,
        out=tmp / name,
        overrides=ov,
        **kw,
        **engine,
    )


def _weights(run_dir):
    ckpt = safe_load(run_dir / "checkpoint.pt")
    return ckpt["train_state"]["task"]


@pytest.mark.parametrize("method", ["dino", "swav", "mocov2"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, method):
    ov = TINY
    if method == "swav":
        ov = {
            **TINY,
            "head": {"hidden_dim": 32, "out_dim": 16, "n_prototypes": 24},
            "loss": {"queue_length": 0},
        }
    if method == "mocov2":
        ov = {**TINY, "head": {"hidden_dim": 32, "out_dim": 16}, "loss": {"queue_size": 64}}
    full, full_dir = _run(tmp_path, "full", method=method, overrides=ov)
    assert full["finished"] and full["global_step"] == 8
    part, part_dir = _run(tmp_path, "part", method=method, overrides=ov, engine={"max_steps": 3})
    assert not part["finished"] and part["global_step"] == 3
    prog = safe_load(part_dir / "checkpoint.pt")["progress"]
    assert prog["global_step"] == 3 and prog["epoch"] == 0
    resumed, _ = _run(tmp_path, "part", method=method, overrides=ov, resume=True)
    assert resumed["finished"] and resumed["global_step"] == 8
    a, b = _weights(full_dir), _weights(part_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # the CSV log has one row per step, without duplicates from the interrupted part
    rows = (part_dir / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 8
    assert (part_dir / "curves.png").stat().st_size > 1000


def test_checkpoint_is_a_student_without_teacher_and_loads_weights_only(tmp_path):
    _, run = _run(tmp_path, "r", overrides={**TINY, "train": {**TINY["train"], "epochs": 1}})
    student, head, meta = load_student(run / "checkpoint.pt", with_head=True)
    assert meta["method"] == "dino" and meta["resolution"] == 16 and meta["teacher"] is None
    assert type(head).__name__ == "DINOHead"
    x = torch.randn(2, 3, 16, 16)
    assert student(x).shape == (2, student.embed_dim)
    # refuses to overwrite a run without --resume
    with pytest.raises(FileExistsError, match="--resume"):
        _run(tmp_path, "r")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    ov = {**TINY, "optim": {"warmup_epochs": 0, "base_lr": 1e30, "name": "sgd"}}
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        _run(tmp_path, "nan", overrides=ov, engine={"checkpoint_every_steps": 1})


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_skipped_and_counted(tmp_path, workers):
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (24 + i, 20), (i * 10, 100, 200 - i * 5)).save(root / "a" / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    metrics, _ = pretrain(
        method="dino",
        student="mobilenet_v3_small",
        recipe="sslight",
        data=str(root),
        out=tmp_path / "run",
        overrides={**TINY, "train": {**TINY["train"], "epochs": 2}},  # workers persist across epochs
        progress=False,
        tensorboard=False,
        num_workers=workers,
    )
    assert metrics["finished"]
    assert metrics["skipped_images"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a ``world``-process gloo group on this machine, as torchrun's environment would set it up."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _ddp_worker(rank, world, port, out, result):
    init_gloo(rank, world, port)
    try:
        from pathlib import Path

        _run(
            Path(out),
            "ddp",
            student="vit_tiny",
            overrides={
                **TINY,
                "train": {**TINY["train"], "epochs": 1},
                "views": {**TINY["views"], "global_size_px": 32, "local_size_px": 16},
            },
        )
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp_matches_one_process_on_the_same_global_batch(tmp_path):
    torch.set_num_threads(1)
    ov = {
        **TINY,
        "train": {**TINY["train"], "epochs": 1},
        "views": {**TINY["views"], "global_size_px": 32, "local_size_px": 16},
    }
    _, single = _run(tmp_path, "single", student="vit_tiny", overrides=ov)
    port = _free_port()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path), None), nprocs=2, join=True)
    a, b = _weights(single), _weights(tmp_path / "ddp")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), f"{k} differs between DDP and one process"


@pytest.mark.parametrize(
    "method,prefix", [("dino", "online.head.last_layer"), ("swav", "online.head.prototypes")]
)
def test_a_one_epoch_run_freezes_the_head_for_half_of_it_not_all(tmp_path, method, prefix):
    """The recipes freeze DINO's last layer / SwAV's prototypes for 1 epoch; in a 1-epoch run (4 steps)
    the freeze is capped at half the run, so the first 2 steps keep them and the last 2 train them
    (uncapped, all 4 would keep them)."""
    ov = {**TINY, "train": {**TINY["train"], "epochs": 1}, "optim": {"warmup_epochs": 0.25}}
    if method == "swav":
        ov = {**ov, "head": {"hidden_dim": 32, "out_dim": 16, "n_prototypes": 24}}

    def head(steps):
        _run(tmp_path, f"{method}{steps}", method=method, overrides=ov, engine={"max_steps": steps})
        w = _weights(tmp_path / f"{method}{steps}")
        return {k: v for k, v in w.items() if k.startswith(prefix)}

    def moved(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    # from step 1: SwAV's first step puts its prototypes on the sphere (re-normalising them later moves
    # them by rounding only); LARS steps are small, so "trained" is measured against that rounding
    one, two, four = head(1), head(2), head(4)
    assert one
    kept, trained = moved(one, two), moved(two, four)
    assert kept <= 1e-6, kept
    assert trained > 100 * max(kept, 1e-9), (kept, trained)


def test_fractional_freeze_of_the_last_layer_follows_the_step(tmp_path):
    """Short budgets freeze DINO's last layer for a fraction of an epoch: the engine passes
    fractional epochs, so with 4 steps per epoch and 0.5 epochs the first 2 steps keep it."""
    ov = {**TINY, "optim": {**TINY["optim"], "freeze_last_layer_epochs": 0.5}}

    def last_layer(steps):
        _run(tmp_path, f"s{steps}", overrides=ov, engine={"max_steps": steps})
        w = _weights(tmp_path / f"s{steps}")
        return {k: v for k, v in w.items() if k.startswith("online.head.last_layer")}

    start, two, three = last_layer(0), last_layer(2), last_layer(3)
    assert start and all(torch.equal(start[k], two[k]) for k in start)
    assert any(not torch.equal(two[k], three[k]) for k in two)
