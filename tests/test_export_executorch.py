"""ExecuTorch (optional extra): .pte round trip through XNNPACK, and the error when it is missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from export_helpers import MEAN, RES, STD, cos, normalised, trained_student

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


@pytest.mark.skipif(not HAVE_ET, reason="executorch is not installed (optional extra)")
def test_xnnpack_int8_with_qat_runs_in_the_executorch_runtime(tmp_path):
    """``--qat`` through XNNPACK's QAT quantiser: the .pte file, run by ExecuTorch's own runtime, computes
    what its int8-simulated graph computes and stays close to the fp32 student; the card says what QAT did."""
    from executorch.runtime import Runtime

    from robkit.export.exporter import export_model
    from robkit.export.qat import QATSettings

    student = trained_student()
    res = export_model(
        student,
        get_target("executorch-xnnpack-int8"),
        tmp_path / "m",
        resolution=RES,
        calibration_images=32,
        parity_images=16,
        meta={"normalization": {"mean": MEAN, "std": STD}, "resolution": RES},
        qat=QATSettings(steps=8, images=96, batch_size=16, lr=1e-4),
    )
    q = res.card["quantization"]
    assert q["qat"]["steps"] == 8 and q["qat"]["graph"] in ("qat", "ptq")
    assert 0 < q["qat"]["cosine_before"] <= 1 and 0 < q["qat"]["cosine_after"] <= 1
    assert res.card["parity"]["cosine"] >= 0.98
    assert res.card["parity"]["vs_simulated"]["cosine"] > 0.99  # the file computes what the graph computes
    method = Runtime.get().load_program(str(res.path)).load_method("forward")
    u8, _ = load_images("fashion-mnist", "test", 8, RES, offset=80)
    x = normalised(u8)
    out = np.concatenate([method.execute([x[i : i + 1]])[0].numpy() for i in range(8)])
    with torch.no_grad():
        ref = student(x)
    assert cos(out, ref) > 0.98


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
