"""The machine a figure comes from, and the one timing helper every measurement uses."""

from __future__ import annotations

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


def best_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call, in seconds."""
    call()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
    return best
