"""Cached teacher targets: exact replay of the online RoB step, resume, sharding and refusals."""

from __future__ import annotations

import csv
import json

import pytest
import test_distill as D  # tiny official-layout teacher files
import torch
from click.testing import CliRunner

import robkit.teachers as teachers
from robkit.data.datasets import fashion_mnist
from robkit.data.views import MultiCropViews
from robkit.engine.build import build_rob_task, build_views, distill, resolve_run_config
from robkit.engine.teacher_cache import CacheForm, CacheMismatch, build_cache, open_cache
from robkit.models.checkpoint import safe_load
from robkit.models.students import build_student

TINY = {**D.TINY, "train": {**D.TINY["train"], "channels_last": False}}
ENGINE = {**D.ENGINE, "precise_bn_images": 0}
LIMIT = 32  # 2 steps of 16 per epoch


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _build(path, out, form=None, epochs=1, **kw):
    kw = {"data_limit": LIMIT, "overrides": TINY, "progress": False, "shard_steps": 1, **kw}
    return build_cache(str(path), out, epochs, form=form, **kw)


def _losses(run):
    with open(run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _live_views(seed, epoch, step, steps_per_epoch, batch, cfg):
    """The trainer's views of one step, drawn here from first principles (not through the cache)."""
    from robkit.engine.trainer import _mix_seed

    views = build_views(cfg.views)
    ds = fashion_mnist("train", limit=LIMIT)
    g = torch.Generator().manual_seed(_mix_seed(seed, epoch, 17))
    idx = torch.randperm(len(ds), generator=g)[: steps_per_epoch * batch].view(-1, batch)[step]
    imgs = ds.images[idx].expand(-1, 3, -1, -1)
    g = torch.Generator().manual_seed(_mix_seed(seed, epoch * steps_per_epoch + step, 29))
    hw = torch.full((batch, 2), imgs.shape[-1])
    return views.render(imgs, views.sample(hw, g))


@pytest.mark.parametrize("form", [CacheForm("embedding"), CacheForm("topk", k=5)])
def test_cached_targets_equal_the_live_teacher(tmp_path, form):
    path = D._dino_file(tmp_path)
    t = teachers.load(str(path))
    cfg = resolve_run_config(
        "rob", "mobilenet_v3_small", "auto", TINY, fashion_mnist("train", limit=LIMIT), "dino"
    )
    _build(path, tmp_path / "cache", form)
    task = build_rob_task(t, "dino", build_student("mobilenet_v3_small"), cfg, channels_last=False)
    live = {s: task.teacher_targets(_live_views(0, 0, s, 2, 16, cfg)) for s in range(2)}  # before the drop
    src = open_cache(tmp_path / "cache", t, cfg, fashion_mnist("train", limit=LIMIT), seed=0)
    for s in range(2):
        out = src.targets(0, s, torch.arange(16), torch.device("cpu"))
        ref = live[s].logits
        if form.form == "embedding":  # the head runs on the fp16-rounded backbone output
            torch.testing.assert_close(out.logits, ref, rtol=2e-3, atol=2e-3)
            emb = src._get(0, s)[0]["targets"]["embedding"][0]
            assert emb.dtype == torch.float16 and emb.shape == (32, t.embed_dim)
        else:  # the k largest logits (fp16) at their prototypes, -inf elsewhere
            vals, idx = ref.topk(5, dim=-1)
            assert torch.equal(torch.isfinite(out.logits).sum(-1), torch.full((32,), 5))
            torch.testing.assert_close(out.logits.gather(1, idx), vals, rtol=1e-3, atol=1e-3)
    with pytest.raises(RuntimeError, match="not loaded in cached mode"):
        t(torch.zeros(1, 3, 32, 32))  # the backbone was dropped: distillation never pays for it


@pytest.mark.parametrize(("family", "student"), [("dino", "mobilenet_v3_small"), ("ibot", "vit_tiny")])
def test_distillation_from_the_cache_equals_the_online_run(tmp_path, family, student):
    path = D.LAYOUTS[family](tmp_path)
    # float32 storage: the cached run must be the online run, up to summation order
    summary = _build(path, tmp_path / "c32", CacheForm(dtype="float32"), student=student)
    assert summary["complete"] and summary["built"] == 2
    m = json.loads((tmp_path / "c32" / "manifest.json").read_text())
    assert m["form"]["patches"] is (family == "ibot")
    modes = {"online": None, "c32": tmp_path / "c32"}
    if family == "dino":  # the default fp16 embedding: within fp16 rounding of the online loss
        _build(path, tmp_path / "c16", student=student)
        modes["c16"] = tmp_path / "c16"
    runs = {}
    for mode, cache in modes.items():
        _, runs[mode] = distill(
            str(path),
            student=student,
            data_limit=LIMIT,
            out=tmp_path / mode,
            overrides=TINY,
            teacher_cache=cache,
            **ENGINE,
        )
    online, cached = torch.tensor(_losses(runs["online"])), torch.tensor(_losses(runs["c32"]))
    assert len(online) == 2
    torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-6)
    a, b = (safe_load(runs[k] / "checkpoint.pt")["backbone"] for k in ("online", "c32"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    if "c16" in runs:
        c16 = torch.tensor(_losses(runs["c16"]))
        torch.testing.assert_close(c16, online, rtol=1e-3, atol=1e-3)
        assert not torch.equal(c16, online)  # it really did use the rounded targets


def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(tmp_path):
    path = D._dino_file(tmp_path)
    first = _build(path, tmp_path / "c", epochs=2, max_shards=1)
    assert (first["built"], first["complete"]) == (1, False)
    cfg = resolve_run_config(
        "rob", "mobilenet_v3_small", "auto", TINY, fashion_mnist("train", limit=LIMIT), "dino"
    )
    with pytest.raises(CacheMismatch, match="has 0 complete epoch"):
        open_cache(tmp_path / "c", teachers.load(str(path)), cfg, fashion_mnist("train", limit=LIMIT), 0)
    second = _build(path, tmp_path / "c", epochs=2, max_shards=2)
    assert (second["built"], second["skipped"], second["complete"]) == (2, 1, False)
    # a corrupt shard (e.g. a disk error) is detected by its sha256 and rebuilt
    (tmp_path / "c" / "e000000-s000000.pt").write_bytes(b"garbage")
    third = _build(path, tmp_path / "c", epochs=2)
    assert (third["built"], third["skipped"], third["complete"]) == (2, 2, True)
    again = _build(path, tmp_path / "c", epochs=2)
    assert (again["built"], again["skipped"]) == (0, 4)
    _build(path, tmp_path / "ref", epochs=2)
    for f in sorted((tmp_path / "ref").glob("e*.pt")):
        x, y = safe_load(f), safe_load(tmp_path / "c" / f.name)
        assert torch.equal(x["targets"]["embedding"], y["targets"]["embedding"])
        assert all(torch.equal(x["params"][k], y["params"][k]) for k in x["params"])
        assert torch.equal(x["image_index"], y["image_index"])


def test_shards_split_over_torchrun_processes(tmp_path, monkeypatch):
    path = D._dino_file(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        done.append(_build(path, tmp_path / "c", epochs=2)["built"])
    assert done == [2, 2]  # 2 epochs x 2 shards (one step each) dealt round-robin
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert _build(path, tmp_path / "c", epochs=2)["skipped"] == 4


def test_a_mismatched_cache_is_refused(tmp_path):
    path = D._dino_file(tmp_path)
    _build(path, tmp_path / "c")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = D._dino_file(other_dir)
    sd = torch.load(other, weights_only=False)
    sd["teacher"]["backbone.cls_token"] += 1.0
    torch.save(sd, other)

    def run(p=path, **kw):
        ov = {**TINY, **kw.pop("ov", {})}
        return distill(
            str(p),
            out=tmp_path / "r",
            overrides=ov,
            teacher_cache=tmp_path / "c",
            **{"data_limit": LIMIT, **ENGINE, **kw},
        )

    with pytest.raises(CacheMismatch, match="another teacher sha256"):
        run(other)
    manifest = tmp_path / "c" / "manifest.json"
    current = manifest.read_text()
    manifest.write_text(json.dumps({**json.loads(current), "format": 1}))  # jitter order per crop
    with pytest.raises(CacheMismatch, match="another cache format: cache 1"):
        run()
    manifest.write_text(current)
    with pytest.raises(CacheMismatch, match="another recipe global views"):
        run(ov={"views": {**TINY["views"], "global_scale": [0.5, 1.0]}})
    with pytest.raises(CacheMismatch, match="another data set"):
        run(data_limit=48)
    with pytest.raises(CacheMismatch, match="another seed"):
        run(seed=1)
    with pytest.raises(CacheMismatch, match="another batch size"):
        run(ov={"train": {**TINY["train"], "batch_size": 8}})
    with pytest.raises(CacheMismatch, match="has 1 complete epoch.*asks for 3"):
        run(ov={"train": {**TINY["train"], "epochs": 3}})
    with pytest.raises(CacheMismatch, match="holds another cache"):
        _build(path, tmp_path / "c", CacheForm("topk", k=3))
    # local views are drawn live: changing them keeps the cache valid
    metrics, _ = run(ov={"views": {**TINY["views"], "n_local": 3}}, max_steps=1)
    assert metrics["global_step"] == 1


def test_cli_cache_then_distill(tmp_path):
    from robkit.cli import main

    path = D._dino_file(tmp_path)
    sets = ["--set", "views.n_local=2", "--set", "views.global_size_px=32", "--set", "views.local_size_px=16"]
    sets += ["--set", "rob.teacher_resolution=student", "--set", "optim.warmup_epochs=0"]
    sets += ["--set", "train.precision=fp32", "--set", "train.channels_last=false"]
    common = ["--teacher", str(path), "--epochs", "1", "--data-limit", "32", "--batch-size", "16", *sets]
    r = CliRunner().invoke(
        main,
        ["teachers", "cache", *common, "--out", str(tmp_path / "c"), "--form", "topk", "--topk", "4", "-q"],
    )
    assert r.exit_code == 0, r.output
    assert "MiB" in r.output and "complete" in r.output and "next: robkit distill" in r.output
    # the option reaches the cache check (a successful cached run is tested above)
    r = CliRunner().invoke(
        main,
        [
            "distill",
            *common,
            "--epochs",
            "2",
            "--teacher-cache",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "r2"),
        ],
    )
    assert r.exit_code != 0 and "asks for 2" in r.output


def test_views_of_the_sampler_are_drawn_globals_first():
    # The cache samples only the global crops; the trainer samples all crops from the same generator.
    v = MultiCropViews(n_global=2, n_local=3, global_size_px=32, local_size_px=16)
    hw = torch.full((4, 2), 28)
    full = v.sample(hw, torch.Generator().manual_seed(3))
    glob = v.sample(hw, torch.Generator().manual_seed(3), crops=range(2))
    for a, b in zip(glob.crops, full.crops[:2]):
        assert (
            torch.equal(a.boxes, b.boxes) and torch.equal(a.jitter, b.jitter) and torch.equal(a.gray, b.gray)
        )
