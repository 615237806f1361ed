"""What this machine can do: bf16 support, core counts, accelerator — detected, never assumed."""

from __future__ import annotations

import contextlib
import os
from functools import cache

import torch

from robkit.utils.errors import RecipeError


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo``; empty where it cannot be read or has no flags line."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AMX-BF16 or AVX512-BF16); else bf16 only emulates."""
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def default_device() -> torch.device:
    """CUDA where available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def has_depthwise_conv(model: torch.nn.Module | None) -> bool:
    """True if ``model`` (``None``: False) has a depthwise ``Conv2d`` (``groups == in_channels > 1``)."""
    return model is not None and any(
        isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules()
    )


def resolve_precision(precision: str, device: torch.device, model: torch.nn.Module | None = None) -> str:
    """``auto`` → bf16 on CUDA with bf16, fp16 on older CUDA; on a CPU, bf16 where it runs natively
    unless the model is built from depthwise convolutions (MobileNets), whose bf16 kernels train
    slower than fp32 on CPU (BENCHMARKS.md, training throughput); else fp32.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise RecipeError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise RecipeError("fp16 training needs a CUDA device; use bf16 or fp32 on a CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() and not has_depthwise_conv(model) else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision: bf16 or fp16, ``None`` for fp32 (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


TEACHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def teacher_autocast(setting: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context a frozen teacher runs under (``rob.teacher_precision``).

    ``auto``: bf16 on a CUDA device that runs it (a frozen network loses nothing a student can
    see: the drift is bounded in ``tests/test_teacher_precision.py``), else the engine's own
    autocast (no change of context). ``fp32`` turns autocast off for the teacher; ``bf16`` /
    ``fp16`` force that dtype (fp16 on CUDA only).
    """
    if setting not in TEACHER_PRECISIONS:
        raise RecipeError(
            f"rob.teacher_precision must be one of {', '.join(TEACHER_PRECISIONS)}, got {setting!r}"
        )
    if setting == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    if setting == "fp32":
        return torch.autocast(device.type, enabled=False)
    if setting == "fp16" and device.type != "cuda":
        raise RecipeError("rob.teacher_precision=fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if setting == "bf16" else torch.float16)


def resolve_teacher_precision(setting: str, device: torch.device, engine_precision: str) -> str:
    """What :func:`teacher_autocast` amounts to under the engine's resolved ``engine_precision``."""
    teacher_autocast(setting, device)  # validates the setting for this device
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return engine_precision


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
