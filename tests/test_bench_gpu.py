"""``benchmarks/bench_gpu.py`` in smoke mode: every case runs through the real paths on this machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")


def test_smoke_runs_every_case_and_reports_its_figures(tmp_path):
    out = bench_gpu.main(["--smoke", "--work", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")])
    assert out["data"]["images"] == 16 and out["data"]["img_per_s_per_core"] > 0
    assert set(out["cases"]) == {"rob-online", "rob-cached", "sslight-dino"}
    for name, case in out["cases"].items():
        assert case["steps"] == 2, name
        assert case["img_per_s"] > 0 and 0 <= case["data_wait_fraction"] <= 1, name
        assert case["peak_memory_gib"] > 0, name
    assert out["cases"]["rob-cached"]["cache_build_s"] >= 0
    assert (tmp_path / "r.json").is_file()


def test_generated_jpegs_are_imagenet_like(tmp_path):
    folder = bench_gpu.make_jpegs(tmp_path, 3)
    from PIL import Image

    files = sorted(folder.rglob("*.JPEG"))
    assert len(files) == 3 and {f.parent.name for f in files} == {"c0", "c1", "c2"}
    with Image.open(files[0]) as im:
        assert im.size == (500, 375) and im.format == "JPEG"
