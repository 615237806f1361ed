"""The machine a figure comes from, and the one timing helper every measurement uses."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU model name from ``/proc/cpuinfo``, else what ``platform`` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: instruction-set flags that change which kernels oneDNN runs (and so speed and bf16 numerics)
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_features(cpuinfo: str | None = None) -> list[str]:
    """Which of :data:`KERNEL_FLAGS` this CPU reports in ``/proc/cpuinfo`` (or the ``cpuinfo`` text
    given); empty where unreadable.
    """
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        for line in text.splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in KERNEL_FLAGS if f in flags]
    except OSError:
        pass
    return []


def machine_line() -> str:
    """One line naming the CPU, its kernel-relevant features and the core count, for logs and reports."""
    feats = cpu_features()
    return f"{cpu_name()}, {os.cpu_count()} cores, {' '.join(feats) if feats else 'no flags read'}"


def best_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call, in seconds."""
    call()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
    return best
