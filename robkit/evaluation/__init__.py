"""Evaluation on frozen features: weighted kNN, linear probe and low-shot logistic regression.

``evaluate`` (in :mod:`robkit.evaluation.api`) runs them on a checkpoint or module in one call.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate"]


def __getattr__(name: str) -> Any:
    # Lazy so that importing the probe (e.g. from export) does not pull in data loading code.
    if name == "evaluate":
        from robkit.evaluation.api import evaluate

        return evaluate
    raise AttributeError(f"module 'robkit.evaluation' has no attribute {name!r}")
