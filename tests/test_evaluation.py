"""Frozen-feature evaluation: kNN against a brute-force reference, the probe against a hand-computed
forward, the probe file format, low-shot sampling, and the ``robkit eval`` command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from robkit.cli.evaluate import eval_group
from robkit.data.datasets import ImageTensorDataset, fashion_mnist, find_fashion_mnist, to_model_input
from robkit.evaluation.features import extract_features, raw_pixel_features
from robkit.evaluation.knn import knn_accuracy, knn_classify
from robkit.evaluation.linear import LinearProbe, load_probe, save_probe, train_linear_probe
from robkit.evaluation.lowshot import lowshot_eval, sample_lowshot
from robkit.models.checkpoint import atomic_save, make_checkpoint


def brute_force_knn(train, train_labels, test, k, temperature, num_classes):
    """DINO's weighted kNN written with explicit loops over plain Python floats."""
    train, test = train.tolist(), test.tolist()
    preds = []
    for t in test:
        tn = math.sqrt(sum(v * v for v in t))
        sims = []
        for j, x in enumerate(train):
            xn = math.sqrt(sum(v * v for v in x))
            sims.append((sum(a * b for a, b in zip(t, x)) / (tn * xn), j))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, j in sims[:k]:
            votes[int(train_labels[j])] += math.exp(s / temperature)
        best = max(votes)
        preds.append(votes.index(best))  # first (smallest) class among equal votes
    return preds


def separable(n_per_class: int, num_classes: int, dim: int, seed: int, noise: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + noise * torch.randn(labels.shape[0], dim, generator=g)
    perm = torch.randperm(labels.shape[0], generator=g)
    return feats[perm], labels[perm]


# --- kNN -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,temperature,chunk", [(1, 0.07, 1024), (5, 0.07, 7), (20, 0.07, 16), (20, 0.5, 3), (200, 0.1, 64)]
)
def test_knn_matches_brute_force(k, temperature, chunk):
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(120, 8, generator=g), torch.randn(37, 8, generator=g)
    labels = torch.randint(0, 5, (120,), generator=g)
    ours = knn_classify(train, labels, test, k=k, temperature=temperature, num_classes=5, chunk=chunk)
    assert ours.tolist() == brute_force_knn(train, labels, test, min(k, 120), temperature, 5)


def test_knn_weighting_beats_majority_and_ties_go_to_smallest_class():
    test = torch.tensor([[1.0, 0.0]])
    # One very close neighbour of class 1 against two far ones of class 0: exp(sim/T) weighting
    # makes class 1 win although class 0 has the majority.
    train = torch.tensor([[1.0, 0.02], [0.3, 1.0], [0.3, -1.0]])
    labels = torch.tensor([1, 0, 0])
    assert knn_classify(train, labels, test, k=3).tolist() == [1]
    assert brute_force_knn(train, labels, test, 3, 0.07, 2) == [1]
    # With a very high temperature the weights flatten and the majority wins.
    assert knn_classify(train, labels, test, k=3, temperature=100.0).tolist() == [0]
    # Two identical neighbours with different classes: an exact tie, resolved to the smaller class.
    tie_train, tie_labels = torch.tensor([[2.0, 1.0], [2.0, 1.0]]), torch.tensor([3, 1])
    assert knn_classify(tie_train, tie_labels, test, k=2).tolist() == [1]
    assert brute_force_knn(tie_train, tie_labels, test, 2, 0.07, 4) == [1]


def test_knn_rejects_unlabelled_training_images():
    with pytest.raises(ValueError, match="sub-folder per class"):
        knn_classify(torch.randn(4, 3), torch.tensor([0, -1, 1, 0]), torch.randn(2, 3))


# --- separable vs shuffled ----------------------------------------------------------------------------


def test_knn_and_probe_separate_separable_classes_and_not_shuffled_labels():
    num_classes = 5
    x_tr, y_tr = separable(60, num_classes, 16, seed=0)
    x_te, y_te = separable(20, num_classes, 16, seed=0)  # same centres (same seed), fresh noise order
    x_te = x_te + 0.05 * torch.randn_like(x_te)
    assert knn_accuracy(x_tr, y_tr, x_te, y_te) == 1.0
    _, metrics = train_linear_probe(x_tr, y_tr, x_te, y_te, epochs=30, batch_size=64)
    assert metrics["accuracy"] == 1.0

    # Labels unrelated to the features: both stay near chance (1/5) on held-out data.
    g = torch.Generator().manual_seed(1)
    y_tr_shuffled = y_tr[torch.randperm(y_tr.shape[0], generator=g)]
    x_te2, _ = separable(100, num_classes, 16, seed=0)
    y_te_random = torch.randint(0, num_classes, (x_te2.shape[0],), generator=g)
    chance = 1 / num_classes
    assert abs(knn_accuracy(x_tr, y_tr_shuffled, x_te2, y_te_random) - chance) < 0.1
    _, m = train_linear_probe(x_tr, y_tr_shuffled, x_te2, y_te_random, epochs=30, batch_size=64)
    assert abs(m["accuracy"] - chance) < 0.1


