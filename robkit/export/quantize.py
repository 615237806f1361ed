"""int8 that keeps its accuracy: per-layer sensitivity and mixed int8/float layer selection.

Plain post-training int8 breaks MobileNetV3 (cosine 0.70–0.80 to fp32 with every tool we
measured: hard-swish, squeeze-excitation and depthwise layers have activation ranges that one
8-bit scale cannot cover) and ViTs when LayerNorm/Softmax/GELU/attention are quantised.  The
fix used here is the standard mixed-precision PTQ recipe:

1. *Sensitivity*, two kinds:
   - ONNX (only Conv/MatMul/Gemm are quantised there): quantise one Conv/Linear layer at a time
     in a PyTorch simulation (weights symmetric per output channel, input activation
     asymmetric per tensor from calibration min/max, the schemes of ORT QDQ) and measure the
     cosine of the model output to fp32.  Low cosine = sensitive.
   - PT2E (TFLite, ExecuTorch), where every supported op is quantised: quantise and calibrate
     the whole graph *once*, then, module by module, leave only that module's quantise/dequantise
     pairs active and measure the output cosine.  Hard-swish outputs, squeeze-excitation
     products, residual sums and the pooled embedding are ranked alongside the convolutions: on
     MobileNetV3 much of the damage is outside Conv/Linear, so a Conv/Linear-only ranking cannot
     repair it.  (Ranking by the error each pair adds to its own tensor was tried and is far
     worse: it ignores how much the network amplifies the error downstream.)
2. *Search*: quantise everything and score the quantised model on held-out calibration images
   (ONNX: onnxruntime's file; PT2E: the calibrated graph with the float modules' quantise/
   dequantise pairs removed, the very graph the file is converted from); while it misses the
   target's threshold, keep the next most sensitive units in float (1, 2, 4, 8, … of them),
   then bisect between the last miss and the first hit for the fewest float units.
3. For ViTs only Conv/Linear (ONNX Conv/MatMul/Gemm) are quantised at all: LayerNorm, Softmax
   and GELU stay float (quantising them collapses ViT-Tiny to cosine 0.41–0.62).

The layers left in float and why are returned so that the card can say so.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZABLE = (nn.Conv2d, nn.Linear)


@dataclass
class LayerSensitivity:
    """Cosine to fp32 when only ``name`` is int8 (1.0 = harmless)."""

    name: str
    cosine: float

    def reason(self, rank: int, total: int) -> str:
        """Why the layer stays float, for the card (its cosine and its sensitivity rank)."""
        return f"int8 alone drops output cosine to {self.cosine:.4f} (rank {rank} of {total} by sensitivity)"


@dataclass
class MixedPrecisionPlan:
    """Which layers stayed float, why, and what the search measured."""

    float_layers: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # [{"float_layers": k, "cosine": c}]
    met: bool = True
    quantized_ops: str = "all supported ops"
    qat: dict[str, Any] | None = None  # quantisation-aware distillation: settings and what it measured

    def as_dict(self) -> dict:
        """The plan as the card's JSON record."""
        out = {
            "float_layers": self.float_layers,
            "reasons": self.reasons,
            "search": self.history,
            "met_threshold_on_calibration": self.met,
            "quantized_ops": self.quantized_ops,
        }
        if self.qat is not None:
            out["qat"] = self.qat
        return out


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d and Linear modules of ``model``, in module order."""
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
        def hook(_m, args: tuple[torch.Tensor, ...]):
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
    max_float_fraction: float = 1.0,
) -> MixedPrecisionPlan:
    """Keep the fewest most-sensitive layers in float so the real quantised model meets ``min_cosine``.

    ``evaluate(float_layers)`` builds and runs the backend's quantised model (calibration
    images) and returns its cosine to fp32; the caller has already found that no float layer
    misses.  ``margin`` guards the held-out parity check.  Costs about ``2·log2(k)`` evaluations
    for ``k`` float layers.
    """
    plan = MixedPrecisionPlan()
    goal = min_cosine + margin
    names = [s.name for s in ranking]
    limit = max(1, math.ceil(len(ranking) * max_float_fraction))
    tried: dict[int, float] = {}

    def score(k: int) -> float:
        if k not in tried:
            tried[k] = evaluate(names[:k])
            plan.history.append({"float_layers": k, "cosine": round(tried[k], 5)})
        return tried[k]

    # doubling: the first k that meets the goal, and the last one that did not
    lo, hi, k = 0, None, 1
    while hi is None:
        k = min(k, limit)
        if score(k) >= goal:
            hi = k
        elif k == limit:
            break
        else:
            lo, k = k, k * 2
    if hi is None:
        plan.met = False
        best = max(tried, key=lambda j: (tried[j], -j))
    else:
        # bisect (to within 1/8 of the float count) for the fewest float units that still meet it
        while hi - lo > max(1, hi // 8):
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if score(mid) >= goal else (mid, hi)
        best = hi
    plan.float_layers = names[:best]
    plan.reasons = {s.name: s.reason(i + 1, len(ranking)) for i, s in enumerate(ranking[:best])}
    return plan


def module_path(node: torch.fx.Node) -> str:
    """Innermost module path of an FX node (``nn_module_stack`` from torch.export), '' if none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self__.", "")


