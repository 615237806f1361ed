"""``--precision auto``: chosen per device and network, by measurement where no rule is safe.

* CUDA: bf16 autocast where the GPU supports it, else fp16 with a loss scaler.
* A CPU without native bf16 (no AVX512-BF16 / AMX-BF16): fp32, because bf16 is only emulated.
* A CPU with native bf16: a short timed probe (forward + backward of the run's own student and
  head on its own crop sizes, fp32 against bf16 autocast, interleaved, each leg in the memory
  layout the run would train it in) picks bf16 when it is at least 5 % faster, else fp32. No
  fixed rule held: on an AMD EPYC bf16 trained ResNet-18 faster and MobileNets slower, on an
  Intel Xeon with AMX ResNet-18 ran 25 % slower in bf16 than in fp32 (BENCHMARKS.md).

A probe's result is cached in ``$ROBKIT_HOME/precision.json`` under the CPU model, torch
version, thread count, network and input shapes, so it runs once per machine and network, and
every choice is logged with the figures behind it.

channels_last is turned off for CPU bf16 training of networks with depthwise convolutions
(:func:`channels_last_allowed`): there oneDNN's depthwise backward in channels_last now and
then returned non-finite weight gradients on an AMD EPYC with torch 2.14 (MobileNetV3-Small on
8 px local crops: 2 of 14 short runs diverged at their first steps, 0 of 14 in the contiguous
layout), while fp32 and ResNets were unaffected.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robkit.engine.hardware import cpu_has_fast_bf16, has_depthwise_conv, resolve_precision
from robkit.engine.tasks.base import Online
from robkit.utils.files import atomic_write_json, robkit_home, sha256_json
from robkit.utils.machine import best_seconds, cpu_name

log = logging.getLogger(__name__)

PROBE_ROUNDS = 2  # timed fp32/bf16 pairs after one warm-up each
PROBE_BATCH = 8
# Part of the cache key: a probe whose method changed is not trusted from the cache (2: each leg in
# its run's memory layout; version 1 timed a contiguous network on channels_last inputs).
PROBE_VERSION = 2
# bf16 is chosen only when the probe finds it at least this much faster: a tie within the noise
# of a short probe stays in fp32, which loses no precision.
BF16_MIN_SPEEDUP = 1.05


def _cache_file() -> Path:
    return robkit_home() / "precision.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def probe_cpu_precision(
    online: nn.Module,
    crop_sizes: Sequence[int],
    batch: int = PROBE_BATCH,
    channels_last: bool = False,
    rounds: int = PROBE_ROUNDS,
    bf16_channels_last: bool | None = None,
) -> dict[str, float]:
    """Seconds per forward + backward of a copy of ``online`` on one batch of every crop size,
    in fp32 and under bf16 autocast (measured interleaved, the fastest round of each).

    ``online`` itself is untouched: its copy takes the BatchNorm updates and the gradients, and
    the inputs come from a private generator (the run's random streams are not consumed).
    ``bf16_channels_last`` (default: ``channels_last``) is the layout of the bf16 leg, which a
    run may train differently (:func:`channels_last_allowed`).
    """
    g = torch.Generator().manual_seed(0)
    plain = [torch.randn(batch, 3, s, s, generator=g) for s in crop_sizes]
    cl = {False: channels_last, True: channels_last if bf16_channels_last is None else bf16_channels_last}
    # Each leg runs on its own copy in the memory format the run would train it in: weights and
    # inputs alike (a contiguous network fed channels_last inputs is neither layout's speed).
    nets = {amp: apply_layout(copy.deepcopy(online).train(), cl[amp]) for amp in (False, True)}
    inputs = {
        amp: [v.contiguous(memory_format=torch.channels_last) for v in plain] if cl[amp] else plain
        for amp in (False, True)
    }

    def step(amp: bool) -> Callable[[], None]:
        views, net = inputs[amp], nets[amp]

        def run() -> None:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
            with ctx:
                out = net(views)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            loss = sum(
                o.float().mean() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()
            )
            net.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]  # a tensor: the network has outputs

        return run

    fp32, bf16 = float("inf"), float("inf")
    for _ in range(rounds):  # interleaved, so a slow spell of the machine hits both
        fp32 = min(fp32, best_seconds(step(False), 1))
        bf16 = min(bf16, best_seconds(step(True), 1))
    return {"fp32": fp32, "bf16": bf16}


def apply_layout(net: nn.Module, channels_last: bool) -> nn.Module:
    """``net`` in the layout the trainer's set-up gives a run: its 4-d weights in channels_last or
    not, and every :class:`Online` converting its inputs to match.
    """
    for m in net.modules():
        if isinstance(m, Online):
            m.channels_last = channels_last
    return net.to(memory_format=torch.channels_last) if channels_last else net


def channels_last_allowed(
    requested: bool, precision: str, device: torch.device, model: nn.Module
) -> tuple[bool, str | None]:
    """Whether a run trains ``model`` in channels_last, and why not when it asked for it.

    ``requested`` is the run's own wish (``train.channels_last`` and a convolutional student).
    Refused only for bf16 on a CPU with depthwise convolutions (the module docstring's reason).
    """
    if requested and device.type == "cpu" and precision == "bf16" and has_depthwise_conv(model):
        return False, (
            "channels_last off: bf16 depthwise-convolution gradients in channels_last are not "
            "reliable on CPU (non-finite now and then); the contiguous layout is used instead"
        )
    return requested, None


def choose_precision(
    precision: str,
    device: torch.device,
    online: nn.Module,
    student_name: str,
    crop_sizes: Sequence[int],
    channels_last: bool = False,
    batch: int = PROBE_BATCH,
    cache: Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """The resolved precision of a run and how it was chosen (``{"rule"| "probe": ...}``, logged).

    A named precision is checked (:func:`resolve_precision`) and kept. ``auto`` follows the
    module docstring: a rule on CUDA and on CPUs without native bf16, else a cached probe.
    """
    if precision != "auto":
        return resolve_precision(precision, device), {"rule": "named"}
    if device.type != "cpu" or not cpu_has_fast_bf16():
        chosen, rule = (
            (resolve_precision("auto", device), f"{device.type}: bf16 where supported, else fp16")
            if device.type != "cpu"
            else ("fp32", "CPU without native bf16")
        )
        log.info("precision auto -> %s (%s)", chosen, rule)
        return chosen, {"rule": rule}
    bf16_cl, _ = channels_last_allowed(channels_last, "bf16", device, online)
    key_fields = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "student": student_name,
        "params": sum(p.numel() for p in online.parameters()),
        "crops": list(crop_sizes),
        "batch": batch,
        "channels_last": channels_last,
        "bf16_channels_last": bf16_cl,
        "probe": PROBE_VERSION,
    }
    key = sha256_json(key_fields)[:16]
    path = cache or _cache_file()
    stored = _read_cache(path).get(key)
    if isinstance(stored, dict) and stored.get("choice") in ("fp32", "bf16"):
        log.info(
            "precision auto -> %s (cached probe on %s: fp32 %.1f ms, bf16 %.1f ms per step)",
            stored["choice"],
            key_fields["cpu"],
            1e3 * stored["fp32_s"],
            1e3 * stored["bf16_s"],
        )
        return str(stored["choice"]), {"probe": stored, "cached": True}
    t = probe_cpu_precision(
        online, crop_sizes, batch=batch, channels_last=channels_last, bf16_channels_last=bf16_cl
    )
    choice = "bf16" if t["bf16"] * BF16_MIN_SPEEDUP <= t["fp32"] else "fp32"
    record = {**key_fields, "fp32_s": t["fp32"], "bf16_s": t["bf16"], "choice": choice}
    try:
        data = _read_cache(path)
        data[key] = record
        atomic_write_json(path, data, sort_keys=True)
    except OSError as e:  # an unwritable cache costs a probe next time, nothing else
        log.debug("could not write the precision cache %s: %s", path, e)
    log.info(
        "precision auto -> %s (probe on %s: fp32 %.1f ms, bf16 %.1f ms per step of %s)",
        choice,
        key_fields["cpu"],
        1e3 * t["fp32"],
        1e3 * t["bf16"],
        student_name,
    )
    return choice, {"probe": record, "cached": False}