# --- linear probe ---------------------------------------------------------------------------------------


def test_bn_probe_matches_hand_computed_forward():
    torch.manual_seed(0)
    probe = LinearProbe(6, 3, bn=True)
    assert (
        not any(p is probe.bn.weight for p in probe.parameters()) and probe.bn.weight is None
    )  # affine=False
    x = torch.randn(10, 6) * 4 + 2
    w, b = probe.linear.weight.detach(), probe.linear.bias.detach()
    eps = probe.bn.eps
    # Training mode: batch statistics (biased variance), as BatchNorm1d defines them.
    probe.train()
    mu, var = x.mean(0), x.var(0, unbiased=False)
    torch.testing.assert_close(probe(x), ((x - mu) / torch.sqrt(var + eps)) @ w.T + b)
    # Eval mode: running statistics.
    probe.eval()
    rm, rv = probe.bn.running_mean, probe.bn.running_var
    torch.testing.assert_close(probe(x), ((x - rm) / torch.sqrt(rv + eps)) @ w.T + b)
    plain = LinearProbe(6, 3, bn=False)
    torch.testing.assert_close(plain(x), x @ plain.linear.weight.detach().T + plain.linear.bias.detach())


def test_probe_file_round_trips_exactly_and_loads_weights_only(tmp_path):
    x, y = separable(10, 3, 5, seed=2)
    probe, metrics = train_linear_probe(x, y, x, y, epochs=3, batch_size=8)
    path = save_probe(
        tmp_path / "probe.pt", probe, ["a", "b", "c"], {"checkpoint": "run/ckpt.pt", "metrics": metrics}
    )
    raw = torch.load(path, weights_only=True)  # plain containers only, no allow-list needed
    assert raw["kind"] == "linear-probe" and raw["robkit"]["format"] == 1
    assert (raw["in_dim"], raw["num_classes"], raw["bn"], raw["labels"]) == (5, 3, True, ["a", "b", "c"])
    loaded, meta = load_probe(path)
    assert not loaded.training
    for key, value in probe.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded(x), probe(x))
    assert meta["labels"] == ["a", "b", "c"] and meta["checkpoint"] == "run/ckpt.pt"
    assert (meta["in_dim"], meta["bn"], meta["accuracy"]) == (5, True, metrics["accuracy"])
    with pytest.raises(ValueError, match="one name per class"):
        save_probe(tmp_path / "bad.pt", probe, ["a", "b"], {})


def test_load_probe_rejects_a_student_checkpoint(tmp_path):
    from robkit.models.checkpoint import CheckpointError

    atomic_save(make_checkpoint(kind="pretrain", backbone={}), tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="not a robkit linear-probe"):
        load_probe(tmp_path / "ckpt.pt")


# --- features ---------------------------------------------------------------------------------------------


def test_extract_features_equals_manual_forward_and_restores_mode():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 1, 12, 12), dtype=torch.uint8, generator=g)
    ds = ImageTensorDataset(images, torch.arange(7) % 2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(1))
    model.train()
    mean, std = [0.2, 0.3, 0.4], [0.5, 0.6, 0.7]
    feats, labels = extract_features(model, ds, 16, mean, std, batch_size=3, progress=False)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        expected = model(to_model_input(images.expand(-1, 3, -1, -1), 16, mean, std))
    torch.testing.assert_close(feats, expected)
    assert labels.tolist() == (torch.arange(7) % 2).tolist()
    px, _ = raw_pixel_features(ds, 12)
    torch.testing.assert_close(px, images.expand(-1, 3, -1, -1).float().div(255).flatten(1))


# --- low-shot ------------------------------------------------------------------------------------------------


