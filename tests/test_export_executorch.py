"""ExecuTorch (optional extra): .pte round trip through XNNPACK, and the error when it is missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from export_helpers import MEAN, RES, STD, normalised

from robkit.export.images import load_images, reestimate_batchnorm
from robkit.export.targets import get_target

HAVE_ET = importlib.util.find_spec("executorch") is not None


@pytest.mark.skipif(not HAVE_ET, reason="executorch is not installed (optional extra)")
def test_xnnpack_fp32_roundtrip(tmp_path):
    from executorch.runtime import Runtime

    from robkit.export.exporter import export_model
    from robkit.models.students import build_student

    torch.manual_seed(0)
    student = build_student("resnet18")
    u8, _ = load_images("fashion-mnist", "train", 32, RES, offset=3000)
    reestimate_batchnorm(student, normalised(u8))
    res = export_model(
        student,
        get_target("executorch-xnnpack-fp32"),
        tmp_path / "m",
        parity_images=8,
        meta={"normalization": {"mean": MEAN, "std": STD}, "resolution": RES},
    )
    assert res.card["conversion"]["delegate_calls"] == 1  # a CNN lowers to one XNNPACK piece
    method = Runtime.get().load_program(str(res.path)).load_method("forward")
    u8, _ = load_images("fashion-mnist", "test", 4, RES, offset=50)
    x = normalised(u8)
    out = np.concatenate([method.execute([x[i : i + 1]])[0].numpy() for i in range(4)])
    with torch.no_grad():
        np.testing.assert_allclose(out, student(x).numpy(), rtol=1e-3, atol=1e-3)


def test_missing_executorch_says_how_to_install(monkeypatch):
    import builtins

    from robkit.export.executorch_format import ExecuTorchMissing, require_executorch

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "executorch" or name.startswith("executorch."):
            raise ImportError("No module named 'executorch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ExecuTorchMissing, match="pip install executorch"):
        require_executorch()
