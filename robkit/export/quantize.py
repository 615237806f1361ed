"""int8 that keeps its accuracy: per-layer sensitivity and mixed int8/float layer selection.

Plain post-training int8 breaks MobileNetV3 (cosine 0.70–0.80 to fp32 with every tool we
measured: hard-swish, squeeze-excitation and depthwise layers have activation ranges that one
8-bit scale cannot cover) and ViTs when LayerNorm/Softmax/GELU/attention are quantised.  The
fix used here is the standard mixed-precision PTQ recipe:

1. *Sensitivity*: quantise one Conv/Linear layer at a time in a PyTorch simulation (weights
   symmetric per output channel, input activation asymmetric per tensor from calibration
   min/max, the schemes of ORT QDQ / PT2E) and measure the cosine of the model output to fp32
   on calibration images.  Low cosine = sensitive.
2. *Search*: quantise everything, evaluate the real backend's quantised model; while it misses
   the target's threshold, keep the next most sensitive layers in float (1, 2, 4, 8, … of them).
3. For ViTs only Conv/Linear (ONNX Conv/MatMul/Gemm) are quantised at all: LayerNorm, Softmax
   and GELU stay float (quantising them collapses ViT-Tiny to cosine 0.41–0.62).

The layers left in float and why are returned so that the card can say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZABLE = (nn.Conv2d, nn.Linear)


@dataclass
class LayerSensitivity:
    """Cosine to fp32 when only ``name`` is int8 (1.0 = harmless)."""

    name: str
    cosine: float


@dataclass
class MixedPrecisionPlan:
    """Which layers stayed float, why, and what the search measured."""

    float_layers: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # [{"float_layers": k, "cosine": c}]
    met: bool = True
    quantized_ops: str = "all supported ops"

    def as_dict(self) -> dict:
        return {
            "float_layers": self.float_layers,
            "reasons": self.reasons,
            "search": self.history,
            "met_threshold_on_calibration": self.met,
            "quantized_ops": self.quantized_ops,
        }


def quantizable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel (axis 0), the weight scheme of every backend used here."""
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    shape = (-1,) + (1,) * (w.dim() - 1)
    return (w / scale.view(shape)).round().clamp(-127, 127) * scale.view(shape)


def fake_quant_act(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Asymmetric 8-bit per tensor over the calibrated range (which always includes 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    zero = round(-lo / scale)
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero).mul(scale)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the cosine between rows (the parity metric)."""
    return float(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean())


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module, calib: torch.Tensor, layers: list[str] | None = None, batch: int = 16
) -> list[LayerSensitivity]:
    """Per-layer int8 sensitivity of ``model`` on ``calib`` inputs, most sensitive first."""
    model = model.eval()
    modules = dict(model.named_modules())
    layers = layers if layers is not None else quantizable_layers(model)
    ranges: dict[str, list[float]] = {n: [float("inf"), float("-inf")] for n in layers}

    def observe(name: str):
        def hook(_m, args):
            r = ranges[name]
            r[0], r[1] = min(r[0], float(args[0].min())), max(r[1], float(args[0].max()))

        return hook

    def run() -> torch.Tensor:
        return torch.cat([model(calib[i : i + batch]) for i in range(0, len(calib), batch)])

    handles = [modules[n].register_forward_pre_hook(observe(n)) for n in layers]
    try:
        ref = run()
    finally:
        for h in handles:
            h.remove()

    out = []
    for name in layers:
        mod = modules[name]
        lo, hi = ranges[name]
        w = mod.weight.data.clone()
        mod.weight.data.copy_(fake_quant_weight(w))
        h = mod.register_forward_pre_hook(lambda _m, args, lo=lo, hi=hi: (fake_quant_act(args[0], lo, hi),))
        try:
            out.append(LayerSensitivity(name, cosine(run(), ref)))
        finally:
            h.remove()
            mod.weight.data.copy_(w)
    return sorted(out, key=lambda s: s.cosine)


def search_float_layers(
    ranking: list[LayerSensitivity],
    evaluate: Callable[[list[str]], float],
    min_cosine: float,
    margin: float = 0.005,
    max_float_fraction: float = 0.5,
) -> MixedPrecisionPlan:
    """Keep the fewest most-sensitive layers in float so the real quantised model meets ``min_cosine``.

    ``evaluate(float_layers)`` builds and runs the backend's quantised model (calibration
    images) and returns its cosine to fp32.  ``margin`` guards the held-out parity check.
    """
    plan = MixedPrecisionPlan()
    limit = max(1, int(len(ranking) * max_float_fraction))
    steps, k = [0], 1
    while k < limit:
        steps.append(k)
        k *= 2
    steps.append(limit)
    best: tuple[float, int] = (-1.0, 0)
    for k in dict.fromkeys(steps):
        c = evaluate([s.name for s in ranking[:k]])
        plan.history.append({"float_layers": k, "cosine": round(c, 5)})
        if c > best[0]:
            best = (c, k)
        if c >= min_cosine + margin:
            best = (c, k)
            break
    else:
        plan.met = False
    k = best[1]
    plan.float_layers = [s.name for s in ranking[:k]]
    plan.reasons = {
        s.name: f"int8 alone drops output cosine to {s.cosine:.4f} (rank {i + 1} of {len(ranking)} by sensitivity)"
        for i, s in enumerate(ranking[:k])
    }
    return plan


def module_path(node) -> str:
    """Innermost module path of an FX node (``nn_module_stack`` from torch.export), '' if none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self__.", "")


def module_type(node) -> type | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    t = list(stack.values())[-1][1]
    return t if isinstance(t, type) else None


def node_filter(float_layers: list[str], model: nn.Module, only_conv_linear: bool) -> Callable:
    """PT2E annotation filter: False for nodes inside a float layer (or, for ViTs, outside Conv/Linear)."""
    excluded = set(float_layers)
    types = {n: type(m) for n, m in model.named_modules()}

    def keep(n) -> bool:
        path = module_path(n)
        if any(path == e or path.startswith(e + ".") for e in excluded):
            return False
        if only_conv_linear:
            return issubclass(types.get(path, nn.Module), QUANTIZABLE)
        return True

    return keep


def bn_to_conv(program: torch.export.ExportedProgram) -> dict[str, str]:
    """BatchNorm module path -> the Conv2d path it follows (converters fuse BN into that conv)."""
    out = {}
    for n in program.graph.nodes:
        if n.op == "call_function" and "batch_norm" in str(n.target) and n.args:
            src = n.args[0]
            if hasattr(src, "target") and "conv" in str(src.target):
                out[module_path(n)] = module_path(src)
    return out