def test_lowshot_samples_exactly_k_per_class_and_splits_differ_by_seed():
    labels = torch.arange(4).repeat_interleave(25)[
        torch.randperm(100, generator=torch.Generator().manual_seed(0))
    ]
    for shots in (1, 5):
        a = sample_lowshot(labels, shots, seed=0)
        assert torch.bincount(labels[a], minlength=4).tolist() == [shots] * 4
        assert len(set(a.tolist())) == 4 * shots
        assert torch.equal(a, sample_lowshot(labels, shots, seed=0))
        assert not torch.equal(a, sample_lowshot(labels, shots, seed=1))
    excluded = sample_lowshot(labels, 5, seed=0)
    b = sample_lowshot(labels, 20, seed=3, exclude=excluded)
    assert not set(b.tolist()) & set(excluded.tolist())
    with pytest.raises(ValueError, match="fewer than 26 shots"):
        sample_lowshot(labels, 26, seed=0)


def test_lowshot_eval_accuracy_and_model_selection_ignores_test_labels():
    x_tr, y_tr = separable(30, 4, 12, seed=3, noise=1.5)
    x_te, y_te = separable(30, 4, 12, seed=3, noise=1.5)
    res = lowshot_eval(x_tr, y_tr, x_te, y_te, shots=(1, 5), n_splits=3, seed=0)
    assert set(res) == {"1", "5"}
    for r in res.values():
        assert len(r["accuracies"]) == 3
        assert r["mean"] == pytest.approx(np.mean(r["accuracies"])) and r["std"] == pytest.approx(
            np.std(r["accuracies"])
        )
    assert res["5"]["mean"] > 0.8
    # The regularisation is chosen on held-out *train* images, so scrambling test labels cannot change it.
    scrambled = lowshot_eval(x_tr, y_tr, x_te, y_te.flip(0), shots=(1, 5), n_splits=3, seed=0)
    assert [scrambled[s]["C"] for s in res] == [res[s]["C"] for s in res]


# --- command line -------------------------------------------------------------------------------------------------


def _fashion_mnist_available() -> bool:
    try:
        find_fashion_mnist()
        return True
    except Exception:
        return False


needs_fmnist = pytest.mark.skipif(
    not _fashion_mnist_available(), reason="Fashion-MNIST idx files not installed"
)


@needs_fmnist
def test_cli_knn_on_raw_pixels_matches_independent_numpy_knn():
    result = CliRunner().invoke(
        eval_group, ["knn", "pixels", "--train-limit", "2000", "--test-limit", "500", "--json"]
    )
    assert result.exit_code == 0, result.output
    acc = json.loads(result.stdout)["knn"]["accuracy"]
    assert acc > 0.7  # chance is 0.1
    # The same number from the idx files with numpy only: cosine top-20, exp(sim/0.07) votes.
    tr, te = fashion_mnist("train", limit=2000), fashion_mnist("test", limit=500)
    a = tr.images.flatten(1).numpy().astype(np.float64) / 255
    b = te.images.flatten(1).numpy().astype(np.float64) / 255
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    sim = b @ a.T
    top = np.argsort(-sim, axis=1)[:, :20]
    votes = np.zeros((b.shape[0], 10))
    for i in range(b.shape[0]):
        np.add.at(votes[i], tr.labels.numpy()[top[i]], np.exp(sim[i, top[i]] / 0.07))
    assert acc == pytest.approx(float((votes.argmax(1) == te.labels.numpy()).mean()), abs=1e-6)


def _resnet18_checkpoint(tmp_path, student, std: float, **extra):
    """A robkit DINO checkpoint of ``student`` (a ResNet-18) at 32 px, mean 0.5 and the given std."""
    ckpt = make_checkpoint(
        kind="pretrain",
        method="dino",
        student={"arch": "resnet18", "kwargs": {}},
        backbone=student.backbone.state_dict(),
        head=None,
        teacher=None,
        normalization={"mean": [0.5] * 3, "std": [std] * 3},
        resolution=32,
        config={},
        metrics={},
        **extra,
    )
    return atomic_save(ckpt, tmp_path / "checkpoint.pt")


@needs_fmnist
def test_cli_evaluates_a_robkit_checkpoint_and_saves_the_probe(tmp_path):
    from robkit.models.students import build_student

    torch.manual_seed(0)
    student = build_student("resnet18")
    path = _resnet18_checkpoint(tmp_path, student, std=0.5)
    runner = CliRunner()
    limits = ["--train-limit", "120", "--test-limit", "60", "--batch-size", "60"]
    knn = runner.invoke(eval_group, ["knn", str(path), *limits, "--json"])
    assert knn.exit_code == 0, knn.output
    r = json.loads(knn.stdout)
    assert (r["resolution"], r["feature_dim"], r["num_train"], r["num_test"]) == (32, 512, 120, 60)
    assert 0.0 <= r["knn"]["accuracy"] <= 1.0

    out = tmp_path / "eval" / "linear.json"
    lin = runner.invoke(eval_group, ["linear", str(path), *limits, "--epochs", "5", "--out", str(out)])
    assert lin.exit_code == 0, lin.output
    assert "linear top-1" in lin.stdout and "next: robkit export" in lin.stdout
    saved = json.loads(out.read_text())
    probe, meta = load_probe(tmp_path / "eval" / "linear.probe.pt")
    assert meta["checkpoint"] == str(path) and meta["in_dim"] == 512 and meta["labels"][1] == "Trouser"
    assert meta["accuracy"] == pytest.approx(saved["linear"]["accuracy"])


