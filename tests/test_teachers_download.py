"""Teacher sources: robkit cache, torch.hub cache, HTTP download (verify, resume), offline errors, CLI.

A local HTTP server (``http.server`` in a thread on 127.0.0.1) stands in for the project sites;
a catalog folder in ``tmp_path`` (``ROBKIT_CATALOG_PATH``) points teacher names at it.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import robkit.teachers as teachers
from robkit.catalog import registry
from robkit.teachers import download as dl
from robkit.teachers.resnet_wide import WideResNet

REQUIRED = {
    "dino": [
        "dino_vits16",
        "dino_vits8",
        "dino_vitb16",
        "dino_vitb8",
        "dino_resnet50",
        "dino_xcit_small_12_p16",
        "dino_xcit_small_12_p8",
        "dino_xcit_medium_24_p16",
        "dino_xcit_medium_24_p8",
    ],
    "ibot": [
        "ibot_vits16",
        "ibot_swint7",
        "ibot_swint14",
        "ibot_vitb16",
        "ibot_vitb16_rand_mask",
        "ibot_vitl16",
        "ibot_vitl16_rand_mask",
        "ibot_vitb16_in22k",
        "ibot_vitl16_in22k",
    ],
    "msn": ["msn_vits16", "msn_vitb16", "msn_vitb4", "msn_vitl16", "msn_vitl7"],
    "swav": [
        "swav_rn50",
        "swav_rn50_400ep",
        "swav_rn50_200ep",
        "swav_rn50_100ep",
        "swav_rn50_200ep_bs256",
        "swav_rn50_400ep_bs256",
        "swav_rn50_400ep_2x224",
        "swav_rn50w2",
        "swav_rn50w4",
        "swav_rn50w5",
    ],
}


def tiny_swav_bytes(path: Path) -> bytes:
    """A tiny SwAV file in the released layout (bare ``module.`` state dict)."""
    torch.manual_seed(0)
    net = WideResNet((1, 1, 1, 1), 8, (8, 8, 8, 8))
    head = {
        "projection_head.0.weight": torch.randn(16, 32),
        "projection_head.0.bias": torch.zeros(16),
        "projection_head.1.weight": torch.ones(16),
        "projection_head.1.bias": torch.zeros(16),
        "projection_head.1.running_mean": torch.zeros(16),
        "projection_head.1.running_var": torch.ones(16),
        "projection_head.1.num_batches_tracked": torch.tensor(0),
        "projection_head.3.weight": torch.randn(8, 16),
        "projection_head.3.bias": torch.zeros(8),
        "prototypes.weight": torch.randn(10, 8),
    }
    torch.save({f"module.{k}": v for k, v in (net.state_dict() | head).items()}, path)
    return path.read_bytes()


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` with ``Range: bytes=N-`` support; records request headers."""

    files: dict[str, bytes] = {}
    log: list[dict] = []

    def do_GET(self):  # noqa: N802
        type(self).log.append({"path": self.path, "range": self.headers.get("Range")})
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server():
    RangeHandler.files, RangeHandler.log = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated ROBKIT_HOME, torch.hub dir and an extra catalog folder; returns a record writer."""
    home, hub, cat = tmp_path / "home", tmp_path / "hub", tmp_path / "catalog"
    (cat / "teachers").mkdir(parents=True)
    monkeypatch.setenv("ROBKIT_HOME", str(home))
    monkeypatch.delenv("ROBKIT_OFFLINE", raising=False)
    monkeypatch.setenv("ROBKIT_CATALOG_PATH", str(cat))
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    registry.cache_clear()

    def write(records: list[dict]) -> None:
        doc = {
            "family": "swav",
            "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.228, 0.224, 0.225]},
            "resolution": 224,
            "default_temperature": 0.03,
            "sha256": None,
            "records": records,
        }
        (cat / "teachers" / "local.yaml").write_text(yaml.safe_dump(doc))
        registry.cache_clear()

    yield write, home / "teachers", hub / "checkpoints"
    torch.hub.set_dir(old_hub)
    registry.cache_clear()


def test_catalog_lists_every_required_teacher():
    reg = registry("teachers")
    for family, names in REQUIRED.items():
        for n in names:
            r = reg.get(n)
            assert r.family == family, n
            for key in (
                "url",
                "file_name",
                "arch",
                "head",
                "normalization",
                "resolution",
                "default_temperature",
                "params_m",
                "gflops",
                "license",
                "citation",
                "reported",
                "num_prototypes",
            ):
                assert key in r.fields, (n, key)
            assert "sha256" in r.fields and r["sha256"] is None  # none published
            assert r["url"].startswith("https://")
    assert reg.get("swav_rn50")["normalization"]["std"][0] == 0.228
    assert reg.get("dino_vits16")["normalization"]["std"][0] == 0.229
    temps = {f: reg.get(names[0])["default_temperature"] for f, names in REQUIRED.items()}
    assert temps == {"dino": 0.07, "ibot": 0.07, "msn": 0.025, "swav": 0.03}
    rn = reg.get("dino_resnet50")["head"]
    assert (rn["nlayers"], rn["use_bn"], rn["weight_norm"], rn["out_dim"]) == (2, True, False, 60000)
    assert reg.get("swav_rn50w2")["arch"]["stem_width"] == 128
    assert reg.get("ibot_vitl16_in22k")["checkpoint_key"] == "student"
    # iBOT files share the server name checkpoint.pth: cache names must be unique
    files = [r["file_name"] for r in reg if r.family == "ibot"]
    assert len(set(files)) == len(files)


def test_download_verify_record_and_load(env, server, tmp_path):
    write, cache, _ = env
    httpd, base = server
    data = tiny_swav_bytes(tmp_path / "src.pth.tar")
    RangeHandler.files["/swav_tiny.pth.tar"] = data
    write([{"name": "swav_tiny", "url": f"{base}/swav_tiny.pth.tar", "file_name": "swav_tiny.pth.tar"}])
    t = teachers.load("swav_tiny", progress=False)
    digest = hashlib.sha256(data).hexdigest()
    assert t.sha256 == digest and t.family == "swav" and t.std == [0.228, 0.224, 0.225]
    assert (cache / "swav_tiny.pth.tar").read_bytes() == data
    assert dl.recorded_sha256("swav_tiny.pth.tar") == digest  # trust on first use
    n = len(RangeHandler.log)
    teachers.load("swav_tiny")  # from the cache: no request
    assert len(RangeHandler.log) == n
    # a cached file that changed since its first download is refused
    (cache / "swav_tiny.pth.tar").write_bytes(data + b"x")
    with pytest.raises(dl.DownloadError, match="sha256"):
        teachers.load("swav_tiny")


def test_wrong_sha256_is_rejected_and_leaves_nothing(env, server, tmp_path):
    write, cache, _ = env
    _, base = server
    RangeHandler.files["/f.pth.tar"] = tiny_swav_bytes(tmp_path / "src.pth.tar")
    write([{"name": "swav_bad", "url": f"{base}/f.pth.tar", "file_name": "f.pth.tar", "sha256": "0" * 64}])
    with pytest.raises(dl.DownloadError, match="sha256 mismatch"):
        teachers.load("swav_bad", progress=False)
    assert not cache.exists() or [p.name for p in cache.iterdir() if p.name != "sha256.json"] == []
    assert dl.recorded_sha256("f.pth.tar") is None


def test_interrupted_download_resumes_with_range(env, server, tmp_path):
    write, cache, _ = env
    _, base = server
    data = tiny_swav_bytes(tmp_path / "src.pth.tar")
    RangeHandler.files["/r.pth.tar"] = data
    digest = hashlib.sha256(data).hexdigest()
    write([{"name": "swav_resume", "url": f"{base}/r.pth.tar", "file_name": "r.pth.tar", "sha256": digest}])
    cache.mkdir(parents=True)
    half = len(data) // 2
    (cache / "r.pth.tar.part").write_bytes(data[:half])  # what an interrupted download leaves
    t = teachers.load("swav_resume", progress=False)
    assert RangeHandler.log[-1]["range"] == f"bytes={half}-"
    assert (cache / "r.pth.tar").read_bytes() == data and not (cache / "r.pth.tar.part").exists()
    assert t.sha256 == digest


def test_complete_part_file_and_file_url(env, tmp_path):
    write, cache, _ = env
    data = tiny_swav_bytes(tmp_path / "src.pth.tar")
    write([{"name": "swav_file", "url": (tmp_path / "src.pth.tar").as_uri(), "file_name": "fu.pth.tar"}])
    t = teachers.load("swav_file", progress=False)
    assert (cache / "fu.pth.tar").read_bytes() == data and t.num_prototypes == 10


def test_hub_cache_is_used(env, tmp_path):
    write, cache, hub = env
    hub.mkdir(parents=True)
    data = tiny_swav_bytes(hub / "swav_800ep_pretrain.pth.tar")
    write(
        [
            {
                "name": "swav_hub",
                "url": "http://127.0.0.1:9/never",
                "file_name": "swav_800ep_pretrain.pth.tar",
                "hub_file_name": "swav_800ep_pretrain.pth.tar",
            }
        ]
    )
    t = teachers.load("swav_hub")
    assert (
        t.source == str(hub / "swav_800ep_pretrain.pth.tar") and t.sha256 == hashlib.sha256(data).hexdigest()
    )
    assert not (cache / "swav_800ep_pretrain.pth.tar").exists()


@pytest.mark.parametrize("how", ["offline_env", "unreachable"])
def test_offline_error_names_url_file_and_folder(env, monkeypatch, how):
    write, cache, _ = env
    url = "http://127.0.0.1:9/deepcluster/swav_x.pth.tar"  # port 9 (discard): connection refused
    write([{"name": "swav_x", "url": url, "file_name": "swav_x.pth.tar"}])
    if how == "offline_env":
        monkeypatch.setenv("ROBKIT_OFFLINE", "1")
    with pytest.raises(dl.DownloadError) as e:
        teachers.load("swav_x", progress=False)
    msg = str(e.value)
    assert url in msg and "swav_x.pth.tar" in msg and str(cache) in msg


def test_cli_list_info_fetch_verify(env, server, tmp_path):
    from robkit.cli.teachers import teachers as group

    write, cache, _ = env
    _, base = server
    RangeHandler.files["/c.pth.tar"] = tiny_swav_bytes(tmp_path / "src.pth.tar")
    write(
        [
            {
                "name": "swav_cli",
                "url": f"{base}/c.pth.tar",
                "file_name": "c.pth.tar",
                "arch": {"name": "tiny"},
                "params_m": 0.1,
                "gflops": 0.01,
                "num_prototypes": 10,
            }
        ]
    )
    run = CliRunner()
    res = run.invoke(group, ["list", "dino_vit*"])
    assert res.exit_code == 0 and "dino_vits16" in res.output and "swav" not in res.output
    res = run.invoke(group, ["list", "swav_cli"])
    assert res.exit_code == 0 and "swav_cli" in res.output and "tiny" in res.output
    res = run.invoke(group, ["info", "dino_vitz16"])
    assert res.exit_code != 0 and "dino_vits16" in res.output
    res = run.invoke(group, ["info", "msn_vitb16"])
    assert res.exit_code == 0 and "vitb16_600ep.pth.tar" in res.output and "0.025" in res.output
    res = run.invoke(group, ["fetch", "swav_cli"])
    assert res.exit_code == 0, res.output
    assert (cache / "c.pth.tar").exists()
    res = run.invoke(group, ["list", "swav_cli"])
    assert "yes" in res.output.splitlines()[1]
    res = run.invoke(group, ["verify", "swav_cli"])
    assert res.exit_code == 0, res.output
    assert "logits (2, 10)" in res.output and "verify: OK" in res.output
    res = run.invoke(group, ["verify", str(tmp_path / "src.pth.tar")])
    assert res.exit_code == 0, res.output
