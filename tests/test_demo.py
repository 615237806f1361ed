"""`robkit demo` at the tiny budget runs every stage and writes every report artefact."""

import json

from click.testing import CliRunner

from robkit.cli import main


def fashion_mnist_classes():
    from robkit.data.datasets import fashion_mnist

    return fashion_mnist("test", limit=1).classes


def test_demo_tiny_end_to_end_and_resumable(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--budget", "tiny", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for f in (
        "report.md",
        "report.html",
        "summary.json",
        "training_curves.png",
        "accuracy.png",
        "latency.png",
        "eval.json",
        "bench.json",
        "teacher/checkpoint.pt",
        "rob/checkpoint.pt",
        "sslight/checkpoint.pt",
    ):
        assert (out / f).exists(), f
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["evals"]) == {
        "pixels",
        "teacher_untrained",
        "teacher",
        "student_untrained",
        "rob",
        "sslight",
    }
    assert {(r["run"], r["baseline"]) for r in summary["learned"]} == {
        ("teacher", "teacher_untrained"),
        ("rob", "student_untrained"),
        ("sslight", "student_untrained"),
        ("rob", "sslight"),
    }
    assert "Did it learn?" in (out / "report.md").read_text()
    for name in ("teacher", "rob", "sslight"):
        assert 0.0 <= summary["evals"][name]["knn"]["accuracy"] <= 1.0
        assert "accuracy" in summary["evals"][name]["linear"]
    formats = {e["card"].get("format") for e in summary["exports"]}
    assert formats == {"tflite", "onnx", "coreml"}
    assert all(e["card"].get("file_sha256") for e in summary["exports"])
    for e in summary["exports"]:  # every card says where the model came from and how to feed it
        c = e["card"]
        assert c["recipe"] == "rob-dino-small" and c["data"] == "fashion-mnist" and c["method"] == "rob-dino"
        assert c["teacher"] and c["normalization"]["mean"] == [0.485, 0.456, 0.406]
    # the labelled classifier, as the app's own client (MediaPipe ImageClassifier) runs it
    cls = [e for e in summary["exports"] if e["file"].endswith("-classifier.tflite")]
    assert len(cls) == 1 and cls[0]["card"]["labels"] == list(fashion_mnist_classes())
    check = summary["app_check"]
    assert check["client"] == "mediapipe ImageClassifier" and check["label_names_match"], check
    assert check["agreement_with_pytorch"] >= 0.95 and check["images"] == 64
    assert "ImageClassifier" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    rob_ckpt = (out / "rob" / "checkpoint.pt").stat().st_mtime
    # a second invocation reuses every finished stage
    res2 = CliRunner().invoke(main, ["demo", "--budget", "tiny", "--out", str(out)], catch_exceptions=False)
    assert res2.exit_code == 0, res2.output
    assert "reusing" in res2.output or "reusing" in (res2.stderr if hasattr(res2, "stderr") else "")
    assert (out / "rob" / "checkpoint.pt").stat().st_mtime == rob_ckpt


def test_steps_are_fitted_to_this_cpu_once_and_kept_for_a_resumed_demo(tmp_path):
    """The probe trains a few real steps, measures them and leaves nothing behind; ``plan.json`` then
    fixes the steps, so a resumed demo never probes (or changes its runs) again."""
    import dataclasses

    from robkit.demo import BUDGETS, PROBE_STEPS, STUDENT, _probe_step_s, plan_steps
    from robkit.engine.build import pretrain

    b = dataclasses.replace(BUDGETS["tiny"], seconds=1e6, batch_size=8)
    head = {"head": {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 16}}
    calls = []

    def probe():
        calls.append(1)
        return _probe_step_s(
            pretrain, tmp_path, b, student=STUDENT, method="dino", recipe="sslight", overrides=head
        )

    plan = plan_steps(tmp_path, b, {"teacher": probe, "student": probe})
    assert len(calls) == 2 and not (tmp_path / ".probe").exists()
    assert plan["probe_step_s"]["teacher"] > 0 and plan["steps"] == b.steps  # a huge target: every step fits
    assert PROBE_STEPS > 2

    def refuse():
        raise AssertionError("a stored plan is reused, not re-measured")

    assert plan_steps(tmp_path, b, {"teacher": refuse, "student": refuse}) == plan
    assert json.loads((tmp_path / "plan.json").read_text()) == plan
