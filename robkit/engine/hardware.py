"""What this machine can do: bf16 support, core counts, accelerator — detected, never assumed."""

from __future__ import annotations

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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
