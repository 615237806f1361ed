"""Per-step schedules (learning rate, weight decay, EMA momentum) and gradient clipping.

Schedules are precomputed tensors indexed by the global step, as DINO's ``utils.cosine_scheduler``:
a run resumed at step ``s`` gets exactly the values of an uninterrupted run, with no scheduler
state to save.  SSLight (Table 8): linear warm-up over 10 epochs then cosine decay of the LR to
``min_lr``; constant weight decay for LARS, cosine 0.04 -> 0.4 for AdamW; teacher EMA 0.996 -> 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SHORT_RUN_SHARE = 0.5  # the most of a run that an LR warm-up or a head freeze may take (short runs)


def lr_for_batch(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule (Goyal et al. 2017), as DINO and SSLight: ``base_lr * batch / 256``.

    Recipes state ``optim.base_lr`` (and ``optim.start_warmup_lr``) per 256 images; the engine
    multiplies both by ``batch / 256``.  ``optim.min_lr`` is *not* per 256 images: see
    :func:`min_lr_for_batch`.
    """
    return base_lr * batch_size / 256


def min_lr_for_batch(min_lr: float, batch_size: int, min_lr_batch: int | None = None) -> float:
    """The final LR of the cosine for a global ``batch_size``: ``optim.min_lr`` as the official code uses it.

    A recipe's ``min_lr`` is the official final LR, an absolute value at the recipe's (official)
    batch size.  How it follows a different batch size depends on the official code:

    * ``min_lr_batch`` unset (DINO, SSLight, the AdamW RoB recipes): the same value at every batch
      size.  DINO's ``main_dino.py`` scales only the peak (``args.lr * batch / 256``) and passes
      ``args.min_lr`` as is; SSLight's trainer does the same with ``SOLVER.BASE_LR`` and
      ``SOLVER.MIN_LR``; VISSL's AdamW RoB configs do not auto-scale any LR value.
    * ``min_lr_batch`` set (RoB-SwAV): ``min_lr`` belongs to that batch size and scales linearly with
      the batch, ``min_lr * batch / min_lr_batch``.  VISSL's ``auto_lr_scaling`` rescales the cosine
      to the scaled peak while keeping its end/start ratio, so the end value follows the batch too.
    """
    if not min_lr_batch:
        return float(min_lr)
    return min_lr * batch_size / min_lr_batch


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, start_warmup: float = 0.0
) -> Tensor:
    """``[total_steps]`` float64 values: linear warm-up, then a half cosine from ``base`` to ``final``.

    Matches DINO's ``cosine_scheduler``: the warm-up is ``linspace(start_warmup, base, warmup_steps)``
    (it reaches ``base`` on its last step); step ``i`` of the ``n = total - warmup`` cosine steps is
    ``final + (base - final) * (1 + cos(pi * i / n)) / 2``, so the first equals ``base`` and the last
    approaches ``final`` (it equals it only as ``n`` grows).
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got total_steps={total_steps}, "
            f"warmup_steps={warmup_steps}; shorten the warm-up (optim.warmup_epochs) or train longer"
        )
    warm = torch.linspace(start_warmup, base, warmup_steps, dtype=torch.float64)
    n = total_steps - warmup_steps
    i = torch.arange(n, dtype=torch.float64)
    cos = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * i / max(n, 1)))
    return torch.cat([warm, cos])


def clip_gradients(model: nn.Module, max_norm: float, per_parameter: bool = True) -> Tensor:
    """Clip gradients and return the total gradient norm before clipping (0 disables clipping).

    ``per_parameter=True`` is DINO's ``utils.clip_gradients``: each tensor's gradient is scaled to
    norm at most ``max_norm`` on its own (DINO's ``clip_grad 3.0``); ``False`` clips the global norm
    as ``torch.nn.utils.clip_grad_norm_``.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
    total = torch.linalg.vector_norm(norms)
    if max_norm > 0:
        if per_parameter:
            for g, n in zip(grads, norms):
                g.mul_(torch.clamp(max_norm / (n + 1e-6), max=1.0).to(g.dtype))
        else:
            scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(scale.to(g.dtype))
    return total
