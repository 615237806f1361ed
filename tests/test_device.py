"""Device correctness on a machine without a GPU: fake CUDA tensors and the ``meta`` device.

A ``FakeTensorMode`` tensor has a device, a shape and a dtype but no data, so a CUDA step can be
run here: every operation checks its inputs' devices exactly as CUDA would, and a tensor a step
made on the host (statistics, masks, an index) meets a "cuda" tensor and raises
``FakeTensorDeviceMismatchError``.  Real tensors that reach the mode (a frozen teacher left out of
``task.to``) are turned into fake *CPU* tensors, so they raise too.

Two limits of this torch build shape the tests:

* the autograd engine asks the CUDA driver for a device context when a backward reaches a
  "cuda" tensor ("hasPrimaryContext expects a valid device index"), so on fake CUDA only the
  forward and the loss run; the full step (forward, loss, backward, optimiser step) runs on the
  ``meta`` device, which has no driver and raises "Tensor on device cpu is not on the expected
  device meta!" on the same mixing;
* neither kind of tensor holds values, so code that logs a float or branches on one (a loss's
  parts, the trainer's NaN guard, the sampler's blur radius) cannot run as is.  ``_Answers``
  answers those few data-dependent calls with fixed values (1 / True, every index for
  ``nonzero``); shapes and devices still propagate through everything else.
"""

from __future__ import annotations

import contextlib

import pytest
import test_distill as D  # tiny official-layout teacher files
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import robkit.teachers as teachers
from robkit.data.datasets import fashion_mnist
from robkit.engine.build import build_pretrain_task, build_rob_task, build_views, resolve_config
from robkit.engine.tasks import RoBTask, teacher_input
from robkit.engine.trainer import CheckpointMeta, Trainer, TrainOptions, step_generator
from robkit.evaluation.features import extract_features
from robkit.models.students import build_student

TINY = {**D.TINY, "train": {**D.TINY["train"], "batch_size": 4, "channels_last": False}}
BATCH = 4

aten = torch.ops.aten


