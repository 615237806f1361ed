"""Resume continues bitwise or refuses, naming every difference; --init starts a new run from weights.

A "killed" run is stopped by an exception inside a random step (as a SIGKILL would stop it: no clean
end-of-run checkpoint, only the periodic one of the last finished step), then resumed with the same
command and compared with an uninterrupted run, weights and optimiser state bit for bit.
"""

from __future__ import annotations

import random

import pytest
import test_distill as D  # tiny official-layout teacher files
import test_teacher_cache as C
import torch
import yaml

from robkit.engine.build import distill, pretrain
from robkit.engine.teacher_cache import CacheForm
from robkit.engine.trainer import Trainer
from robkit.models.checkpoint import load_student, safe_load
from robkit.utils.errors import ResumeMismatch

DINO = {
    "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "use_bn": False},
    "views": {"n_local": 2, "global_size_px": 16, "local_size_px": 8},
    "train": {"epochs": 2, "batch_size": 16, "precision": "fp32"},
    "optim": {"warmup_epochs": 1},
}
OVERRIDES = {
    "dino": DINO,
    "swav": {
        **DINO,
        "head": {"hidden_dim": 32, "out_dim": 16, "n_prototypes": 24},
        "loss": {"queue_length": 0},
    },
    "mocov2": {**DINO, "head": {"hidden_dim": 32, "out_dim": 16}, "loss": {"queue_size": 64}},
}
ENGINE = {"progress": False, "tensorboard": False, "checkpoint_every_steps": 1, "precise_bn_images": 0}
STEPS = 8  # 64 images / 16 per step x 2 epochs


class Killed(Exception):
    pass


_offline = C._offline  # the same autouse fixture: offline, a private ROBKIT_HOME, one process


def _kill_at(monkeypatch, step: int) -> None:
    """Make the trainer die inside global step ``step`` (0-based), after its forward pass began."""
    original = Trainer._step

    def dying(self, imgs, hw, epoch, gstep, amp, *rest):
        if gstep == step:
            raise Killed(f"killed in step {gstep}")
        return original(self, imgs, hw, epoch, gstep, amp, *rest)

    monkeypatch.setattr(Trainer, "_step", dying)


def _state(run):
    st = safe_load(run / "checkpoint.pt")["train_state"]
    return st["task"], st["optimizer"]["state"]


def _assert_same_state(a_run, b_run):
    (ta, oa), (tb, ob) = _state(a_run), _state(b_run)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs after resume"
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), f"optimizer {i}.{k}"


def _pretrain(tmp, name, method, **kw):
    return pretrain(
        method=method,
        student="mobilenet_v3_small",
        recipe="sslight",
        data="fashion-mnist",
        data_limit=64,
        out=tmp / name,
        overrides=kw.pop("overrides", OVERRIDES[method]),
        **{**ENGINE, **kw},
    )


@pytest.mark.parametrize("method", ["dino", "swav", "mocov2"])
def test_pretrain_killed_at_a_random_step_resumes_bitwise(tmp_path, monkeypatch, method):
    kill = random.Random(f"resume-{method}").randrange(1, STEPS)  # inside epoch 0 or 1
    full, full_dir = _pretrain(tmp_path, "full", method)
    assert full["global_step"] == STEPS
    with monkeypatch.context() as m:
        _kill_at(m, kill)
        with pytest.raises(Killed):
            _pretrain(tmp_path, "part", method)
    prog = safe_load(tmp_path / "part" / "checkpoint.pt")["progress"]
    assert prog["global_step"] == kill and not prog["finished"]  # the last finished step, nothing more
    resumed, part_dir = _pretrain(tmp_path, "part", method, resume=True)
    assert resumed["finished"] and resumed["global_step"] == STEPS
    _assert_same_state(full_dir, part_dir)


def _distill(tmp, teacher, name, **kw):
    return distill(
        str(teacher),
        student="mobilenet_v3_small",
        data_limit=C.LIMIT,
        out=tmp / name,
        overrides=kw.pop("overrides", {**C.TINY, "train": {**C.TINY["train"], "epochs": 2}}),
        **{**ENGINE, **kw},
    )