def module_type(node: torch.fx.Node) -> type | None:
    """Innermost module class of an FX node (``nn_module_stack`` from torch.export), None if none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    t = list(stack.values())[-1][1]
    return t if isinstance(t, type) else None


def node_filter(float_layers: list[str], model: nn.Module, only_conv_linear: bool) -> Callable:
    """PT2E annotation filter: False for nodes inside a float layer (or, for ViTs, outside Conv/Linear)."""
    excluded = set(float_layers)
    types = {n: type(m) for n, m in model.named_modules()}

    def keep(n: torch.fx.Node) -> bool:
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


def _is_quantize(n: Any) -> bool:
    t = str(n.target)
    return n.op == "call_function" and ".quantize_per_" in t and "dequantize" not in t


def _is_dequantize(n: Any) -> bool:
    return n.op == "call_function" and ".dequantize_per_" in str(n.target)


def _unit_of(q: Any) -> str:
    """The module a quantise node belongs to: its producer's, or for parameters and graph inputs
    (which have none) the module of its first consumer.
    """
    src = q.args[0]
    path = module_path(src) if src.op == "call_function" else ""
    if not path:
        for dq in q.users:
            for user in dq.users:
                path = module_path(user)
                if path:
                    break
    return path


class _PartialQuant(torch.fx.Interpreter):
    """Runs a PT2E-converted graph with only the quantise/dequantise pairs of ``enabled`` units active;
    every other pair passes its float input through.
    """

    inputs: dict[str, Any]

    def __init__(self, gm: torch.fx.GraphModule, unit: dict[str, str], enabled: set[str]) -> None:
        super().__init__(gm)
        self.unit, self.enabled, self.inputs = unit, enabled, {}

    def run_node(self, n: Any) -> Any:
        """The node's value, or for a disabled pair's dequantise node the float input of its quantise node."""
        if _is_quantize(n):
            self.inputs[n.name] = self.env[n.args[0]]
        elif _is_dequantize(n) and _is_quantize(n.args[0]) and self.unit[n.args[0].name] not in self.enabled:
            return self.inputs[n.args[0].name]
        return super().run_node(n)


@torch.no_grad()
def graph_sensitivity(
    gm: torch.fx.GraphModule, calib: torch.Tensor, reference: torch.Tensor
) -> list[LayerSensitivity]:
    """Per-module int8 sensitivity inside a PT2E-converted graph (``fold_quantize=False``).

    A module's units are the quantise→dequantise pairs of its outputs and weights (graph inputs
    count for their first consumer).  For each module, only its pairs are left active, with the
    scales calibrated for the whole graph, and the cosine of the output to ``reference`` (fp32 on
    ``calib``) is measured: the damage int8 does there including how the network amplifies it.
    ``calib`` runs one sample at a time (PT2E graphs keep the example's batch size).  Most
    sensitive first; modules without a path (graph glue) are left out, they cannot be excluded.
    """
    unit = quantized_units(gm)
    out = []
    for name in sorted({u for u in unit.values() if u}):
        run = _PartialQuant(gm, unit, {name})
        y = torch.cat([run.run(calib[i : i + 1]) for i in range(len(calib))])
        out.append(LayerSensitivity(name, cosine(y, reference)))
    return sorted(out, key=lambda s: s.cosine)


def quantized_units(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Quantise node name -> the module path it is attributed to."""
    return {n.name: _unit_of(n) for n in gm.graph.nodes if _is_quantize(n)}


def strip_quantization(gm: torch.fx.GraphModule, float_layers: list[str]) -> torch.fx.GraphModule:
    """A copy of a PT2E-converted graph (``fold_quantize=False``) with the quantise/dequantise pairs of
    ``float_layers`` removed, so those modules compute (and hand on) float values; the scales of
    every other pair stay those calibrated for the whole graph.
    """
    out = copy.deepcopy(gm)
    excluded = set(float_layers)
    for n in list(out.graph.nodes):
        if _is_quantize(n) and _unit_of(n) in excluded:
            for dq in [u for u in n.users if _is_dequantize(u)]:
                dq.replace_all_uses_with(n.args[0])
                out.graph.erase_node(dq)
            if not n.users:
                out.graph.erase_node(n)
    # An op whose activation input or output is now float computes in float: give it its float
    # weights too (a float op with int8 weights is neither what the search meant nor something
    # every delegate runs: XNNPACK leaves it to a portable kernel ExecuTorch does not ship).
    for n in list(out.graph.nodes):
        if _is_dequantize(n) and _is_quantize(n.args[0]) and n.args[0].args[0].op == "get_attr":
            for user in list(n.users):
                if not _runs_int8(user, n):
                    user.replace_input_with(n, n.args[0].args[0])
    out.graph.eliminate_dead_code()
    out.graph.lint()
    out.recompile()
    return out


def _runs_int8(op: torch.fx.Node, weight: torch.fx.Node) -> bool:
    """Whether ``op`` (a Conv/Linear reading the dequantised ``weight``) still has an int8 input and
    an int8 output, the latter directly or after one fused activation (conv → relu → quantise).
    """
    act = op.args[0] if op.args else None
    if act is weight or not (hasattr(act, "op") and _is_dequantize(act)):
        return False
    return any(_is_quantize(u) or any(_is_quantize(v) for v in u.users) for u in op.users)


def fold_weight_quantization(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Pre-compute the int8 weights (what ``convert_pt2e(fold_quantize=True)`` does), for lowerings
    that expect folded weights (ExecuTorch's XNNPACK partitioner).
    """
    from torchao.quantization.pt2e.constant_fold import constant_fold
    from torchao.quantization.pt2e.quantize_pt2e import _quant_node_constraint

    constant_fold(gm, _quant_node_constraint)
    return gm


def copy_program_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """A private, mutable copy of an exported program's module (PT2E preparation edits it in place)."""
    return copy.deepcopy(program.module())


@torch.no_grad()
def calibrate_histograms(gm: nn.Module, batches: Sequence[torch.Tensor]) -> int:
    """Run ``gm``'s observers over ``batches`` with every histogram's range fixed first; returns how
    many histogram observers were primed.

    A ``HistogramObserver`` re-bins its whole histogram whenever a call widens its range (torchao's
    ``_combine_histograms`` spreads each old bin over the new ones), so when calibration images come
    one (or a few) at a time, as PT2E post-training int8 feeds them at batch 1 and 224 px QAT in
    slices, the histogram its clipping search works on depends on the order and the split of the
    calls. Here calibration runs twice: a float pass (every fake-quantiser and histogram observer
    replaced by the identity that records its input's min and max) fixes each histogram's range to
    the global one, then the observing pass counts every value into bins that no longer move, so one
    call or many give the same post-training histograms. QAT's fake-quantisers observe with
    fake-quantisation on, so there a layer's histogram still sees its inputs rounded by the ranges
    known so far (observing float activations instead started the demo student's QAT at held-out
    cosine 0.952 against 0.977, and ended 300 steps at 0.977 against 0.989).

    Measured (all-int8 post-training cosine on held-out training images, 64 calibration images): an
    untrained MobileNetV3-Large at 224 px 0.878 -> 0.897, an untrained MobileNetV3-Small at 32 px
    0.829 -> 0.838; trained 32 px students are unchanged (the demo's RoB student 0.972 -> 0.972).
    The demo student's drop with 256 calibration images (0.934) is not a re-binning effect: it stays.
    """
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from torchao.quantization.pt2e.observer import HistogramObserver

    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(obs: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            lo, hi = torch.aminmax(x.detach().float())
            if id(obs) in seen:
                lo, hi = torch.minimum(lo, seen[id(obs)][0]), torch.maximum(hi, seen[id(obs)][1])
            seen[id(obs)] = (lo, hi)
            return x

        return forward

    fakes = [m for m in gm.modules() if isinstance(m, FakeQuantizeBase)]
    owned = {id(fq.activation_post_process) for fq in fakes}
    hists = [m for m in gm.modules() if isinstance(m, HistogramObserver)]
    patched: list[nn.Module] = []
    for fq in fakes:  # float pass: the fake-quantiser is the identity (and records, if it holds a histogram)
        obs = fq.activation_post_process
        fq.forward = recorder(obs) if isinstance(obs, HistogramObserver) else (lambda x: x)
        patched.append(fq)
    for obs in hists:
        if id(obs) not in owned:  # a post-training observer sits in the graph itself
            obs.forward = recorder(obs)
            patched.append(obs)
    try:
        for x in batches:
            gm(x)
    finally:
        for m in patched:
            del m.forward  # the instance attribute goes; the class's forward is back
    primed = 0
    for obs in hists:
        if id(obs) not in seen:
            continue
        lo, hi = seen[id(obs)]
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)) or float(lo) >= float(hi):
            continue  # a constant or non-finite tensor: left to the observer as before
        obs.reset_histogram(torch.stack([lo, hi]), lo, hi)
        obs.histogram.zero_()  # the range is set; the two priming values are not counted
        primed += 1
    for x in batches:  # QAT's fake-quantisers observe with fake-quantisation on, as they train
        gm(x)
    return primed
