"""The GPU path, checked on a CPU: teacher precision and work, host syncs, the precision probe, DDP distill."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import test_device as DV  # fake-CUDA / meta helpers and tiny tasks
import test_distill as D  # tiny official-layout teacher files
import test_engine as E  # the 2-process gloo set-up
import torch

import robkit.teachers as teachers
from robkit.engine import precision as P
from robkit.engine.bn import precise_bn
from robkit.engine.build import build_rob_task, distill, resolve_config
from robkit.engine.tasks import RoBTask
from robkit.models.students import build_student
from robkit.objectives.mocov2 import MoCoV2Loss
from robkit.objectives.swav import SwAVLoss
from robkit.utils.errors import RecipeError


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")


def _rob_task(tmp_path, family="dino", student="mobilenet_v3_small", rob=None) -> RoBTask:
    torch.manual_seed(0)
    t = teachers.load(str(D.LAYOUTS[family](tmp_path)))
    ov = {**DV.TINY, "rob": {**DV.TINY["rob"], **(rob or {})}}
    cfg = resolve_config("rob", student, f"rob-{family}", ov, small_images=True)
    return build_rob_task(t, family, build_student(student), cfg, channels_last=False)


def _views(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]


# ------------------------------------------------------------------ teacher precision
def test_bf16_teacher_targets_stay_close_to_fp32(tmp_path):
    """RoB's targets softmax(logits / 0.07) computed under bf16 drift from fp32 by a bounded amount."""
    fp32 = _rob_task(tmp_path, rob={"teacher_precision": "fp32"})
    bf16 = _rob_task(tmp_path, rob={"teacher_precision": "bf16"})
    bf16.frozen_teacher.load_state_dict(fp32.frozen_teacher.state_dict())
    views = _views(n=16)
    a, b = fp32.teacher_targets(views), bf16.teacher_targets(views)
    assert a.logits.dtype == torch.float32 and b.logits.dtype == torch.bfloat16
    pa = torch.softmax(a.logits.float() / 0.07, -1)
    pb = torch.softmax(b.logits.float() / 0.07, -1)
    tv = 0.5 * (pa - pb).abs().sum(-1)  # total variation distance per image
    assert tv.max() > 0  # bf16 really ran
    assert tv.max() < 0.05, tv
    kl = (pa * (pa.clamp_min(1e-12).log() - pb.clamp_min(1e-12).log())).sum(-1)
    assert kl.max() < 5e-3, kl
    assert (pa.argmax(-1) == pb.argmax(-1)).float().mean() >= 0.9