class _Answers(TorchDispatchMode):
    """Fixed answers to the calls that need a tensor's values; everything else runs on."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:  # .item(), float(), bool()
            x = args[0]
            return True if x.dtype == torch.bool else (1.0 if x.is_floating_point() else 1)
        if func is aten.equal.default:
            return True
        if func is aten.nonzero.default:  # every element counts as non-zero
            x = args[0]
            flat, cols = torch.arange(x.numel(), device=x.device), []
            for size in reversed(x.shape):
                cols.append(flat % size)
                flat = flat // size
            return torch.stack(cols[::-1], 1)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda():
    """Fake tensors with ``device="cuda"`` work inside; real tensors reaching an op become fake CPU ones."""
    with FakeTensorMode(allow_non_fake_inputs=True), _Answers():
        yield


@contextlib.contextmanager
def on_meta():
    with _Answers():
        yield


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")


def _task(kind: str, tmp_path):
    torch.manual_seed(0)
    if kind in ("dino", "swav", "mocov2"):
        pre = {k: v for k, v in TINY.items() if k != "rob"}
        cfg = resolve_config(kind, "mobilenet_v3_small", "sslight", pre, small_images=True)
        return build_pretrain_task(kind, build_student("mobilenet_v3_small"), cfg, channels_last=False), cfg
    family, student = kind.split("-")[1:]  # rob-<teacher family>-<student>
    t = teachers.load(str(D.LAYOUTS[family](tmp_path)))
    overrides = TINY if family != "ibot" else {**TINY, "rob": {**TINY["rob"], "teacher_resolution": 32}}
    cfg = resolve_config("rob", student, f"rob-{family}", overrides, small_images=True)
    return build_rob_task(t, family, build_student(student), cfg, channels_last=False), cfg


def _batch():
    imgs = fashion_mnist("train", limit=BATCH).images.expand(-1, 3, -1, -1)
    return imgs, torch.full((BATCH, 2), imgs.shape[-1])


KINDS = ["dino", "swav", "mocov2", "rob-dino-mobilenet_v3_small", "rob-ibot-vit_tiny"]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_loss_on_fake_cuda(tmp_path, kind):
    task, cfg = _task(kind, tmp_path)
    views = build_views(cfg.views)
    imgs, hw = _batch()
    params = views.sample(hw, step_generator(0, 0))  # drawn on the host, as the trainer does
    task.train()
    with fake_cuda():
        task.to("cuda")
        if isinstance(task, RoBTask):
            assert all(p.device.type == "cuda" for p in task.frozen_teacher.parameters())
        rendered = views.render(imgs.to("cuda"), params)  # rendered where the model runs
        assert all(v.device.type == "cuda" for v in rendered)
        loss, _ = task(rendered, 0.0)
        assert loss.device.type == "cuda" and loss.dim() == 0


def _meta_trainer(task, cfg, tmp_path, target_source=None) -> Trainer:
    opts = TrainOptions(
        out_dir=tmp_path / "run",
        epochs=1,
        batch_size=BATCH,
        precision="fp32",
        precise_bn_images=0,
        channels_last=False,
        progress=False,
        tensorboard=False,
        device="meta",
    )
    meta = CheckpointMeta(
        kind="test", method=task.method, student={}, config=cfg.to_dict(), normalization={}, resolution=32
    )
    ds = fashion_mnist("train", limit=BATCH)
    return Trainer(task, build_views(cfg.views), ds, cfg.optim, cfg.ema, opts, meta, target_source)


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_training_step_on_meta(tmp_path, kind):
    """Forward, loss, backward and optimiser step of the trainer, with every tensor on ``meta``."""
    task, cfg = _task(kind, tmp_path)
    trainer = _meta_trainer(task, cfg, tmp_path)
    imgs, hw = _batch()
    with on_meta():
        trainer._build()
        loss, _ = trainer._step(imgs, hw, 0, 0, None)
    assert loss.device.type == "meta"
    assert all(p.device.type == "meta" for p in task.parameters())
    assert any(p.grad is not None and p.grad.device.type == "meta" for p in task.online.parameters())


def test_the_frozen_teacher_follows_the_task_but_stays_out_of_its_state_dict(tmp_path):
    task, _ = _task("rob-dino-mobilenet_v3_small", tmp_path)
    task.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in task.frozen_teacher.parameters())
    task.to("meta")
    assert all(p.device.type == "meta" for p in task.frozen_teacher.parameters())
    assert not any("teacher" in k for k in task.state_dict())
    assert not any(p is q for p in task.parameters() for q in task.frozen_teacher.parameters())


def test_cached_distillation_on_fake_cuda(tmp_path):
    from robkit.engine.build import resolve_run_config
    from robkit.engine.teacher_cache import build_cache, open_cache

    path = D._dino_file(tmp_path)
    ds = fashion_mnist("train", limit=BATCH)
    build_cache(
        str(path), tmp_path / "cache", 1, data_limit=BATCH, overrides=TINY, progress=False, shard_steps=1
    )
    t = teachers.load(str(path))
    cfg = resolve_run_config("rob", "mobilenet_v3_small", "auto", TINY, ds, "dino")
    task = build_rob_task(t, "dino", build_student("mobilenet_v3_small"), cfg, channels_last=False)
    src = open_cache(tmp_path / "cache", t, cfg, ds, seed=0)
    src._get(0, 0)  # the shard is read (and checked) on the host, before the fake tensors
    views = build_views(cfg.views)
    imgs, hw = _batch()
    params = views.sample(hw, step_generator(0, 0))
    src.replay_views(0, 0, params)
    task.train()
    with fake_cuda():
        task.to("cuda")
        t_out = src.targets(0, 0, torch.arange(BATCH), torch.device("cuda"))
        assert t_out.logits.device.type == "cuda"
        loss, _ = task(views.render(imgs.to("cuda"), params), 0.0, teacher_out=t_out)
        assert loss.device.type == "cuda"


def test_feature_extraction_on_fake_cuda():
    torch.manual_seed(0)
    model = build_student("mobilenet_v3_small")
    ds = fashion_mnist("test", limit=6)
    with fake_cuda():
        model.to("cuda")
        feats, labels = extract_features(
            model, ds, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), batch_size=4, progress=False
        )
    assert feats.shape == (6, model.embed_dim) and feats.device.type == "cpu"
    assert labels.shape == (6,)


def test_teacher_input_renormalises_on_the_views_device():
    class _Stats:  # SwAV's statistics differ from the student's: the re-normalisation runs
        mean, std, resolution = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225), 16

    with fake_cuda():
        x = teacher_input([torch.empty(2, 3, 32, 32, device="cuda")] * 2, (0.5,) * 3, (0.25,) * 3, _Stats())
        assert x.device.type == "cuda" and x.shape == (4, 3, 16, 16)
