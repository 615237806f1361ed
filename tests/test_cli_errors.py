"""Every user mistake ends in one clean error message and a non-zero exit, for every command.

Each command is run with a missing path, a garbage file and an unknown name. Through click's runner, an
exception that escaped robkit would be ``result.exception`` itself; a handled error is a ``SystemExit``
with code 1 and an ``Error: ...`` message. One run through the real ``robkit`` entry point checks that
no traceback reaches the terminal, and that ``--debug`` brings it back.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from robkit.cli import main


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROBKIT_OFFLINE", "1")
    monkeypatch.delenv("ROBKIT_DEBUG", raising=False)


@pytest.fixture
def garbage(tmp_path):
    p = tmp_path / "garbage.pth"
    p.write_text("this is a text file, not a checkpoint\n")
    return p


def _cases(tmp, garbage):
    missing = str(tmp / "does-not-exist")
    g = str(garbage)
    return [
        # (arguments, what the message must name)
        (["pretrain", "--data", missing, "--epochs", "1"], "does not exist"),
        (["pretrain", "--recipe", "sslightt"], "no recipe 'sslightt'"),
        (["pretrain", "--set", "optim.base_lrr=0.1"], "Did you mean 'base_lr'"),
        (["pretrain", "--set", "rob.teacher_resolution=student"], "distillation recipes only"),
        (["pretrain", "--set", "data.limit=3"], "must start with one of"),
        (["distill", "--teacher", missing], "does not exist"),
        (["distill", "--teacher", g], "not a PyTorch checkpoint"),
        (["distill", "--teacher", "dino_vitss8"], "Did you mean 'dino_vits8'"),
        (["distill", "--teacher", "dino_vits8"], "cannot be downloaded"),
        (["eval", "knn", missing], "not found"),
        (["eval", "knn", g], "not a PyTorch checkpoint"),
        (["eval", "knn", "untrained:resnet99"], "resnet99"),
        (["export", missing, "--format", "onnx"], "does not exist"),
        (["export", g, "--format", "onnx"], "not a PyTorch checkpoint"),
        (["bench", missing], "does not exist"),
        (["bench", g], "card"),
        (["teachers", "info", "dino_vitss8"], "Did you mean"),
        (["teachers", "fetch", "dino_vits8"], "cannot be downloaded"),
        (
            ["teachers", "cache", "--teacher", g, "--out", str(tmp / "c"), "--epochs", "1"],
            "not a PyTorch checkpoint",
        ),
        (
            ["teachers", "cache", "--teacher", "nope_vits8", "--out", str(tmp / "c"), "--epochs", "1"],
            "no teacher named",
        ),
        (["recipes", "show", "rob-dinoo"], "Did you mean"),
    ]


def test_each_command_reports_user_mistakes_as_one_clean_error(tmp_path, garbage):
    runner = CliRunner()
    failures = []
    for args, needle in _cases(tmp_path, garbage):
        r = runner.invoke(main, args)
        out = r.output
        ok = (
            isinstance(r.exception, SystemExit)
            and r.exit_code != 0
            and "Traceback" not in out
            and needle in out
            and "Error:" in out
        )
        if not ok:
            failures.append(
                f"robkit {' '.join(args)}: exit {r.exit_code}, {type(r.exception).__name__}: {out[-400:]}"
            )
    assert not failures, "\n\n".join(failures)


def test_the_entry_point_prints_no_traceback_and_debug_shows_it(tmp_path, garbage):
    env = {**os.environ, "ROBKIT_HOME": str(tmp_path / "home"), "ROBKIT_OFFLINE": "1"}
    env.pop("ROBKIT_DEBUG", None)
    cmd = [sys.executable, "-m", "robkit.cli", "eval", "knn", str(garbage)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "not a PyTorch checkpoint" in lines[0], (
        r.stderr
    )
    r = subprocess.run(cmd, capture_output=True, text=True, env={**env, "ROBKIT_DEBUG": "1"}, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_an_internal_import_error_is_not_hidden_as_unavailable(monkeypatch):
    import robkit.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "broken", "robkit.no_such_module:cmd")
    monkeypatch.setitem(cli.COMMANDS, "optional", "some_optional_dependency_xyz:cmd")
    with pytest.raises(ModuleNotFoundError):
        cli.main.get_command(None, "broken")
    r = CliRunner().invoke(main, ["optional"])
    assert r.exit_code != 0 and "unavailable" in r.output and "some_optional_dependency_xyz" in r.output


def test_a_catalog_file_name_cannot_leave_the_cache(tmp_path):
    from robkit.teachers import download as dl
    from robkit.utils.files import UnsafePathError

    class Rec(dict):
        name = "evil"

    for bad in ("../../etc/passwd", "/abs/file.pth", "sub/dir.pth", ".."):
        with pytest.raises(UnsafePathError, match="plain file name"):
            dl.cached_file(Rec(file_name=bad, url="file:///x"))
        with pytest.raises(UnsafePathError):
            dl.resolve(Rec(file_name=bad, url="file:///x", sha256=None), download=True, progress=False)
    assert dl.cached_file(Rec(file_name="fine.pth", url="file:///x")) is None