def test_teacher_precision_overrides_the_engine_autocast(tmp_path):
    task = _rob_task(tmp_path, rob={"teacher_precision": "fp32"})
    auto = _rob_task(tmp_path, rob={"teacher_precision": "auto"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert task.teacher_targets(_views()).logits.dtype == torch.float32
        # auto on a CPU follows the engine's autocast
        assert auto.teacher_targets(_views()).logits.dtype == torch.bfloat16
    assert auto.teacher_targets(_views()).logits.dtype == torch.float32


def test_an_unknown_teacher_precision_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="teacher_precision must be one of auto, fp32, bf16, fp16.*'half'"):
        _rob_task(tmp_path, rob={"teacher_precision": "half"})
    with pytest.raises(RecipeError, match="fp16 needs a CUDA device"):
        _rob_task(tmp_path, rob={"teacher_precision": "fp16"}).teacher_targets(_views())


# ------------------------------------------------------------------ teacher work
def test_ibot_patch_logits_only_for_students_that_use_them(tmp_path):
    cnn = _rob_task(tmp_path, "ibot", "mobilenet_v3_small")
    vit = _rob_task(tmp_path, "ibot", "vit_tiny", rob={"teacher_resolution": 32})
    views = _views()
    out = cnn.teacher_targets(views)
    assert out.patch_logits is None
    x = torch.cat(views)
    full = cnn.frozen_teacher(torch.nn.functional.interpolate(x, size=32) if x.shape[-1] != 32 else x)
    assert full.patch_logits is not None  # the teacher can compute them ...
    torch.testing.assert_close(
        out.logits, full.logits, rtol=1e-5, atol=1e-6
    )  # ... the CLS logits are the same
    assert vit.use_masks and vit.teacher_targets(views).patch_logits is not None


def test_the_teacher_can_run_compiled(tmp_path):
    plain = _rob_task(tmp_path)
    compiled = _rob_task(tmp_path, rob={"teacher_compile": True})
    assert compiled.compile_teacher and not plain.compile_teacher
    compiled.compile_backend = "eager"  # dynamo's graph capture without a C++ tool chain
    compiled.frozen_teacher.load_state_dict(plain.frozen_teacher.state_dict())
    views = _views()
    a, b = plain.teacher_targets(views), compiled.teacher_targets(views)
    assert compiled._compiled_teacher is not None
    torch.testing.assert_close(a.logits, b.logits)


# ------------------------------------------------------------------ host syncs
class _CountDeviceReads(DV._Answers):
    """Counts reads of a device tensor's value (``.item()``, ``float()``, ``bool()``) on ``meta``."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            self.reads.append(str(func))
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("kind", DV.KINDS)
def test_a_training_step_never_waits_for_the_device(tmp_path, kind):
    """A full trainer step on ``meta`` reads no device value: the loss, its parts, the queue pointer
    and SwAV's queue state stay on the device (the trainer reads them once per sync window).
    """
    task, cfg = DV._task(kind, tmp_path)
    if kind == "swav":  # the queue on from the first step
        task.loss.queue_length, task.loss.queue_start_epoch = 8, 0
        task.loss.queue = torch.zeros(len(task.loss.crops_for_assign), 8, task.loss.embed_dim)
    trainer = DV._meta_trainer(task, cfg, tmp_path)
    imgs, hw = DV._batch()
    counter = _CountDeviceReads()
    with counter:
        trainer._build()
        for _ in range(2):
            loss, parts = trainer._step(imgs, hw, 0, 0, None)
    assert loss.device.type == "meta"
    assert counter.reads == [], f"{len(counter.reads)} host syncs in a {kind} step"


def test_moco_queue_pointer_is_restored_from_the_buffer_after_a_load():
    loss = MoCoV2Loss(dim=4, queue_size=8, n_local=0)
    loss(torch.randn(2, 4), torch.randn(2, 4))
    assert int(loss.queue_ptr) == 2
    again = MoCoV2Loss(dim=4, queue_size=8, n_local=0)
    again.load_state_dict(loss.state_dict())
    keys = torch.randn(2, 4)
    _, parts = again(torch.randn(2, 4), keys)
    torch.testing.assert_close(again.queue[:, 2:4], torch.nn.functional.normalize(keys, dim=1).t())
    assert parts["queue_ptr"] == 4.0 and int(again.queue_ptr) == 4


def test_swav_queue_state_is_restored_from_the_buffer_after_a_load():
    kw = {
        "n_prototypes": 6,
        "embed_dim": 4,
        "n_global": 2,
        "n_local": 0,
        "queue_length": 4,
        "queue_start_epoch": 0,
    }
    protos = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)

    def step(loss):
        emb = torch.nn.functional.normalize(torch.randn(4, 4), dim=1)
        return loss(emb, emb @ protos.t(), protos, 0)[1]["queue_used"]

    a = SwAVLoss(**kw)
    assert [step(a) for _ in range(3)] == [0.0, 0.0, 1.0]  # 2 rows per step: full after two steps
    b = SwAVLoss(**kw)
    b.load_state_dict(a.state_dict())
    assert step(b) == 1.0
    c = SwAVLoss(**kw)
    c.load_state_dict(SwAVLoss(**kw).state_dict())  # an empty queue
    assert step(c) == 0.0


def test_windowed_loss_reads_log_the_same_rows(tmp_path, monkeypatch):
    """Reading the loss every 3 steps gives the rows and weights of reading it every step."""
    import csv

    from robkit.engine import trainer as T

    monkeypatch.setattr(T.Trainer, "_sync_every", lambda self: 3)
    _, windowed = E._run(tmp_path, "w")
    monkeypatch.setattr(T.Trainer, "_sync_every", lambda self: 1)
    _, every = E._run(tmp_path, "e")

    def rows(run):
        with open(run / "metrics.csv", newline="") as f:
            return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]

    assert rows(windowed) == rows(every) and len(rows(every)) == 8
    a, b = E._weights(windowed), E._weights(every)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_inside_a_window_is_caught_before_the_next_checkpoint(tmp_path, monkeypatch):
    from robkit.engine import trainer as T

    monkeypatch.setattr(T.Trainer, "_sync_every", lambda self: 4)
    ov = {**E.TINY, "optim": {"warmup_epochs": 0, "base_lr": 1e30, "name": "sgd"}}
    with pytest.raises(T.TrainingDiverged, match="at epoch 0, step [1-4]\\."):
        E._run(tmp_path, "nan", overrides=ov, engine={"checkpoint_every_steps": 2})
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()  # no checkpoint of a NaN state


# ------------------------------------------------------------------ precision probe
def test_auto_precision_probes_once_and_caches_the_faster(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: True)
    online = build_student("mobilenet_v3_small")
    before = {k: v.clone() for k, v in online.state_dict().items()}
    calls = []

    def fake_probe(net, crops, batch, channels_last, bf16_channels_last):
        calls.append(list(crops))
        assert not bf16_channels_last  # a MobileNet's bf16 leg is timed as it would train
        return {"fp32": 0.02, "bf16": 0.01}

    monkeypatch.setattr(P, "probe_cpu_precision", fake_probe)
    cpu = torch.device("cpu")
    choice, how = P.choose_precision("auto", cpu, online, "mobilenet_v3_small", [32, 32, 16])
    assert choice == "bf16" and not how["cached"] and calls == [[32, 32, 16]]
    stored = json.loads((Path(os.environ["ROBKIT_HOME"]) / "precision.json").read_text())
    (record,) = stored.values()
    assert (
        record["choice"] == "bf16"
        and record["probe"] == P.PROBE_VERSION  # a changed probe method does not reuse old choices
        and record["cpu"] == P.cpu_name()
        and record["student"] == "mobilenet_v3_small"
    )
    again, how = P.choose_precision("auto", cpu, online, "mobilenet_v3_small", [32, 32, 16])
    assert again == "bf16" and how["cached"] and len(calls) == 1  # no second probe
    other, _ = P.choose_precision("auto", cpu, online, "mobilenet_v3_small", [64, 64])
    assert len(calls) == 2  # other crop sizes are another key
    monkeypatch.setattr(P, "probe_cpu_precision", lambda *a, **k: {"fp32": 0.01, "bf16": 0.02})
    assert P.choose_precision("auto", cpu, online, "resnet18", [32])[0] == "fp32"
    assert P.choose_precision("bf16", cpu, online, "resnet18", [32]) == ("bf16", {"rule": "named"})
    assert all(torch.equal(before[k], v) for k, v in online.state_dict().items())


def test_the_real_probe_times_both_and_leaves_the_network_untouched():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.random.get_rng_state()
    wrapped = _ListInput(net)
    t = P.probe_cpu_precision(wrapped, [8, 8], batch=2, rounds=1)
    assert t["fp32"] > 0 and t["bf16"] > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())


class _LayoutRecorder(torch.nn.Module):
    """A conv that records, per probe leg, whether its weight and its input were channels_last
    (in a class attribute: the probe times deep copies)."""

    seen: set = set()

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        cl = torch.channels_last
        leg = "bf16" if torch.is_autocast_enabled("cpu") else "fp32"
        self.seen.add(
            (leg, self.conv.weight.is_contiguous(memory_format=cl), x.is_contiguous(memory_format=cl))
        )
        return self.conv(x).mean((2, 3))


def test_each_probe_leg_runs_in_the_layout_its_run_would_train_in():
    """fp32 in channels_last against bf16 contiguous (a MobileNet's bf16 run): a contiguous network fed
    channels_last inputs timed neither, and once made a MobileNet SwAV run pick bf16 at a third of the speed."""
    from robkit.engine.tasks.base import Online

    _LayoutRecorder.seen.clear()
    online = Online(_LayoutRecorder(), torch.nn.Identity(), channels_last=True)
    P.probe_cpu_precision(online, [8, 8], batch=2, channels_last=True, bf16_channels_last=False, rounds=1)
    assert _LayoutRecorder.seen == {("fp32", True, True), ("bf16", False, False)}
    assert online.channels_last and online.student.conv.weight.is_contiguous()  # the caller's net untouched


def test_bf16_needs_a_clear_lead_over_fp32(monkeypatch):
    """A tie within a short probe's noise stays fp32; a 5 % lead or more picks bf16."""
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: True)
    net = torch.nn.Linear(2, 2)
    for fp32, want in ((0.0102, "fp32"), (0.0106, "bf16")):
        monkeypatch.setattr(P, "probe_cpu_precision", lambda *a, t=fp32, **k: {"fp32": t, "bf16": 0.01})
        assert P.choose_precision("auto", torch.device("cpu"), net, f"x{fp32}", [8])[0] == want


class _ListInput(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, views):
        return self.net(torch.cat(views))


def test_without_native_bf16_auto_is_fp32_without_a_probe(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(P, "probe_cpu_precision", lambda *a, **k: pytest.fail("probed"))
    assert P.choose_precision("auto", torch.device("cpu"), torch.nn.Linear(2, 2), "x", [8])[0] == "fp32"


def test_an_auto_run_resumes_with_its_stored_choice(tmp_path, monkeypatch):
    """A run whose probe chose bf16 resumes in bf16 even when a new probe would choose fp32."""
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(P, "probe_cpu_precision", lambda *a, **k: {"fp32": 0.02, "bf16": 0.01})
    ov = {**E.TINY, "train": {**E.TINY["train"], "precision": "auto"}}
    E._run(tmp_path, "r", overrides=ov, engine={"max_steps": 3})
    (tmp_path / "home" / "precision.json").unlink()
    monkeypatch.setattr(P, "probe_cpu_precision", lambda *a, **k: {"fp32": 0.01, "bf16": 0.02})
    metrics, _ = E._run(tmp_path, "r", overrides=ov, resume=True)
    assert metrics["finished"] and metrics["precision"] == "bf16"
    assert metrics["channels_last"] is False  # a bf16 MobileNet on CPU trains contiguous


def test_channels_last_is_refused_only_for_cpu_bf16_depthwise_networks():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    mobile, resnet = build_student("mobilenet_v3_small"), build_student("resnet18")
    allowed, why = P.channels_last_allowed(True, "bf16", cpu, mobile)
    assert not allowed and "depthwise" in why
    assert P.channels_last_allowed(True, "fp32", cpu, mobile) == (True, None)
    assert P.channels_last_allowed(True, "bf16", cuda, mobile) == (True, None)
    assert P.channels_last_allowed(True, "bf16", cpu, resnet) == (True, None)
    assert P.channels_last_allowed(False, "fp32", cpu, resnet) == (False, None)


@pytest.mark.parametrize(
    ("student", "precision", "expect"),
    [
        ("mobilenet_v3_small", "bf16", False),
        ("mobilenet_v3_small", "fp32", True),
        ("resnet18", "bf16", True),
    ],
)
def test_the_trainer_trains_in_the_layout_the_rule_allows(tmp_path, monkeypatch, student, precision, expect):
    """The online network and its EMA teacher both run in the layout the rule allows."""
    from robkit.engine.tasks import Online

    seen = []
    features = Online.features

    def spy(self, views):
        seen.append((self.channels_last, next(self.student.parameters()).requires_grad))
        return features(self, views)

    monkeypatch.setattr(Online, "features", spy)
    ov = {**E.TINY, "train": {**E.TINY["train"], "epochs": 1, "precision": precision}}
    metrics, _ = E._run(tmp_path, "l", student=student, overrides=ov, engine={"max_steps": 1})
    assert metrics["channels_last"] is expect
    assert {flag for flag, _ in seen} == {expect} and {grad for _, grad in seen} == {True, False}


# ------------------------------------------------------------------ devices
def test_export_calibration_on_fake_cuda():
    """Precise BatchNorm (the export's and evaluation's re-estimate) runs where the model lives."""
    model = build_student("mobilenet_v3_small")
    imgs = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    with DV.fake_cuda():
        model.to("cuda")
        net = precise_bn(model, imgs, 32, (0.5,) * 3, (0.25,) * 3, batch_size=2)
        bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert bn.running_mean.device.type == "cuda"


# ------------------------------------------------------------------ DDP distill
def _ddp_distill_worker(rank, world, port, out, teacher):
    E.init_gloo(rank, world, port)
    try:
        distill(teacher, student="vit_tiny", data_limit=64, out=Path(out) / "ddp", overrides=_DDP, **_ENGINE)
    finally:
        torch.distributed.destroy_process_group()


_DDP = {**D.TINY, "views": {"n_local": 2, "global_size_px": 32, "local_size_px": 16}}
_ENGINE = {**D.ENGINE, "precise_bn_images": 0}


def test_two_process_gloo_distill_matches_one_process(tmp_path):
    """Each rank runs its own frozen teacher copy on its rows; the student ends as on one process."""
    torch.set_num_threads(1)
    teacher = str(D._dino_file(tmp_path))
    distill(teacher, student="vit_tiny", data_limit=64, out=tmp_path / "single", overrides=_DDP, **_ENGINE)
    port = E._free_port()
    torch.multiprocessing.spawn(
        _ddp_distill_worker, args=(2, port, str(tmp_path), teacher), nprocs=2, join=True
    )
    a, b = E._weights(tmp_path / "single"), E._weights(tmp_path / "ddp")
    assert a.keys() == b.keys() and not any("teacher" in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), f"{k} differs between DDP and one process"
