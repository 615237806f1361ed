"""``export_model``: one student (+ optional linear probe) → one file for one target, with
calibration, mixed-precision int8, parity check and card.

Flow (the same for every format): wrap the student in the target's input contract, take real
images (calibration: train split; parity: held-out test split), export from one
``torch.export`` program per file, run the file in its own runtime, compare with PyTorch,
embed the metadata, write the card, and fail loudly if parity is out of bounds.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robkit.export import card as cards
from robkit.export.images import load_images
from robkit.export.parity import ParityError, ParityReport, compare
from robkit.export.quantize import (
    MixedPrecisionPlan,
    cosine,
    fold_weight_quantization,
    graph_sensitivity,
    layer_sensitivity,
    node_filter,
    quantizable_layers,
    search_float_layers,
    strip_quantization,
)
from robkit.export.targets import ExportTarget, validate
from robkit.export.wrappers import build_export_module, make_inputs
from robkit.utils.constants import imagenet_normalization

log = logging.getLogger(__name__)

SEARCH_IMAGES = 32  # calibration images the mixed-precision search scores candidates on
RANKING_IMAGES = 8  # search images each module's int8 damage is measured on (PT2E ranking)


@dataclass
class ExportResult:
    path: Path
    card_path: Path
    card: dict[str, Any]
    parity: ParityReport

    @property
    def passed(self) -> bool:
        return self.parity.passed


def _plan_static_int8(
    evaluate, rank, min_cosine: float, is_vit: bool, keep_sensitive: bool
) -> MixedPrecisionPlan:
    """All int8 if that meets the threshold on the search images, else the sensitivity search
    over ``rank()`` (computed only when needed)."""
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


def export_model(
    student: nn.Module,
    target: ExportTarget,
    out: str | Path,
    *,
    probe: nn.Module | None = None,
    labels: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
    resolution: int | None = None,
    data: str | None = None,
    calibration_images: int | None = None,
    parity_images: int | None = None,
    checkpoint: str | None = None,
    strict: bool = True,
) -> ExportResult:
    """Export ``student`` (+ ``probe``: ``[B, D] -> [B, C]`` logits) to ``out`` for ``target``.

    Raises :class:`ParityError` (after writing the file and its card marked failed) when the
    file misses the target's parity thresholds and ``strict``.
    """
    target = validate(target)
    meta = dict(meta or {})
    norm = meta.get("normalization") or imagenet_normalization()
    mean, std = list(norm["mean"]), list(norm["std"])
    res = int(resolution or target.resolution or meta.get("resolution") or 224)
    out = Path(out)
    if out.suffix != target.suffix:
        out = out.with_name(out.name + target.suffix) if out.suffix == "" else out.with_suffix(target.suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    student = student.eval()
    if probe is not None:
        probe = probe.eval()
    labels = list(labels) if labels else None
    is_vit = bool(getattr(student, "is_vit", False))
    module = build_export_module(student, target, mean, std, probe=probe, resolution=res)

    cal_n = int(calibration_images or target.calibration["images"])
    par_n = int(parity_images or target.parity["images"])
    cal_u8, _ = load_images(data or target.calibration["data"], target.calibration["split"], cal_n, res)
    par_u8, _ = load_images(data or target.parity["data"], target.parity["split"], par_n, res)
    cal_x = make_inputs(cal_u8, target, mean, std)
    par_x = make_inputs(par_u8, target, mean, std)
    search_x = None
    if target.precision == "int8":
        # Candidates are scored on training images that were not used for calibration, so the
        # search does not reward ranges fitted to the very images it is judged on.
        s_u8, _ = load_images(
            data or target.calibration["data"], target.calibration["split"], SEARCH_IMAGES, res, offset=cal_n
        )
        search_x = make_inputs(s_u8, target, mean, std)
    example = par_x[:1]
    with torch.no_grad():
        reference = module(par_x)
        embed_dim = int(reference.shape[1])

    input_spec = {
        "name": {"onnx": "input", "coreml": "image" if target.input == "image" else "input"}.get(
            target.format, "x"
        ),
        "shape": list(example.shape),
        "layout": target.layout,
        "dtype": "image (RGB)"
        if target.input == "image" and target.format == "coreml"
        else target.input_dtype,
        "range": _input_range(target),
        "color": "RGB",
        "resolution": res,
        "batch": "dynamic" if target.format == "onnx" else 1,
    }
    kind = (
        "probabilities"
        if (probe is not None and target.format == "coreml")
        else ("logits" if probe is not None else "embedding")
    )
    output_spec = {
        "kind": kind,
        "dim": embed_dim,
        "name": "classLabel_probs" if kind == "probabilities" else "output",
    }
    card = cards.base_card(
        meta=meta,
        arch=getattr(student, "arch", type(student).__name__),
        target=target.as_dict(),
        input_spec=input_spec,
        output_spec=output_spec,
        labels=labels,
        checkpoint=checkpoint,
    )
    card["calibration"] = (
        {"data": data or target.calibration["data"], "split": target.calibration["split"], "images": cal_n}
        if target.precision == "int8"
        else None
    )

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        fmt = {"onnx": _onnx, "tflite": _tflite, "coreml": _coreml, "executorch": _executorch}[target.format]
        outputs, simulated, conversion, plan, note = fmt(
            module=module,
            target=target,
            out=out,
            tmp=tmp,
            example=example,
            cal_x=cal_x,
            par_x=par_x,
            is_vit=is_vit,
            labels=labels,
            card=card,
            reference=reference,
            search_x=search_x,
        )
    conversion["seconds"] = round(time.perf_counter() - t0, 2)
    card["conversion"] = conversion
    card["quantization"] = plan.as_dict() if plan is not None else None

    runtime = conversion.get("runtime", target.format)
    report = compare(
        outputs,
        reference,
        runtime=runtime,
        classifier=probe is not None,
        thresholds=target.parity,
        simulated=simulated,
        note=note,
    )
    card["parity"] = report.as_dict()
    if target.format == "coreml" and not conversion.get("executed"):
        card["status"] = "passed (structural; numeric parity needs macOS)" if report.passed else "failed"
    else:
        card["status"] = "passed" if report.passed else "failed"
    _embed(out, target, card)
    card_path = cards.write_card(out, card)
    if target.format == "tflite" and card["conversion"]["parity_file_sha256"] != cards.sha256(out):
        raise RuntimeError(f"{out} changed after its parity run; this is a robkit bug")
    card = cards.read_card(out) or card
    result = ExportResult(out, card_path, card, report)
    if not report.passed and strict:
        float_note = ""
        if plan is not None and plan.float_layers:
            float_note = (
                f" {len(plan.float_layers)} layers were kept in float: {', '.join(plan.float_layers[:8])}."
            )
        raise ParityError(
            f"{out.name} fails parity for target {target.name}: {'; '.join(report.failures)} "
            f"({report.summary()}).{float_note} The file is kept and its card {card_path.name} is marked failed. "
            "Try a higher precision (--precision fp16/fp32) or another --target.",
            report,
        )
    return result


def _input_range(target: ExportTarget) -> str:
    """What one input value is: raw pixels, pixels / 255, or training-normalised values.

    TFLite ``image`` files take RGB float in [0, 1] (MediaPipe feeds ``pixel / 255`` when the
    metadata says mean 0, std 255); Core ML ``image`` inputs are ImageType pixels 0..255."""
    if target.input_dtype == "uint8":
        return "0-255"
    if target.input == "image":
        return "0-255" if target.format == "coreml" else "0-1"
    return "normalized"


def _embed(out: Path, target: ExportTarget, card: dict[str, Any]) -> None:
    """Metadata inside the file itself (the sidecar is written afterwards, with the file's hash).

    TFLite files get theirs in ``_tflite``, before parity runs, so this is ONNX only."""
    if target.format == "onnx":
        from robkit.export.coreml_format import flat_metadata
        from robkit.export.onnx_format import write_metadata

        md = flat_metadata(card)
        md.update(
            {"robkit.status": card["status"], "robkit.parity_cosine": str(round(card["parity"]["cosine"], 6))}
        )
        write_metadata(out, md)


# ----------------------------------------------------------------------------------- formats
def _onnx(*, module, target, out, tmp, example, cal_x, par_x, is_vit, search_x, **_):
    from robkit.export import onnx_format as O

    fp32_path = out if target.precision == "fp32" else tmp / "fp32.onnx"
    conversion = {"runtime": "onnxruntime", **O.export_onnx(module, example, fp32_path)}
    plan = None
    if target.precision == "int8":
        from robkit.export.quantize import bn_to_conv

        bn_map = bn_to_conv(torch.export.export(module, (example,)))
        q = target.quantization
        qkw = {
            "activation_type": q.get("activation_type", "uint8"),
            "per_channel": q.get("per_channel", True),
            "op_types": ["Conv", "MatMul", "Gemm"],
        }
        with torch.no_grad():
            search_ref = module(search_x).numpy()
        evaluate = O.int8_evaluator(
            fp32_path, cal_x.numpy(), search_x.numpy(), search_ref, bn_map, cosine, **qkw
        )
        plan = _plan_static_int8(
            evaluate,
            lambda: layer_sensitivity(module, cal_x[:SEARCH_IMAGES], quantizable_layers(module)),
            target.parity["min_cosine"],
            is_vit,
            q.get("keep_sensitive_float", True),
        )
        O.quantize_onnx(
            fp32_path,
            out,
            cal_x.numpy(),
            exclude_nodes=O.nodes_for_layers(fp32_path, plan.float_layers, bn_map),
            **qkw,
        )
        conversion["activation_type"] = qkw["activation_type"]
    outputs = O.OnnxRunner(out, threads=torch.get_num_threads()).run_batches(par_x.numpy())
    return outputs, None, conversion, plan, ""


def _float_boundary(keep):
    """``keep`` that also leaves the wrapper's own ops (layout permute, folded normalisation) float.

    Annotated, they make litert-torch give the file an int8 input tensor, which MediaPipe Tasks
    refuses ("Type mismatch for input tensor ...: Requested one of these types: uint8/float32, got
    INT8"); left float, the file takes float32 RGB and quantises at the student's first layer."""
    from robkit.export.quantize import module_path

    return lambda n: module_path(n).startswith(("student", "probe")) and keep(n)


def _pt2e_static_int8(
    module,
    target,
    example,
    cal_x,
    search_x,
    is_vit,
    quantizer_factory=None,
    fold=False,
    float_input=False,
):
    """PT2E static int8 (litert-torch's quantiser by default, XNNPACK's for ExecuTorch) with the units
    the sensitivity search keeps in float: ``(plan, quantised graph module, quantizer)``.

    One export, one calibration on every calibration image: the search ranks the modules of that
    graph once and scores each candidate by removing the quantise/dequantise pairs of its float
    modules (no re-calibration) and running it on the search images, which were not used for
    calibration.  The returned graph is the chosen candidate itself, so the file is converted from
    exactly the model the search scored."""
    from robkit.export import tflite_format as T

    program = torch.export.export(module, (example,))
    keep = node_filter([], module, is_vit)
    if float_input:
        keep = _float_boundary(keep)
    gm, quantizer = T.pt2e_quantize(program, example, cal_x, keep, quantizer_factory=quantizer_factory)
    with torch.no_grad():
        search_ref = module(search_x)

    def evaluate(float_layers: list[str]) -> float:
        candidate = strip_quantization(gm, float_layers) if float_layers else gm
        return cosine(T.run_torch_batch1(candidate, search_x), search_ref)

    plan = _plan_static_int8(
        evaluate,
        lambda: graph_sensitivity(gm, search_x[:RANKING_IMAGES], search_ref[:RANKING_IMAGES]),
        target.parity["min_cosine"],
        is_vit,
        target.quantization.get("keep_sensitive_float", True),
    )
    chosen = strip_quantization(gm, plan.float_layers)
    if fold:
        chosen = fold_weight_quantization(chosen)
    return plan, chosen, quantizer


def _tflite(*, module, target, out, tmp, example, cal_x, par_x, is_vit, search_x, labels, card, **_):
    from robkit.export import tflite_format as T

    conversion: dict[str, Any] = {"runtime": "ai-edge-litert (XNNPACK)", "converter": "litert-torch"}
    plan, simulated = None, None
    if target.precision == "fp32":
        T.convert_fp32(module, example, out)
    elif target.precision == "fp16" or target.quantization.get("mode") == "dynamic":
        T.convert_fp32(module, example, tmp / "fp32.tflite")
        (T.convert_fp16 if target.precision == "fp16" else T.convert_dynamic_int8)(tmp / "fp32.tflite", out)
        conversion["quantizer"] = "ai-edge-quantizer"
    else:
        plan, gm, quantizer = _pt2e_static_int8(
            module, target, example, cal_x, search_x, is_vit, float_input=target.input_dtype == "float32"
        )
        simulated = T.run_torch_batch1(gm, par_x)
        T.convert_static_int8(gm, quantizer, example, out)
        conversion["quantizer"] = "litert-torch PT2E (static, per-channel)"
    runner = T.TFLiteRunner(out, threads=torch.get_num_threads())
    conversion["ops"] = T.op_counts(out)
    conversion["input_dtype"] = str(runner.input_dtype)
    scale, zero = runner.inp.get("quantization", (0.0, 0))
    if scale:
        target_input = {"scale": float(scale), "zero_point": int(zero)}
        conversion["input_quantization"] = target_input
    del runner
    # Metadata (standard + card) goes in before parity: the file measured is the file that ships.
    # The embedded card therefore has provenance, I/O contract and conversion, not the parity
    # numbers, which the sidecar card holds next to the hash of these very bytes.
    embedded = {**card, "conversion": conversion, "quantization": plan.as_dict() if plan else None}
    card["metadata_embedded"] = T.embed_metadata(out, embedded, labels)
    conversion["parity_file_sha256"] = cards.sha256(out)
    outputs = T.TFLiteRunner(out, threads=torch.get_num_threads()).run_batches(par_x.numpy())
    return outputs, simulated, conversion, plan, ""


def _coreml(*, module, target, out, example, par_x, labels, card, **_):
    from robkit.export import coreml_format as C

    mlmodel = C.convert_coreml(module, example, target, labels)
    C.set_metadata(mlmodel, card)
    structure = C.inspect(mlmodel)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    mlmodel.save(str(out))
    conversion = {
        "runtime": "coremltools (structural)",
        "converter": "coremltools torch.export frontend",
        **structure,
    }
    problems = _coreml_structure_problems(structure, target, labels)
    if problems:
        raise ParityError(f"Core ML program for {target.name} is malformed: {'; '.join(problems)}")
    if C.can_run_coreml():
        conversion["runtime"], conversion["executed"] = "Core ML (macOS)", True
        return C.predict(out, par_x.numpy(), target), None, conversion, None, ""
    with torch.no_grad():
        proxy = C.simulated_module(module, target)(par_x)
    note = (
        "Core ML cannot execute on Linux: the program was checked structurally (inputs, outputs, ops, "
        "weight dtypes, metadata) and the numbers are from PyTorch with the file's weight rounding; "
        "numeric parity of the file itself needs macOS."
    )
    return proxy, None, conversion, None, note


def _coreml_structure_problems(s: dict[str, Any], target: ExportTarget, labels) -> list[str]:
    problems = []
    want_in = "imageType" if target.input == "image" else "multiArrayType"
    if want_in not in s["inputs"].values():
        problems.append(f"input is {s['inputs']}, expected a {want_in}")
    if labels and "classLabel" not in s["outputs"]:
        problems.append(f"classifier outputs missing: {s['outputs']}")
    w = s["weights"]
    if target.precision == "fp16" and not w.get("float16"):
        problems.append(f"fp16 target but weights are {w}")
    if target.coreml.get("compression") == "linear8" and not w.get("constexpr_affine_dequantize"):
        problems.append(f"int8 weights requested but none are int8-compressed: {w}")
    if not any(k.startswith("robkit.") for k in s["metadata_keys"]):
        problems.append("robkit metadata missing")
    return problems


def _executorch(*, module, target, out, tmp, example, cal_x, par_x, is_vit, search_x, **_):
    from robkit.export import executorch_format as E
    from robkit.export import tflite_format as T

    E.require_executorch()
    plan, simulated = None, None
    if target.precision == "int8":
        plan, gm, _ = _pt2e_static_int8(
            module,
            target,
            example,
            cal_x,
            search_x,
            is_vit,
            quantizer_factory=E.xnnpack_quantizer,
            fold=True,
        )
        simulated = T.run_torch_batch1(gm, par_x)
        conversion = E.lower(gm, example, out)
    else:
        conversion = E.lower(module, example, out)
    conversion["runtime"] = "executorch (XNNPACK)"
    outputs = E.ExecuTorchRunner(out).run_batches(par_x.numpy())
    return np.asarray(outputs), simulated, conversion, plan, ""
