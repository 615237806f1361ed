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

from robkit.utils.errors import RobkitError


class ExecuTorchMissing(RobkitError, RuntimeError):
    pass


def require_executorch() -> None:
    try:
        import executorch  # noqa: F401
    except ImportError as e:
        raise ExecuTorchMissing(
            "--format executorch needs the optional ExecuTorch package, which is not installed "
            f"({e}). Install it with `pip install executorch` (1.5.x works with torch 2.14), or export "
            "with --format tflite / onnx / coreml instead."
        ) from None


def xnnpack_quantizer(keep: Callable | None):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    if keep is not None:
        q.set_filter_function(keep)
    return q


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
        return self.method.execute([torch.from_numpy(np.ascontiguousarray(x))])[0].numpy()

    def run_batches(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self(x[i : i + 1]) for i in range(len(x))])


def set_threads(n: int) -> bool:
    """Set the pool size if it differs (resetting with programs loaded has crashed the process:
    callers set it before loading anything)."""
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
