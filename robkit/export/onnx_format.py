"""ONNX: dynamo (torch.export) exporter, onnx checker, onnxruntime runner, static int8 QDQ.

* The dynamo exporter writes opset 18+ (20 by default in torch 2.14, native ``Gelu`` and
  ``LayerNormalization``); a requested opset can silently stay higher when down-conversion
  fails, so the opset in the card is read back from the file.  The TorchScript exporter
  (opset 17) is the fallback when the dynamo path fails.
* int8 is ``onnxruntime.quantization.quantize_static``: QDQ, per-channel weights, activations
  uint8 on x86 (U8S8: S8S8 QDQ is not accelerated by ORT's x86 kernels) or int8 on ARM,
  ``op_types_to_quantize`` Conv/MatMul/Gemm for ViTs, sensitive layers via ``nodes_to_exclude``.
"""

from __future__ import annotations

import ast
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robkit.export.backends import Converted, ConvertJob

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "output"


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    opset: int = 20,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``module`` (dynamic batch) to ``path``; returns ``{"opset", "exporter", "nodes"}``."""
    import onnx

    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=1024)
    example2 = torch.cat([example, example])  # a batch-1 example specialises the batch dimension
    exporter = "dynamo"
    try:
        program = torch.export.export(module, (example2,), dynamic_shapes=({0: batch},))
        torch.onnx.export(
            program,
            (example2,),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=max(opset, 18),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
        )
    except Exception as e:  # the TorchScript exporter still handles graphs dynamo cannot
        log.warning(
            "dynamo ONNX export failed (%s: %s); falling back to the TorchScript exporter",
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
        exporter = "torchscript"
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    if metadata:
        write_metadata(path, metadata)
    real_opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": int(real_opset), "exporter": exporter, "nodes": len(model.graph.node)}


def write_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Replace ``metadata_props`` of the file by ``metadata`` (string values)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=str(v))
    onnx.save(model, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's ``metadata_props`` as a ``{key: value}`` dict (an ``.ort`` file: as onnxruntime reads them)."""
    if Path(path).suffix == ".ort":
        return dict(OnnxRunner(path).session.get_modelmeta().custom_metadata_map)
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# ONNX Runtime Mobile runs ARM phones: the ORT file is optimised for them ("arm" leaves out the
# x86-only NCHWc layout), at the tool's default fixed optimisation level.
ORT_TARGET_PLATFORM = "arm"


def to_ort(onnx_path: Path, ort_path: Path) -> dict[str, Any]:
    """Convert with onnxruntime's own ``convert_onnx_models_to_ort`` tool → ``ort_path``.

    The tool's list of the operators the model needs (for a reduced ORT Mobile build) is kept next
    to the file as ``<name>.required_operators.config``. Returns conversion facts for the card.
    """
    import onnxruntime as ort
    from onnxruntime.tools import convert_onnx_models_to_ort as tool

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "model.onnx"
        src.write_bytes(onnx_path.read_bytes())
        tool.convert_onnx_models_to_ort(
            src,
            output_dir=Path(d) / "out",
            optimization_styles=[tool.OptimizationStyle.Fixed],
            target_platform=ORT_TARGET_PLATFORM,
        )
        made = Path(d) / "out" / "model.ort"
        if not made.is_file():
            raise RuntimeError(f"onnxruntime's ORT conversion of {onnx_path.name} wrote no .ort file")
        os.replace(made, ort_path)
        config = Path(d) / "out" / "model.required_operators.config"
        ops_file = ort_path.with_name(ort_path.stem + ".required_operators.config")
        if config.is_file():
            os.replace(config, ops_file)
    return {
        "container": "ort",
        "ort_tool": f"onnxruntime {ort.__version__} convert_onnx_models_to_ort",
        "ort_optimization": "fixed",
        "ort_target_platform": ORT_TARGET_PLATFORM,
        "required_operators": ops_file.name if ops_file.is_file() else None,
    }


class OnnxRunner:
    """onnxruntime CPU session with a fixed thread count (spinning off, so interleaved timing is fair)."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The model's first output on the input batch ``x``."""
        return self.session.run(None, {self.input_name: x})[0]

    def run_batches(self, x: np.ndarray, batch: int = 16) -> np.ndarray:
        """Outputs on ``x`` run ``batch`` inputs at a time, concatenated."""
        return np.concatenate([self(x[i : i + batch]) for i in range(0, len(x), batch)])


def nodes_for_layers(path: str | os.PathLike, layers: list[str], bn_map: dict[str, str]) -> list[str]:
    """ONNX node names computing the torch ``layers`` (via the dynamo exporter's name scopes;
    a Conv fused with its BatchNorm carries the BatchNorm's scope).
    """
    import onnx

    wanted = set(layers)
    names = []
    for node in onnx.load(str(path)).graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        props = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        scopes = [bn_map.get(s, s) for s in scopes]
        if wanted.intersection(scopes):
            names.append(node.name)
    return names