def _write_folder(root, classes: dict[str, tuple[int, int, int]], n: int) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, colour in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(colour) + rng.integers(-20, 20, (10, 14, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / name / f"{i}.png")


def test_cli_on_an_image_folder_and_helpful_errors(tmp_path):
    _write_folder(tmp_path / "colours", {"blue": (20, 40, 220), "red": (220, 30, 30)}, n=6)
    runner = CliRunner()
    ok = runner.invoke(
        eval_group, ["knn", "pixels", "--data", str(tmp_path / "colours"), "--k", "3", "--json"]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["knn"]["accuracy"] == 1.0

    missing = runner.invoke(eval_group, ["knn", str(tmp_path / "nope.pt")])
    assert missing.exit_code != 0 and "not found" in missing.output and "pixels" in missing.output

    for split in ("train", "test"):
        (tmp_path / "flat" / split).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "flat" / split / "a.png")
    flat = runner.invoke(eval_group, ["linear", "pixels", "--data", str(tmp_path / "flat")])
    assert flat.exit_code != 0 and "no labels" in flat.output and "sub-folder per class" in flat.output


@needs_fmnist
def test_untrained_baseline_is_the_runs_initial_network_with_precise_bn(tmp_path):
    """`--untrained` rebuilds the run's seed-initialised network and re-estimates BatchNorm as the
    trainer does; its features equal an independent computation, and differ from the trained ones."""
    from robkit.engine.bn import precise_bn_images
    from robkit.evaluation.api import evaluate, untrained_student
    from robkit.models.students import build_student

    torch.manual_seed(3)
    init = build_student("resnet18")
    trained = build_student("resnet18")  # stands in for trained weights: anything but the initial ones
    path = _resnet18_checkpoint(tmp_path, trained, std=0.25, seed=3)
    rebuilt = untrained_student("resnet18", seed=3)
    for a, b in zip(rebuilt.state_dict().values(), init.state_dict().values()):
        assert torch.equal(a, b)

    # Independent BN re-estimate of the first layer: the mean over batches of 256 of the batch
    # means of conv1's output on the selected images.
    train = fashion_mnist("train", limit=300)
    imgs = precise_bn_images(train, n=2048, seed=3)
    assert imgs.shape[0] == 300
    with torch.no_grad():
        x = to_model_input(imgs, 32, [0.5] * 3, [0.25] * 3)
        means = [init.backbone.conv1(x[i : i + 256]).mean(dim=(0, 2, 3)) for i in range(0, 300, 256)]
    expected_mean = torch.stack(means).mean(0)

    res = evaluate(str(path), which=("knn",), train_limit=300, test_limit=50, untrained=True)
    assert res["method"] == "untrained" and res["seed"] == 3 and res["checkpoint"] == "untrained:resnet18"
    # the same numbers through the public spelling
    res2 = evaluate(
        "untrained:resnet18",
        which=("knn",),
        train_limit=300,
        test_limit=50,
        resolution=32,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        seed=3,
    )
    assert res2["knn"]["accuracy"] == res["knn"]["accuracy"]
    from robkit.engine.bn import precise_bn_from_dataset

    net = precise_bn_from_dataset(
        untrained_student("resnet18", seed=3), train, 32, [0.5] * 3, [0.25] * 3, seed=3
    )
    torch.testing.assert_close(net.backbone.bn1.running_mean, expected_mean, atol=1e-4, rtol=1e-4)
    trained_res = evaluate(str(path), which=("knn",), train_limit=300, test_limit=50)
    assert trained_res["method"] == "dino"

    out = CliRunner().invoke(
        eval_group, ["knn", str(path), "--untrained", "--train-limit", "300", "--test-limit", "50"]
    )
    assert out.exit_code == 0, out.output
    assert "untrained resnet18 (seed 3)" in out.stdout
    assert f"{100 * res['knn']['accuracy']:.2f} %" in out.stdout