@pytest.mark.parametrize("cached", [False, True], ids=["online", "cached"])
def test_distill_killed_at_a_random_step_resumes_bitwise(tmp_path, monkeypatch, cached):
    teacher = D._dino_file(tmp_path)
    kw = {}
    if cached:
        C._build(teacher, tmp_path / "cache", CacheForm(dtype="float32"), epochs=2)
        kw["teacher_cache"] = tmp_path / "cache"
    steps = 2 * (C.LIMIT // 16)
    kill = random.Random(f"distill-{cached}").randrange(1, steps)
    _, full_dir = _distill(tmp_path, teacher, "full", **kw)
    with monkeypatch.context() as m:
        _kill_at(m, kill)
        with pytest.raises(Killed):
            _distill(tmp_path, teacher, "part", **kw)
    assert safe_load(tmp_path / "part" / "checkpoint.pt")["progress"]["global_step"] == kill
    resumed, part_dir = _distill(tmp_path, teacher, "part", resume=True, **kw)
    assert resumed["finished"] and resumed["global_step"] == steps
    _assert_same_state(full_dir, part_dir)


def test_resume_refuses_every_changed_setting_and_leaves_the_run_untouched(tmp_path):
    _, run = _pretrain(tmp_path, "r", "dino", max_steps=3)
    config_before = (run / "config.yaml").read_bytes()
    ckpt_before = (run / "checkpoint.pt").read_bytes()
    changed = {
        **DINO,
        "optim": {**DINO["optim"], "base_lr": 0.1},
        "train": {**DINO["train"], "batch_size": 32, "epochs": 3},
    }
    with pytest.raises(ResumeMismatch) as e:
        _pretrain(tmp_path, "r", "dino", overrides=changed, seed=1, resume=True)
    msg = str(e.value)
    for needle in ("optim.base_lr", "batch_size", "epochs", "seed", "--init"):
        assert needle in msg, f"{needle!r} not named in: {msg}"
    # nothing in the run folder changed: config.yaml and the checkpoint are as the first run left them
    assert (run / "config.yaml").read_bytes() == config_before
    assert (run / "checkpoint.pt").read_bytes() == ckpt_before
    # other data (a different slice) is refused too
    with pytest.raises(ResumeMismatch, match="data"):
        pretrain(
            method="dino",
            student="mobilenet_v3_small",
            recipe="sslight",
            data="fashion-mnist",
            data_limit=80,
            out=run,
            overrides=DINO,
            resume=True,
            **ENGINE,
        )
    # the same command continues
    metrics, _ = _pretrain(tmp_path, "r", "dino", resume=True)
    assert metrics["finished"]


def test_resume_refuses_another_teacher(tmp_path):
    a = D._dino_file(tmp_path)
    ckpt = safe_load(a)  # same layout, one weight changed: another file, another sha256
    key = next(k for k, v in ckpt["teacher"].items() if v.is_floating_point())
    ckpt["teacher"][key] = ckpt["teacher"][key] + 1e-3
    b = tmp_path / "b" / a.name
    b.parent.mkdir()
    torch.save(ckpt, b)
    _distill(tmp_path, a, "run", max_steps=1)
    with pytest.raises(ResumeMismatch, match="teacher_sha256"):
        _distill(tmp_path, b, "run", resume=True)


def test_resume_without_a_run_says_what_to_do(tmp_path):
    with pytest.raises(ResumeMismatch, match="no checkpoint"):
        _pretrain(tmp_path, "none", "dino", resume=True)


def test_gradscaler_state_is_saved_and_restored(tmp_path, monkeypatch):
    # fp16 (the only precision with a loss scaler) needs CUDA; a CPU scaler exercises the same code path.
    original = Trainer._build

    def with_scaler(self):
        original(self)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)

    monkeypatch.setattr(Trainer, "_build", with_scaler)
    _, full = _pretrain(tmp_path, "full", "dino")
    with monkeypatch.context() as m:
        _kill_at(m, 3)
        with pytest.raises(Killed):
            _pretrain(tmp_path, "part", "dino")
    stored = safe_load(tmp_path / "part" / "checkpoint.pt")["train_state"]["scaler"]
    assert stored["scale"] == 2.0**11  # grown once after 2 good steps: the state really is the live one
    _, part = _pretrain(tmp_path, "part", "dino", resume=True)
    a, b = (safe_load(r / "checkpoint.pt")["train_state"]["scaler"] for r in (full, part))
    assert a == b and a["scale"] == 2.0**14  # 8 steps, growth every 2
    _assert_same_state(full, part)


def test_init_starts_a_new_run_from_the_student_weights(tmp_path):
    _, src = _pretrain(tmp_path, "src", "dino", max_steps=2)
    src_student, _ = load_student(src / "checkpoint.pt")
    # one step of zero learning rate: the new run's backbone must still be the source's weights
    frozen = {**DINO, "optim": {**DINO["optim"], "base_lr": 0.0, "warmup_epochs": 0, "min_lr": 0.0}}
    metrics, new = _pretrain(
        tmp_path,
        "new",
        "dino",
        overrides=frozen,
        init=src / "checkpoint.pt",
        max_steps=1,
        precise_bn_images=0,
    )
    assert metrics["global_step"] == 1  # a fresh schedule, not the source's step count
    ckpt = safe_load(new / "checkpoint.pt")
    assert ckpt["init"]["path"] == str(src / "checkpoint.pt") and len(ckpt["init"]["sha256"]) == 64
    for k, v in src_student.backbone.state_dict().items():
        if "running" in k or "num_batches" in k:
            continue  # BatchNorm statistics move in train mode even at lr 0
        assert torch.equal(ckpt["backbone"][k], v), k
    # another student is refused with the arch named
    with pytest.raises(Exception, match="mobilenet_v3_small"):
        pretrain(
            method="dino",
            student="resnet18",
            recipe="sslight",
            data_limit=64,
            out=tmp_path / "other",
            overrides=DINO,
            init=src / "checkpoint.pt",
            **ENGINE,
        )


def test_config_yaml_records_the_resolved_recipe(tmp_path):
    _, run = _pretrain(tmp_path, "r", "dino", max_steps=1)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["warmup_epochs"] == 1 and cfg["views"]["global_size_px"] == 16
