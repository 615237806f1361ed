"""The export benchmarks' shared rows (``benchmarks/export_rows.py``) and ``bench_qat_steps.py`` on a
tiny student: the PTQ and QAT rows come out with the cosines the library itself reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from export_helpers import make_student, save_student_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import export_rows  # noqa: E402

pytest.importorskip("litert_torch")


def test_a_row_is_a_target_with_an_optional_qat_suffix():
    assert export_rows.split_row("android-tflite-int8") == ("android-tflite-int8", False)
    assert export_rows.split_row("android-tflite-int8+qat") == ("android-tflite-int8", True)
    with pytest.raises(SystemExit, match=r"\+fast.*\+qat"):
        export_rows.split_row("android-tflite-int8+fast")


def test_a_qat_row_names_the_graph_its_file_holds():
    from types import SimpleNamespace

    import bench_export  # benchmarks/ is on the path (above)

    kept = SimpleNamespace(card={"quantization": {"qat": {"seconds": 12.5, "graph": "ptq"}}})
    assert export_rows.qat_graph(kept) == "ptq" and export_rows.qat_seconds(kept) == 12.5
    assert export_rows.qat_graph(SimpleNamespace(card={"quantization": {}})) is None
    assert bench_export._qat_cell({"qat_s": 12.5, "qat_graph": "ptq"}) == "12.5 (PTQ graph kept)"
    assert bench_export._qat_cell({"qat_s": 12.5, "qat_graph": "qat"}) == "12.5"
    assert bench_export._qat_cell({"qat_s": None}) == "-"


def test_a_row_that_fails_to_export_is_reported_and_skipped(tmp_path, capsys):
    from robkit.export.qat import QATSettings

    student = make_student("mobilenet_v3_small", images=32)
    r, seconds = export_rows.export_row(student, "no-such-target", tmp_path / "m", {}, QATSettings())
    assert r is None and seconds >= 0
    assert "no-such-target: export failed" in capsys.readouterr().out


def test_qat_steps_bench_reports_ptq_and_qat_cosines(tmp_path):
    import bench_qat_steps

    run = tmp_path / "run"
    save_student_checkpoint(make_student("mobilenet_v3_small", images=64), run / "checkpoint.pt")
    out = tmp_path / "out"
    args = [
        str(run),
        "--grid",
        "1e-4:4,1e-4:4:0",
        "--images",
        "64",
        "--batch-size",
        "8",
        "--calibration",
        "16",
    ]
    rows = bench_qat_steps.main(args + ["--held-out", "16", "--out", str(out)])
    ptq, qat, fixed = rows
    assert ptq["mode"] == "ptq" and 0 < ptq["cosine"] <= 1
    assert qat["mode"] == "qat" and qat["steps"] == 4 and qat["lr"] == 1e-4
    assert qat["range_lr"] == 1e-3 and fixed["range_lr"] == 0.0  # the default, and a grid entry's own
    assert 0 < qat["cosine_start"] <= 1 and 0 < qat["cosine"] <= 1
    assert qat["loss_first"] == pytest.approx(1 - qat["cosine_start"], abs=0.1)  # same distance, other images
    stored = json.loads((out / "qat_steps.json").read_text())
    assert stored["rows"] == rows and stored["machine"]["threads"] == 2
    assert (out / "qat_steps.png").stat().st_size > 0 and "| qat |" in (out / "qat_steps.md").read_text()


def test_int8_accuracy_bench_runs_the_files_at_another_resolution(tmp_path):
    """``--resolution``: the files are exported for, and the evaluation images resized to, that input size
    (the row says so), while the checkpoint keeps its training resolution."""
    import bench_int8_accuracy

    from robkit.export.qat import QATSettings

    run = tmp_path / "run"
    save_student_checkpoint(make_student("mobilenet_v3_small", images=32), run / "checkpoint.pt")
    rows = bench_int8_accuracy.bench_run(
        run, ["android-tflite-fp32"], 64, 32, tmp_path / "files", QATSettings(), threads=1, resolution=48
    )
    base, fp32 = rows
    assert base["target"] == "pytorch fp32" and "run at 48 px" in base["run"]
    assert fp32["target"] == "android-tflite-fp32" and fp32["passed"] and fp32["parity_cosine"] > 0.999
    assert abs(fp32["knn"] - base["knn"]) <= 2 / 32  # the file at 48 px computes what PyTorch does at 48 px
    from robkit.export.tflite_format import TFLiteRunner

    runner = TFLiteRunner(tmp_path / "files" / "run-android-tflite-fp32.tflite")
    assert 48 in [int(v) for v in runner.inp["shape"]]


def test_the_bench_reports_the_auto_pick_as_the_fastest_candidate_meeting_parity():
    import bench_export

    names = bench_export.auto_candidates("mobilenet_v3")
    first, second = names[0], names[1]
    rows = [
        {"target": first, "threads": 2, "passed": True, "median_ms": 3.0},
        {"target": second, "threads": 2, "passed": True, "median_ms": 2.0},
        {"target": names[-1], "threads": 2, "passed": False, "median_ms": 1.0},  # fastest, misses parity
        {"target": second, "threads": 1, "passed": True, "median_ms": 0.5},  # other thread count
    ]
    assert bench_export.default_choice("mobilenet_v3", rows, 2)["target"] == second
    rows[1]["median_ms"] = 3.0  # a tie goes to the catalog's order
    assert bench_export.default_choice("mobilenet_v3", rows, 2)["target"] == first
    assert bench_export.default_choice("mobilenet_v3", rows[2:3], 2) is None
