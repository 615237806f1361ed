"""Static int8 shared by the formats: the mixed-precision plan (which layers stay float) and PT2E.

The search keeps the fewest layers float that meet the target's parity cosine, scoring candidates
on training images that were not used for calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from robkit.export.qat import QATRun, qat_distill
from robkit.export.quantize import (
    MixedPrecisionPlan,
    cosine,
    fold_weight_quantization,
    graph_sensitivity,
    node_filter,
    search_float_layers,
    strip_quantization,
)
from robkit.export.targets import ExportTarget

SEARCH_IMAGES = 32  # calibration images the mixed-precision search scores candidates on
RANKING_IMAGES = 8  # search images each module's int8 damage is measured on (PT2E ranking)


def plan_static_int8(
    evaluate: Callable[[list[str]], float],
    rank: Callable[[], Any],
    min_cosine: float,
    is_vit: bool,
    keep_sensitive: bool,
) -> MixedPrecisionPlan:
    """All int8 if that meets the threshold on the search images, else the sensitivity search
    over ``rank()`` (computed only when needed).
    """
    ops = (
        "Conv/Linear only (LayerNorm, Softmax, GELU, attention stay float)" if is_vit else "all supported ops"
    )
    c0 = evaluate([])
    plan = MixedPrecisionPlan(history=[{"float_layers": 0, "cosine": round(c0, 5)}], quantized_ops=ops)
    if c0 >= min_cosine + 0.005 or not keep_sensitive:
        plan.met = c0 >= min_cosine
        return plan
    searched = search_float_layers(rank(), evaluate, min_cosine)
    searched.history = plan.history + [h for h in searched.history if h["float_layers"] > 0]
    searched.quantized_ops = ops
    return searched


def float_boundary(keep: Callable) -> Callable:
    """``keep`` that also leaves the wrapper's own ops (layout permute, folded normalisation) float.

    Annotated, they make litert-torch give the file an int8 input tensor, which MediaPipe Tasks
    refuses ("Type mismatch for input tensor ...: Requested one of these types: uint8/float32, got
    INT8"); left float, the file takes float32 RGB and quantises at the student's first layer.
    Only operations are judged by where they sit: a weight or bias is a ``get_attr`` node with no
    module path, and refusing it would leave its whole conv pattern unannotated (float in the file).
    """
    from robkit.export.quantize import module_path

    def inside(n: torch.fx.Node) -> bool:
        return n.op != "call_function" or module_path(n).startswith(("student", "probe"))

    return lambda n: inside(n) and keep(n)


def pt2e_static_int8(
    module: torch.nn.Module,
    target: ExportTarget,
    example: torch.Tensor,
    cal_x: torch.Tensor,
    search_x: torch.Tensor,
    is_vit: bool,
    quantizer_factory: Callable | None = None,
    fold: bool = False,
    float_input: bool = False,
    qat: QATRun | None = None,
) -> tuple[MixedPrecisionPlan, Any, Any]:
    """PT2E static int8 (litert-torch's quantiser by default, XNNPACK's for ExecuTorch) with the units
    the sensitivity search keeps in float: ``(plan, quantised graph module, quantizer)``.

    One export, one calibration on every calibration image: the search ranks the modules of that
    graph once and scores each candidate by removing the quantise/dequantise pairs of its float
    modules (no re-calibration) and running it on the search images, which were not used for
    calibration.  The returned graph is the chosen candidate itself, so the file is converted from
    exactly the model the search scored.

    With ``qat`` the graph is the quantisation-aware-distilled one instead (trained on ``qat.images``
    with ``qat.quantizer_factory``'s fake-quantisers, scored on the same search images); when it meets the
    threshold with every module int8, as QAT is meant to make possible, no float fallback is searched.
    When it does not, the post-training graph is planned as well and the better plan wins (meeting the
    threshold, then fewer float modules, then the higher cosine); ``plan.qat["graph"]`` says which.
    """
    from robkit.export import tflite_format as T

    keep = node_filter([], module, is_vit)
    if float_input:
        keep = float_boundary(keep)
    with torch.no_grad():
        search_ref = module(search_x)

    def planned(gm: Any) -> MixedPrecisionPlan:
        def evaluate(float_layers: list[str]) -> float:
            candidate = strip_quantization(gm, float_layers) if float_layers else gm
            return cosine(T.run_torch_batch1(candidate, search_x), search_ref)

        return plan_static_int8(
            evaluate,
            lambda: graph_sensitivity(gm, search_x[:RANKING_IMAGES], search_ref[:RANKING_IMAGES]),
            target.parity["min_cosine"],
            is_vit,
            target.quantization.get("keep_sensitive_float", True),
        )

    def post_training() -> tuple[Any, Any]:
        program = torch.export.export(module, (example,))
        return T.pt2e_quantize(program, example, cal_x, keep, quantizer_factory=quantizer_factory)

    if qat is None:
        gm, quantizer = post_training()
        plan = planned(gm)
    else:
        if qat.quantizer_factory is None:
            raise ValueError("QAT needs the target runtime's QAT quantiser (QATRun.for_quantizer)")
        gm, quantizer, result = qat_distill(
            module,
            example,
            qat.images,
            search_x,
            keep=keep,
            quantizer_factory=qat.quantizer_factory,
            settings=qat.settings,
            state=qat.state,
        )
        plan = planned(gm)
        record: dict[str, Any] = {
            **qat.settings.as_dict(),
            **result.as_dict(),
            "held_out": "search images",
            "graph": "qat",
        }
        if plan.float_layers or not plan.met:
            # QAT fell short of all-int8 at parity (as on MobileNetV3-L at 224 px): the post-training
            # graph is planned too, and the better of the two is the file, so --qat never ships a file
            # worse than the one the user would have had without it.
            ptq_gm, ptq_quantizer = post_training()
            ptq_plan = planned(ptq_gm)
            record["qat_plan"] = _plan_summary(plan)
            record["ptq_plan"] = _plan_summary(ptq_plan)
            if _plan_key(ptq_plan) > _plan_key(plan):
                gm, quantizer, plan = ptq_gm, ptq_quantizer, ptq_plan
                record["graph"] = "ptq"
        plan.qat = record
    chosen = strip_quantization(gm, plan.float_layers)
    if fold:
        chosen = fold_weight_quantization(chosen)
    return plan, chosen, quantizer


def chosen_cosine(plan: MixedPrecisionPlan) -> float:
    """The search-image cosine of the candidate a plan chose (its float layers, as searched)."""
    k = len(plan.float_layers)
    return max(h["cosine"] for h in plan.history if h["float_layers"] == k)


def _plan_key(plan: MixedPrecisionPlan) -> tuple[bool, int, float]:
    """Order of plans: meeting the threshold, then fewer float layers, then the higher cosine."""
    return (plan.met, -len(plan.float_layers), chosen_cosine(plan))


def _plan_summary(plan: MixedPrecisionPlan) -> dict[str, Any]:
    return {"met": plan.met, "float_layers": len(plan.float_layers), "cosine": chosen_cosine(plan)}
