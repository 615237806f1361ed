"""Shared multi-crop machinery of the teacher-free objectives (DINO, SwAV, MoCo-v2*).

Batch layout: every tensor is *crop-major* -- row ``r`` is crop ``r // B`` of image ``r % B``,
the ``n_global`` global crops first, then the local crops -- which is what a multi-crop wrapper
produces when it runs each resolution as one batch and concatenates in list order.

Pair terms and their weighting follow SSLight (Tan et al., "Effective Self-supervised
Pre-training on Low-compute Networks without Distillation", sec. 3.3.4):

* eq. (2), the ordinary multi-crop loss: ``L = (L_gg + L_gl) / (P_gg + P_gl)``, i.e. the uniform
  mean over every pair term (what official DINO and SwAV compute);
* eq. (3), the re-balanced loss: ``L = alpha * L_gg / P_gg + (1 - alpha) * L_gl / P_gl``.

As in SSLight's code the ``P`` are the numbers of terms actually added, not a formula, so the
same weighting serves DINO (teacher globals x other crops), SwAV (assignment crops x other
crops) and MoCo-v2* (one global query chunk and ``n_local`` local ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# (target crop, predicting crop, is_global_global)
PairTerm = tuple[int, int, bool]


def balanced_alpha(n_global: int, n_local: int) -> float:
    """The alpha of eq. (3) that reproduces the uniform mean of eq. (2): ``P_gg / (P_gg + P_gl)``.

    ``P_gg = N_g (N_g - 1)`` and ``P_gl = N_g N_l`` (SSLight sec. 3.3.4); 2 + 6 crops give
    2/14 = 0.142857, the value of SSLight's CNN baseline yamls.  (MoCo-v2* has one global query
    chunk, so its equivalent is ``1 / (1 + n_local)``.)
    """
    p_gg, p_gl = n_global * (n_global - 1), n_global * n_local
    if p_gg + p_gl == 0:
        raise ValueError(
            f"no view pairs with n_global={n_global}, n_local={n_local}; multi-crop losses need at "
            "least 2 crops with at least one of them global"
        )
    return p_gg / (p_gg + p_gl)


def cross_view_pairs(target_crops: Sequence[int], n_crops: int, n_global: int) -> list[PairTerm]:
    """Every ``(q, v, is_gg)`` with ``q`` a target crop and ``v != q`` any crop, target-major.

    A pair is global-global only when both crop indices are below ``n_global`` (as SSLight's
    ``NMB_CROPS[0]`` test); everything else is global-local.
    """
    return [(q, v, q < n_global and v < n_global) for q in target_crops for v in range(n_crops) if v != q]


def pair_weights(n_gg: int, n_gl: int, alpha: float | None, global_only: bool = False) -> tuple[float, float]:
    """Per-term weights ``(w_gg, w_gl)`` so that the loss is ``w_gg * sum_gg + w_gl * sum_gl``.

    ``alpha=None`` gives the uniform mean of eq. (2); a float gives eq. (3); ``global_only``
    keeps the global-global mean only (SSLight ``DINO.GLOBAL_ONLY`` / ``MOCO.GLOBAL_ONLY``).
    Eq. (3) is undefined when one group has no terms (e.g. ``n_local=0``); the empty group is then
    dropped and the loss is the mean of the terms that exist -- the same value ``alpha=None``
    gives -- instead of SSLight's 0/0.
    """
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha must lie in [0, 1] (SSLight uses 0.4), got {alpha}; use null for the uniform mean"
        )
    if global_only:
        if n_gg == 0:
            raise ValueError("global_only needs at least one global-global pair, i.e. n_global >= 2")
        return 1.0 / n_gg, 0.0
    if n_gg + n_gl == 0:
        raise ValueError("no pair terms: the loss needs at least two crops")
    if alpha is None or n_gg == 0 or n_gl == 0:
        return 1.0 / (n_gg + n_gl), 1.0 / (n_gg + n_gl)
    return alpha / n_gg, (1.0 - alpha) / n_gl


def combine_terms(
    terms_gg: list[Tensor], terms_gl: list[Tensor], alpha: float | None, global_only: bool = False
) -> tuple[Tensor, dict[str, Any]]:
    """Weighted loss from per-pair terms, plus the logged group means (detached 0-d tensors; NaN for an
    empty group).
    """
    w_gg, w_gl = pair_weights(len(terms_gg), len(terms_gl), alpha, global_only)
    zero = (terms_gg or terms_gl)[0].new_zeros(())
    sum_gg = torch.stack(terms_gg).sum() if terms_gg else zero
    sum_gl = torch.stack(terms_gl).sum() if terms_gl else zero
    loss = w_gg * sum_gg + w_gl * sum_gl
    # Detached device tensors, not floats: reading them waits for the device, which the engine
    # does once per log window rather than at every step.
    parts: dict[str, Any] = {
        "loss_gg": sum_gg.detach() / len(terms_gg) if terms_gg else float("nan"),
        "loss_gl": sum_gl.detach() / len(terms_gl) if terms_gl else float("nan"),
    }
    return loss, parts


def batch_size_of(rows: int, n_crops: int, what: str) -> int:
    """Images per crop of a crop-major tensor with ``rows`` rows holding ``n_crops`` crops."""
    if n_crops < 1 or rows % n_crops != 0 or rows == 0:
        raise ValueError(
            f"{what} has {rows} rows, which is not a positive multiple of its {n_crops} crops; tensors "
            "must be crop-major [n_crops * B, ...] (globals first, then locals) -- check n_global/n_local"
        )
    return rows // n_crops


def check_rows(x: Tensor, expected: int, what: str, hint: str) -> None:
    """Raise ``ValueError`` (naming ``what`` and ``hint``) unless ``x`` is 2-D with ``expected`` rows."""
    if x.dim() != 2 or x.shape[0] != expected:
        raise ValueError(f"{what} must be 2-D with {expected} rows ({hint}), got shape {tuple(x.shape)}")


def compute_dtype(x: Tensor) -> Tensor:
    """Half-precision (AMP) outputs upcast to float32: softmaxes over thousands of prototypes and
    the exp() of Sinkhorn lose the small probabilities in fp16.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