class _Reader:
    """``CalibrationDataReader`` over real images, 8 at a time."""

    def __init__(self, x: np.ndarray, name: str, batch: int = 8) -> None:
        self.batches = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calib: np.ndarray,
    activation_type: str = "uint8",
    per_channel: bool = True,
    exclude_nodes: list[str] | None = None,
    op_types: list[str] | None = None,
) -> None:
    """Static QDQ int8 of ``fp32_path`` calibrated (min/max) on ``calib`` real images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp32_path),
        str(out_path),
        _Reader(calib, INPUT_NAME),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=exclude_nodes or [],
        op_types_to_quantize=op_types,
        extra_options={"ActivationSymmetric": activation_type == "int8"},
    )


def int8_evaluator(
    fp32_path: Path,
    calib: np.ndarray,
    search_x: np.ndarray,
    reference: np.ndarray,
    bn_map: dict[str, str],
    cos: Callable,
    **qkw: Any,
) -> Callable[[list[str]], float]:
    """``evaluate(float_layers) -> cosine`` for the mixed-precision search (quantise + run in ORT)."""

    def evaluate(float_layers: list[str]) -> float:
        with tempfile.TemporaryDirectory() as d:
            q = Path(d) / "q.onnx"
            quantize_onnx(
                fp32_path, q, calib, exclude_nodes=nodes_for_layers(fp32_path, float_layers, bn_map), **qkw
            )
            out = OnnxRunner(q, threads=torch.get_num_threads()).run_batches(search_x)
        return cos(torch.from_numpy(out), torch.from_numpy(reference))

    return evaluate


class OnnxBackend:
    """ONNX behind the export protocol (``robkit.export.backends.Backend``)."""

    format, runtime = "onnx", "onnxruntime"
    _onnx_source: Path  # the ONNX file convert() wrote (a scratch file for the ORT container)
    ort_facts: dict[str, Any]  # what the ORT conversion reports, for the card

    def convert(self, job: ConvertJob) -> Converted:
        """fp32 through the dynamo exporter; int8 as static QDQ with the mixed-precision plan."""
        from robkit.export.int8 import SEARCH_IMAGES, plan_static_int8
        from robkit.export.quantize import bn_to_conv, cosine, layer_sensitivity, quantizable_layers

        target, module = job.target, job.module
        # The ORT container is made from the finished ONNX file in embed(), after its metadata.
        out = job.tmp / "model.onnx" if target.container == "ort" else job.out
        self._onnx_source = out
        fp32_path = out if target.precision == "fp32" else job.tmp / "fp32.onnx"
        conversion = {"runtime": "onnxruntime", **export_onnx(module, job.example, fp32_path)}
        plan = None
        if target.precision == "int8":
            assert job.search_x is not None
            bn_map = bn_to_conv(torch.export.export(module, (job.example,)))
            q = target.quantization
            qkw = {
                "activation_type": q.get("activation_type", "uint8"),
                "per_channel": q.get("per_channel", True),
                "op_types": ["Conv", "MatMul", "Gemm"],
            }
            with torch.no_grad():
                search_ref = module(job.search_x).numpy()
            cal = job.cal_x.numpy()
            evaluate = int8_evaluator(fp32_path, cal, job.search_x.numpy(), search_ref, bn_map, cosine, **qkw)
            plan = plan_static_int8(
                evaluate,
                lambda: layer_sensitivity(module, job.cal_x[:SEARCH_IMAGES], quantizable_layers(module)),
                target.parity["min_cosine"],
                job.is_vit,
                q.get("keep_sensitive_float", True),
            )
            exclude = nodes_for_layers(fp32_path, plan.float_layers, bn_map)
            quantize_onnx(fp32_path, out, cal, exclude_nodes=exclude, **qkw)
            conversion["activation_type"] = qkw["activation_type"]
        return Converted(conversion, plan)

    def embed(self, path: Path, card: dict[str, Any], labels: list[str] | None) -> bool:
        """The card's provenance and I/O contract as ``metadata_props`` (``robkit.*`` string entries)."""
        from robkit.export.card import flat_metadata

        if path.suffix == ".ort":  # metadata_props go into the ONNX file, which the tool then converts
            write_metadata(self._onnx_source, flat_metadata(card))
            self.ort_facts = to_ort(self._onnx_source, path)
            return True
        write_metadata(path, flat_metadata(card))
        return True

    def run(
        self, path: Path, job: ConvertJob, converted: Converted
    ) -> tuple[np.ndarray, str, dict[str, Any]]:
        """The file in onnxruntime on the parity images."""
        facts = getattr(self, "ort_facts", {}) if path.suffix == ".ort" else {}
        return self.runner(path, torch.get_num_threads()).run_batches(job.par_x.numpy()), "", dict(facts)

    def runner(self, path: Path, threads: int) -> OnnxRunner:
        """An onnxruntime CPU session."""
        return OnnxRunner(path, threads)

    def read_back(self, path: Path) -> dict[str, Any]:
        """``metadata_props`` as onnxruntime's ``modelmeta.custom_metadata_map`` shows them."""
        return dict(read_metadata(path))
