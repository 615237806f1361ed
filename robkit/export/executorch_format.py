"""ExecuTorch: ``.pte`` programs lowered to the XNNPACK delegate (optional extra).

int8 uses ExecuTorch's ``XNNPACKQuantizer`` (symmetric, per-channel) through torchao's PT2E
with an annotation filter for the layers that stay float.  ViTs do not lower to one XNNPACK
piece (LayerNorm and SDPA's masking pattern run on portable kernels between delegate calls);
the number of delegate calls is reported so that fragmentation is visible.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robkit.export.backends import Converted, ConvertJob
from robkit.utils.errors import RobkitError


class ExecuTorchMissing(RobkitError, RuntimeError):
    """The optional ExecuTorch package is not installed."""


def require_executorch() -> None:
    """Raise :class:`ExecuTorchMissing` (with how to install it) unless ExecuTorch is importable."""
    try:
        import executorch  # noqa: F401
    except ImportError as e:
        raise ExecuTorchMissing(
            "--format executorch needs the optional ExecuTorch package, which is not installed "
            f"({e}). Install it with `pip install executorch` (1.5.x works with torch 2.14), or export "
            "with --format tflite / onnx / coreml instead."
        ) from None


def xnnpack_quantizer(keep: Callable | None, qat: bool = False) -> Any:
    """``XNNPACKQuantizer`` (symmetric, per-channel int8); ``keep`` is its node filter function. With
    ``qat`` the same configuration as fake-quantisers (:func:`robkit.export.qat.fake_quant_config`:
    histogram-calibrated activation ranges, as the PTQ path has them, rather than XNNPACK's own QAT
    configuration, whose moving-average ranges depend on which calibration batch came first).
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    from robkit.export.qat import fake_quant_config

    config = get_symmetric_quantization_config(is_per_channel=True)
    q = XNNPACKQuantizer().set_global(fake_quant_config(config) if qat else config)
    if keep is not None:
        q.set_filter_function(keep)
    return q


def xnnpack_qat_quantizer(keep: Callable | None) -> Any:
    """:func:`xnnpack_quantizer` for quantisation-aware distillation."""
    return xnnpack_quantizer(keep, qat=True)


def lower(module: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike) -> dict[str, Any]:
    """Export, lower to XNNPACK, write ``path``; returns delegate / portable op counts."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(module, (example,))
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    delegates, portable = 0, 0
    for n in edge.exported_program().graph.nodes:
        if n.op == "call_function":
            if "executorch_call_delegate" in str(n.target):
                delegates += 1
            elif "getitem" not in str(n.target):
                portable += 1
    Path(path).write_bytes(edge.to_executorch().buffer)
    return {"delegate_calls": delegates, "ops_outside_delegates": portable}


class ExecuTorchRunner:
    """ExecuTorch Python runtime; its thread pool is process-wide (set it once, before loading)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        from executorch.runtime import Runtime

        if threads is not None:
            set_threads(threads)
        self.method = Runtime.get().load_program(str(path)).load_method("forward")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The program's first output on the input ``x``."""
        return self.method.execute([torch.from_numpy(np.ascontiguousarray(x))])[0].numpy()

    def run_batches(self, x: np.ndarray) -> np.ndarray:
        """Outputs on ``x`` run one input at a time, concatenated."""
        return np.concatenate([self(x[i : i + 1]) for i in range(len(x))])


def set_threads(n: int) -> bool:
    """Set the pool size if it differs (resetting with programs loaded has crashed the process:
    callers set it before loading anything).
    """
    try:
        from executorch.extension.pybindings import portable_lib as pl
    except ImportError:
        return False
    get = getattr(pl, "_threadpool_get_thread_count", None)
    reset = getattr(pl, "_unsafe_reset_threadpool", None)
    if get is None or reset is None:
        return False
    if get() != n:
        reset(n)
    return True


class ExecuTorchBackend:
    """ExecuTorch (XNNPACK delegate) behind the export protocol (``robkit.export.backends.Backend``).

    A ``.pte`` program has no metadata section: the sidecar card is the file's only metadata.
    """

    format, runtime = "executorch", "executorch"

    def convert(self, job: ConvertJob) -> Converted:
        """Lowered to XNNPACK; int8 through XNNPACK's PT2E quantiser with the mixed-precision plan."""
        from robkit.export.int8 import pt2e_static_int8
        from robkit.export.tflite_format import run_torch_batch1

        require_executorch()
        plan, simulated = None, None
        if job.target.precision == "int8":
            assert job.search_x is not None
            plan, gm, _ = pt2e_static_int8(
                job.module,
                job.target,
                job.example,
                job.cal_x,
                job.search_x,
                job.is_vit,
                quantizer_factory=xnnpack_quantizer,
                fold=True,
                qat=None if job.qat is None else job.qat.for_quantizer(xnnpack_qat_quantizer),
            )
            simulated = run_torch_batch1(gm, job.par_x)
            conversion = lower(gm, job.example, job.out)
        else:
            conversion = lower(job.module, job.example, job.out)
        conversion["runtime"] = "executorch (XNNPACK)"
        return Converted(conversion, plan, simulated)

    def embed(self, path: Path, card: dict[str, Any], labels: list[str] | None) -> bool:
        """Nothing: ``.pte`` files carry no metadata (the sidecar card has it)."""
        return False

    def run(
        self, path: Path, job: ConvertJob, converted: Converted
    ) -> tuple[np.ndarray, str, dict[str, Any]]:
        """The program in ExecuTorch's runtime on the parity images."""
        return np.asarray(ExecuTorchRunner(path).run_batches(job.par_x.numpy())), "", {}

    def runner(self, path: Path, threads: int) -> ExecuTorchRunner:
        """The program loaded with the process-wide pool at ``threads`` threads."""
        require_executorch()
        return ExecuTorchRunner(path, threads)

    def read_back(self, path: Path) -> dict[str, Any]:
        """Nothing: see the class docstring."""
        return {}
