"""Parity: does the exported file compute what PyTorch computes?

After every export the file runs in its own runtime on held-out real images and is compared
with eager PyTorch (and, for int8, with the quantise-simulated PyTorch model): mean cosine of
outputs per sample, max absolute difference, and top-1 agreement for classifiers.  Out-of-bounds
numbers raise :class:`ParityError` with the numbers; the file is kept and its card says failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from robkit.utils.errors import RobkitError


class ParityError(RobkitError, RuntimeError):
    """The exported file does not match PyTorch within the target's thresholds."""

    def __init__(self, message: str, report: ParityReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ParityReport:
    """Parity of an exported file's outputs with PyTorch's: metrics, thresholds and any failures."""

    runtime: str
    images: int
    cosine: float
    min_cosine_sample: float
    max_abs: float
    top1_agreement: float | None = None
    vs_simulated: dict[str, float] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (floats rounded to 6 places)."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}

    def summary(self) -> str:
        """One line of the headline metrics for logs."""
        s = f"cosine {self.cosine:.5f} (min {self.min_cosine_sample:.5f}), max|Δ| {self.max_abs:.3g}"
        if self.top1_agreement is not None:
            s += f", top-1 agreement {self.top1_agreement:.3f}"
        if self.vs_simulated:
            s += f"; vs quantise-simulated PyTorch cosine {self.vs_simulated['cosine']:.5f}"
        return s + f" on {self.images} held-out images ({self.runtime})"


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x).float().flatten(1)


def compare(
    out: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    *,
    runtime: str,
    classifier: bool,
    thresholds: dict[str, float],
    simulated: np.ndarray | torch.Tensor | None = None,
    note: str = "",
) -> ParityReport:
    """Metrics of ``out`` against ``ref`` (both ``[N, D]``) checked against ``thresholds``."""
    o, r = _as_tensor(out).double(), _as_tensor(ref).double()
    if o.shape != r.shape:
        raise ParityError(f"exported output shape {tuple(o.shape)} differs from PyTorch's {tuple(r.shape)}")
    cos = F.cosine_similarity(o, r, dim=1)
    rep = ParityReport(
        runtime=runtime,
        images=len(o),
        cosine=float(cos.mean()),
        min_cosine_sample=float(cos.min()),
        max_abs=float((o - r).abs().max()),
        note=note,
        thresholds={k: float(v) for k, v in thresholds.items() if k.startswith("min_")},
    )
    if classifier:
        rep.top1_agreement = float((o.argmax(1) == r.argmax(1)).double().mean())
    if simulated is not None:
        s = _as_tensor(simulated).double()
        rep.vs_simulated = {
            "cosine": float(F.cosine_similarity(o, s, dim=1).mean()),
            "max_abs": float((o - s).abs().max()),
            "simulated_vs_fp32_cosine": float(F.cosine_similarity(s, r, dim=1).mean()),
        }
    if not np.isfinite(rep.cosine):
        rep.failures.append("non-finite outputs")
    elif rep.cosine < thresholds.get("min_cosine", 0.0):
        rep.failures.append(f"mean cosine {rep.cosine:.5f} < {thresholds['min_cosine']}")
    if rep.top1_agreement is not None and rep.top1_agreement < thresholds.get("min_top1", 0.0):
        rep.failures.append(f"top-1 agreement {rep.top1_agreement:.3f} < {thresholds['min_top1']}")
    rep.passed = not rep.failures
    return rep
