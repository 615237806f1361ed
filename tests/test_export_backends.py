"""Every format behind one protocol; the exporter drives convert → embed → run → parity → card."""

from __future__ import annotations

import json

import pytest
from export_helpers import MEAN, RES, STD, make_student

from robkit.export import backends
from robkit.export import card as cards
from robkit.export import exporter as X
from robkit.export.backends import backend_for
from robkit.export.parity import ParityError, ParityReport
from robkit.export.targets import FORMATS, TargetError, resolve_target

META = {"normalization": {"mean": MEAN, "std": STD}, "resolution": RES}
STEPS = ("convert", "embed", "run", "runner", "read_back")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_implements_the_protocol(fmt):
    b = backend_for(fmt)
    assert b.format == fmt and isinstance(b.runtime, str)
    assert all(callable(getattr(b, step, None)) for step in STEPS)


def test_an_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError, match="onnx, tflite"):
        backend_for("pdf")


class Recording:
    """The ONNX backend, with a log of the calls the exporter makes and what the file was at each."""

    def __init__(self):
        self.inner, self.calls = backend_for("onnx"), []
        self.format, self.runtime = self.inner.format, self.inner.runtime

    def convert(self, job):
        self.calls.append("convert")
        return self.inner.convert(job)

    def embed(self, path, card, labels):
        self.calls.append("embed")
        assert "parity" not in card and card["conversion"]["runtime"] == "onnxruntime"
        return self.inner.embed(path, card, labels)

    def run(self, path, job, converted):
        self.calls.append(("run", cards.sha256(path), dict(self.inner.read_back(path))))
        return self.inner.run(path, job, converted)


def test_the_file_that_runs_is_the_file_that_ships_with_its_metadata(tmp_path, monkeypatch):
    rec = Recording()
    monkeypatch.setattr(X, "backend_for", lambda fmt: rec)
    res = X.export_model(
        make_student("resnet18"), resolve_target("onnx"), tmp_path / "m", meta=META, parity_images=8
    )
    assert rec.calls[:2] == ["convert", "embed"] and rec.calls[2][0] == "run" and len(rec.calls) == 3
    _, sha_at_run, md_at_run = rec.calls[2]
    assert sha_at_run == cards.sha256(res.path) == res.card["conversion"]["parity_file_sha256"]
    assert json.loads(md_at_run["robkit.input"])["layout"] == "NCHW"  # embedded before the run
    import onnxruntime as ort  # what an app's loader sees

    custom = ort.InferenceSession(str(res.path)).get_modelmeta().custom_metadata_map
    assert custom == backend_for("onnx").read_back(res.path) and "robkit.arch" in custom
    assert res.card["metadata_embedded"] is True and res.card["status"] == "passed"


def _fake_export(failing: dict[str, BaseException]):
    seen = []

    def fake(student, target, dest, **kw):
        seen.append(target.name)
        if target.name in failing:
            raise failing[target.name]
        return X.ExportResult(dest, dest, {"target": target.name}, ParityReport("x", 1, 1.0, 1.0, 0.0))

    return fake, seen


def _checkpoint(tmp_path):
    from test_export_onnx import make_student_checkpoint

    make_student_checkpoint(tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def test_auto_skips_targets_that_miss_parity_or_are_missing_and_reports_them(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    names = ["android-tflite-int8", "onnx-int8-cpu", "onnx-fp32"]
    monkeypatch.setattr("robkit.export.targets.auto_candidates", lambda arch: names)
    fake, seen = _fake_export(
        {
            "android-tflite-int8": ParityError("misses", None),
            "onnx-int8-cpu": RuntimeError("converter missing; pip install something"),
        }
    )
    monkeypatch.setattr(X, "export_model", fake)
    lines = []
    res = X.export_checkpoint(ckpt, target="auto", echo=lines.append)
    assert seen == names and res.card["target"] == "onnx-fp32"
    assert res.skipped == ["android-tflite-int8", "onnx-int8-cpu"]
    assert sum("trying the next" in line for line in lines) == 2


def test_auto_raises_the_last_failure_and_a_named_target_is_not_retried(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    monkeypatch.setattr("robkit.export.targets.auto_candidates", lambda arch: ["onnx-int8-cpu", "onnx-fp32"])
    fake, seen = _fake_export({"onnx-int8-cpu": ParityError("a", None), "onnx-fp32": ParityError("b", None)})
    monkeypatch.setattr(X, "export_model", fake)
    with pytest.raises(ParityError, match="b"):
        X.export_checkpoint(ckpt, target="auto", echo=lambda s: None)
    seen.clear()
    with pytest.raises(ParityError, match="a"):
        X.export_checkpoint(ckpt, target="onnx-int8-cpu", echo=lambda s: None)
    assert seen == ["onnx-int8-cpu"]
    with pytest.raises(TargetError, match="drop --format"):
        X.export_checkpoint(ckpt, target="auto", fmt="onnx")


def test_auto_returns_the_fastest_passing_file_and_every_card_records_the_timing(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    names = ["onnx-fp32", "onnx-int8-cpu", "android-tflite-fp32"]
    monkeypatch.setattr("robkit.export.targets.auto_candidates", lambda arch: names)
    fake, seen = _fake_export({"onnx-int8-cpu": ParityError("misses", None)})

    def writing(student, target, dest, **kw):  # the fake result, with a file on disk
        res = fake(student, target, dest, **kw)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(target.name.encode())
        return res

    monkeypatch.setattr(X, "export_model", writing)
    timed = []
    # the catalog lists onnx-fp32 first; measured here it is the slower file
    monkeypatch.setattr(X, "time_files", lambda paths, threads: timed.append(paths) or [5.0, 2.0])
    lines = []
    res = X.export_checkpoint(ckpt, target="auto", echo=lines.append)
    assert seen == names and [p.name for p in timed[0]] == ["ckpt-onnx-fp32", "ckpt-android-tflite-fp32"]
    assert res.card["target"] == "android-tflite-fp32" and res.skipped == ["onnx-int8-cpu"]
    for p in timed[0]:
        auto = cards.read_card(p)["auto"]
        assert auto["chosen"] == "android-tflite-fp32" and auto["threads"] == 2
        assert [(c["target"], c["median_ms"]) for c in auto["candidates"]] == [
            ("onnx-fp32", 5.0),
            ("android-tflite-fp32", 2.0),
        ]
    assert any("android-tflite-fp32 2.00 ms" in line for line in lines)


def test_auto_timing_on_real_files_picks_the_smallest_median(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    monkeypatch.setattr("robkit.export.targets.auto_candidates", lambda arch: ["onnx-fp32", "onnx-int8-cpu"])
    res = X.export_checkpoint(
        ckpt, target="auto", echo=lambda s: None, parity_images=8, calibration_images=16
    )
    auto = res.card["auto"]
    fastest = min(auto["candidates"], key=lambda c: c["median_ms"])
    assert res.card["target"] == auto["chosen"] == fastest["target"]
    assert all(c["median_ms"] > 0 for c in auto["candidates"]) and auto["cpu"]


def test_backends_module_lists_every_format():
    assert set(backends._MODULES) == set(FORMATS)
