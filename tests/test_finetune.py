"""`robkit finetune`: class-balanced labelled subsets, frozen vs full fine-tuning, exact resume, the
test accuracy of what ships, and the checkpoint exporting as a labelled classifier."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from export_helpers import MEAN, RES, STD, make_student, save_student_checkpoint

from robkit.data.datasets import fashion_mnist, select, stratified_sample
from robkit.evaluation.features import extract_features
from robkit.evaluation.finetune import FinetuneProtocol, finetune, parse_fraction
from robkit.evaluation.linear import load_probe
from robkit.models.checkpoint import load_student, safe_load
from robkit.utils.errors import RecipeError, ResumeMismatch

FAST = {"precision": "fp32", "progress": False, "tensorboard": False, "checkpoint_every_steps": 0}
FMNIST = list(fashion_mnist("test", limit=1).classes)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A robkit checkpoint of a MobileNetV3-Small (BatchNorm re-estimated on Fashion-MNIST) at 32 px."""
    return save_student_checkpoint(
        make_student("mobilenet_v3_small"),
        tmp_path_factory.mktemp("src") / "checkpoint.pt",
        kind="distill",
        method="rob",
        teacher={"name": "test-teacher"},
        seed=0,
    )


def test_stratified_fraction_keeps_every_class_in_proportion():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 7)[
        torch.randperm(157, generator=torch.Generator().manual_seed(3))
    ]
    idx = stratified_sample(labels, seed=0, fraction=0.1)
    assert idx.tolist() == sorted(set(idx.tolist()))  # sorted, no repeats
    assert torch.bincount(labels[idx]).tolist() == [10, 5, 1]  # round(0.7) -> 1: no class vanishes
    assert torch.equal(idx, stratified_sample(labels, seed=0, fraction=0.1))
    assert not torch.equal(idx, stratified_sample(labels, seed=1, fraction=0.1))
    shots = stratified_sample(labels, seed=0, shots=3, exclude=idx)
    assert torch.bincount(labels[shots]).tolist() == [3, 3, 3] and not set(shots.tolist()) & set(idx.tolist())
    with pytest.raises(ValueError, match="exactly one"):
        stratified_sample(labels, 0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        stratified_sample(labels, 0, fraction=1.5)


def test_parse_fraction_accepts_percentages_and_refuses_nonsense():
    assert parse_fraction("1%") == pytest.approx(0.01)
    assert parse_fraction("10%") == pytest.approx(0.1)
    assert parse_fraction("0.5") == 0.5 and parse_fraction(1) == 1.0
    for bad in ("0", "150%", "abc", "-1%"):
        with pytest.raises(RecipeError, match="--labels"):
            parse_fraction(bad)


def test_protocol_lengths_follow_sslight_appendix_b():
    p = FinetuneProtocol()
    assert (p.base_lr, p.min_lr, p.momentum, p.nesterov, p.crop_scale) == (0.03, 1e-6, 0.9, True, (0.08, 1.0))
    assert (p.epochs_for(0.01), p.epochs_for(0.1), p.epochs_for(1.0)) == (60, 30, 30)


def test_linear_mode_keeps_the_backbone_bitwise_and_reports_the_accuracy_it_ships(source, tmp_path):
    res, out = finetune(
        source,
        out=tmp_path / "ft",
        mode="linear",
        batch_size=64,
        train_limit=256,
        test_limit=128,
        **FAST,
    )
    src = safe_load(source)["backbone"]
    ft = safe_load(out / "checkpoint.pt")
    assert ft["method"] == "finetune" and ft["data"]["classes"] == FMNIST
    for k, v in src.items():  # weights and BatchNorm statistics alike
        assert torch.equal(ft["backbone"][k], v), k
    probe, meta = load_probe(out / "probe.pt")
    assert meta["labels"] == FMNIST and probe.has_bn
    assert not torch.allclose(probe.linear.weight, torch.zeros_like(probe.linear.weight))
    # the reported accuracy is the shipped backbone + classifier on the test images, recomputed here
    student, _ = load_student(out / "checkpoint.pt")
    feats, y = extract_features(student, fashion_mnist("test", limit=128), RES, MEAN, STD, progress=False)
    with torch.no_grad():
        acc = float((probe(feats).argmax(1) == y).float().mean())
    assert res["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert res["accuracy"] > 0.3  # ten classes: chance is 0.1
    assert json.loads((out / "finetune.json").read_text())["accuracy"] == res["accuracy"]


def test_full_mode_updates_the_backbone_and_learns(source, tmp_path):
    res, out = finetune(
        source,
        out=tmp_path / "ft",
        mode="full",
        epochs=3,
        batch_size=32,
        train_limit=512,
        test_limit=256,
        **FAST,
    )
    src = safe_load(source)["backbone"]
    ft = safe_load(out / "checkpoint.pt")["backbone"]
    changed = [k for k, v in src.items() if v.is_floating_point() and not torch.equal(ft[k], v)]
    assert len(changed) > len(src) // 2
    assert res["accuracy"] > 0.25, res["accuracy"]  # 2.5x chance after 48 steps from random-ish features
    assert res["train"]["finished"] and res["epochs"] == 3 and res["num_train"] == 512


def test_labelled_subset_and_default_epochs(source, tmp_path):
    res, _ = finetune(
        source, out=tmp_path / "ft", labels_fraction=0.1, train_limit=500, test_limit=32, max_steps=1, **FAST
    )
    labels = fashion_mnist("train", limit=500).labels
    assert res["num_train"] == len(stratified_sample(labels, 0, fraction=0.1))
    assert res["epochs"] == 30 and res["batch_size"] == res["num_train"]  # batch capped at the subset
    assert not res["train"]["finished"]


def test_resume_continues_exactly_and_refuses_a_changed_run(source, tmp_path):
    kw = dict(mode="full", epochs=2, batch_size=32, train_limit=128, test_limit=32, **FAST)
    whole, _ = finetune(source, out=tmp_path / "whole", **kw)
    finetune(source, out=tmp_path / "cut", max_steps=3, **kw)
    resumed, _ = finetune(source, out=tmp_path / "cut", resume=True, **kw)
    a, b = safe_load(tmp_path / "whole" / "checkpoint.pt"), safe_load(tmp_path / "cut" / "checkpoint.pt")
    for part in ("backbone",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    for k in a["head"]["state_dict"]:
        assert torch.equal(a["head"]["state_dict"][k], b["head"]["state_dict"][k]), k
    assert resumed["accuracy"] == whole["accuracy"]
    with pytest.raises(ResumeMismatch, match="data"):
        finetune(source, out=tmp_path / "cut", resume=True, **{**kw, "train_limit": 96})


def test_untrained_start_is_the_seeded_initial_network(source, tmp_path):
    from robkit.evaluation.api import untrained_student

    res, out = finetune(
        source,
        out=tmp_path / "ft",
        untrained=True,
        mode="linear",
        epochs=1,
        batch_size=64,
        train_limit=64,
        test_limit=32,
        **FAST,
    )
    init = untrained_student("mobilenet_v3_small", {}, 0).backbone
    ft = safe_load(out / "checkpoint.pt")
    assert ft["init"]["untrained"] is True
    assert all(torch.equal(ft["backbone"][k], v) for k, v in init.named_parameters())
    # BatchNorm re-estimated on the data, exactly as `robkit eval --untrained` does
    means = [k for k, _ in init.named_buffers() if k.endswith("running_mean")]
    assert not torch.equal(ft["backbone"][means[0]], init.get_buffer(means[0]))


def test_a_finetune_checkpoint_exports_as_a_labelled_classifier(source, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from robkit.export.exporter import export_checkpoint

    _, out = finetune(
        source,
        out=tmp_path / "ft",
        mode="linear",
        epochs=1,
        batch_size=64,
        train_limit=128,
        test_limit=32,
        **FAST,
    )
    res = export_checkpoint(out / "checkpoint.pt", target="onnx-fp32", parity_images=8)
    assert res.card["labels"] == FMNIST and res.card["output"]["kind"] == "logits"
    meta = ort.InferenceSession(str(res.path)).get_modelmeta().custom_metadata_map
    assert json.loads(meta["robkit.labels"]) == FMNIST  # what an app reads through onnxruntime


def test_cli_finetune_prints_the_next_command_and_errors_cleanly(source, tmp_path):
    from robkit.cli import main

    runner = CliRunner()
    out = tmp_path / "ft"
    r = runner.invoke(
        main,
        [
            "finetune",
            str(source),
            "--mode",
            "linear",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--train-limit",
            "64",
            "--test-limit",
            "32",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert f"robkit export {out / 'checkpoint.pt'} --target android-tflite-int8" in r.output
    bad = runner.invoke(main, ["finetune", str(source), "--labels", "0%", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "--labels" in bad.output and "Traceback" not in bad.output
    again = runner.invoke(main, ["finetune", str(source), "--out", str(out), "-q"])
    assert again.exit_code != 0 and "already holds a run" in again.output


def test_select_keeps_labels_classes_and_a_distinct_fingerprint(tmp_path):
    import numpy as np
    from PIL import Image

    from robkit.data.datasets import ImageFolder, data_fingerprint

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = ImageFolder(tmp_path, canvas_px=8, index_cache=False)
    part = select(ds, torch.tensor([1, 4]))
    assert [p.name for p, _ in part.files] == ["1.png", "1.png"] and part.labels.tolist() == [0, 1]
    assert part.classes == ("cat", "dog") and len(ds) == 6  # the source is untouched
    fps = {data_fingerprint(d)["sha256"] for d in (ds, part, select(ds, torch.tensor([1, 5])))}
    assert len(fps) == 3
    mem = fashion_mnist("test", limit=10)
    sub = select(mem, torch.tensor([2, 7]))
    assert torch.equal(sub.images, mem.images[[2, 7]]) and sub.labels.tolist() == mem.labels[[2, 7]].tolist()
