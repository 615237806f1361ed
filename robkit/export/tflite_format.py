"""TFLite / LiteRT: litert-torch conversion, fp16 and dynamic int8 via ai-edge-quantizer, static
int8 via litert-torch's PT2E quantiser, execution with ai-edge-litert (XNNPACK on CPU).

Pitfalls handled here (all reproduced with litert-torch 0.10 / ai-edge-litert 2.3):
* a PT2E graph exported with a batch-1 example is specialised to batch 1: calibrate one image
  at a time;
* static int8 files end with a DEQUANTIZE (``float_outputs``), so their output is float32; an int8
  input tensor, where a converter makes one, is quantised by the runner with its (scale, zero_point);
* litert-torch writes no TFLite Support metadata, and MediaPipe Tasks refuses a float image model
  without it: :func:`embed_metadata` adds the standard ``TFLITE_METADATA`` entry (see
  ``tflite_metadata.py``) and robkit's card (entry ``robkit_card``, ignored by interpreters and
  clients), in one re-pack, before parity runs, so parity measures the bytes that ship;
* XNNPACK's delegate takes no int8 HARD_SWISH: static int8 graphs write hard-swish in ops it does take
  (:class:`XNNPackHardswish`), or each one would run outside it and cut the graph into pieces.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robkit.export.backends import Converted, ConvertJob
from robkit.utils.files import atomic_write_bytes

log = logging.getLogger(__name__)

CARD_METADATA_NAME = "robkit_card"


def convert_fp32(module: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``module`` (in eval mode) to ``path`` as an fp32 .tflite file with litert-torch."""
    import litert_torch

    litert_torch.convert(module.eval(), (example,)).export(str(path))


def convert_fp16(fp32_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """fp16 weights (ai-edge-quantizer FLOAT_CASTING); XNNPACK dequantises them at load time."""
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(str(fp32_path))
    q.add_weight_only_config(
        regex=".*",
        operation_name=recipe.TFLOperationName.ALL_SUPPORTED,
        num_bits=16,
        algorithm_key=recipe.AlgorithmName.FLOAT_CASTING,
    )
    q.quantize().export_model(str(path), overwrite=True)


def convert_dynamic_int8(fp32_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """int8 weights, float activations (ai-edge-quantizer ``dynamic_wi8_afp32``)."""
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(str(fp32_path))
    q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    q.quantize().export_model(str(path), overwrite=True)


class XNNPackHardswish(torch.nn.Module):
    """Hard-swish written as ``x · clamp(x + 3, 0, 6) / 6``: the same function, in ops LiteRT's XNNPACK
    delegate runs in int8 (ADD, clamp, MUL).

    An int8 HARD_SWISH op is not taken by that delegate: each one runs on LiteRT's own kernel and cuts
    the graph, so a MobileNetV3-Large int8 file at 224 px ran in 21 partitions at 3.1x its fp32 file's
    time; written this way it is one partition at 0.64x (BENCHMARKS.md, AMD EPYC, 2 threads).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``hardswish(x)``."""
        return x * torch.clamp(x + 3.0, 0.0, 6.0) * (1.0 / 6.0)


def xnnpack_int8_friendly(module: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """``(copy of module with every nn.Hardswish as XNNPackHardswish, how many were replaced)``; the
    module paths stay the same, so the float-fallback search names the same modules.
    """
    out = copy.deepcopy(module)
    replaced = 0
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Hardswish):
                setattr(parent, name, XNNPackHardswish())
                replaced += 1
    return out, replaced


def _filtered_quantizer(
    keep: Callable | None, config: Any = None, static_qat_only_ops: list[str] | None = None
) -> Any:
    """litert-torch's PT2EQuantizer whose annotations skip nodes ``keep`` rejects, with ``config``
    (default: its static per-channel PTQ configuration) and, for QAT, its conv+BN-only patterns
    replaced by ``static_qat_only_ops``.

    ``set_module_name(name, None)`` is refused by this quantiser (an assert), so layers that
    stay float are expressed as an annotation filter instead.
    """
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

    class Filtered(PT2EQuantizer):
        def _annotate_all_static_patterns(
            self, model: torch.fx.GraphModule, quantization_config: Any, filter_fn: Callable | None = None
        ) -> Any:
            def both(n: torch.fx.Node) -> bool:
                return (filter_fn is None or filter_fn(n)) and (keep is None or keep(n))

            return super()._annotate_all_static_patterns(model, quantization_config, both)

    if static_qat_only_ops is not None:
        Filtered.STATIC_QAT_ONLY_OPS = list(static_qat_only_ops)
    return Filtered().set_global(
        config or get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    )


def pt2e_quantize(
    module: torch.nn.Module | torch.export.ExportedProgram,
    example: torch.Tensor,
    calib: torch.Tensor,
    keep: Callable | None,
    quantizer_factory: Callable | None = None,
    fold_quantize: bool = False,
) -> tuple[torch.fx.GraphModule, Any]:
    """Prepare, calibrate (one image at a time, histogram ranges fixed first:
    :func:`robkit.export.quantize.calibrate_histograms`) and convert: ``(quantised torch model, quantizer)``.

    The returned model is the quantise-simulated PyTorch model the exported file is compared with.
    litert-torch wants the weight quantisation unfolded (``fold_quantize=False``); ExecuTorch's
    XNNPACK partitioner wants it folded.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from robkit.export.quantize import calibrate_histograms, copy_program_module

    quantizer = (quantizer_factory or _filtered_quantizer)(keep)
    if isinstance(module, torch.export.ExportedProgram):  # exported once, re-used by every search step
        gm = copy_program_module(module)
    else:
        gm = torch.export.export(module.eval(), (example,)).module()
    gm = prepare_pt2e(gm, quantizer)
    calibrate_histograms(gm, [calib[i : i + 1] for i in range(len(calib))])  # the graph is fixed at batch 1
    gm = convert_pt2e(gm, fold_quantize=fold_quantize)
    gm.training = False  # exported in eval mode already; the flag only drives converter warnings
    return gm, quantizer


def run_torch_batch1(gm: Callable, x: torch.Tensor) -> torch.Tensor:
    """``gm`` on each input of ``x`` one at a time (batch 1, no autograd), concatenated."""
    with torch.no_grad():
        return torch.cat([gm(x[i : i + 1]) for i in range(len(x))])


def convert_static_int8(
    qmodel: torch.nn.Module, quantizer: Any, example: torch.Tensor, path: str | os.PathLike
) -> None:
    """Write the PT2E-quantised ``qmodel`` to ``path`` with litert-torch, outputs dequantised to float."""
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    litert_torch.convert(qmodel, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(
        str(path)
    )
    float_outputs(path)


def float_outputs(path: str | os.PathLike) -> int:
    """Give every int8/int16 graph output a DEQUANTIZE to float32; returns how many were added.

    litert-torch leaves a static int8 file's output tensor quantised when the graph's last op is
    quantised, and MediaPipe Tasks refuses it ("Expected output tensor at index 0 to have type UINT8
    or FLOAT32, found INT8"). The dequantisation is the one the app would otherwise do by hand,
    ``(q - zero_point) * scale``, so the numbers are unchanged.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    path = Path(path)
    model = fb.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)
    quantised = (fb.TensorType.INT8, fb.TensorType.INT16)
    added = 0
    for g in model.subgraphs:
        outs = list(g.outputs)
        for j, t in enumerate(outs):
            src = g.tensors[t]
            if src.type not in quantised:
                continue
            codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
            if fb.BuiltinOperator.DEQUANTIZE not in codes:
                code = fb.OperatorCodeT()
                code.builtinCode = fb.BuiltinOperator.DEQUANTIZE
                code.deprecatedBuiltinCode = fb.BuiltinOperator.DEQUANTIZE
                code.version = 1
                model.operatorCodes.append(code)
                codes.append(fb.BuiltinOperator.DEQUANTIZE)
            buf = fb.BufferT()
            model.buffers.append(buf)
            out = fb.TensorT()
            out.shape, out.shapeSignature = src.shape, src.shapeSignature
            out.type = fb.TensorType.FLOAT32
            out.buffer = len(model.buffers) - 1
            name = src.name.decode() if isinstance(src.name, bytes) else (src.name or "output")
            src.name = f"{name}_int8"
            out.name = name
            g.tensors.append(out)
            op = fb.OperatorT()
            op.opcodeIndex = codes.index(fb.BuiltinOperator.DEQUANTIZE)
            op.inputs, op.outputs = [t], [len(g.tensors) - 1]
            g.operators.append(op)
            outs[j] = len(g.tensors) - 1
            added += 1
        g.outputs = outs
    if added:
        _remap_signature_outputs(model)
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        atomic_write_bytes(path, bytes(builder.Output()))
    return added


def _remap_signature_outputs(model: Any) -> None:
    """Point signature outputs at the subgraph's (new) output tensors, in order."""
    for sig in model.signatureDefs or []:
        g = model.subgraphs[sig.subgraphIndex]
        for tm, idx in zip(sig.outputs or [], g.outputs):
            tm.tensorIndex = idx


class TFLiteRunner:
    """ai-edge-litert interpreter (XNNPACK) taking float or integer inputs like the app would."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]

    @property
    def input_dtype(self) -> np.dtype:
        """The dtype of the file's input tensor."""
        return np.dtype(self.inp["dtype"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """One sample (batch 1, the file's static shape)."""
        scale, zero = self.inp.get("quantization", (0.0, 0))
        if self.input_dtype in (np.int8, np.int16) and scale:  # quantised float input
            info = np.iinfo(self.input_dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max)
        self.interpreter.set_tensor(self.inp["index"], x.astype(self.input_dtype, copy=False))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.out["index"])
        oscale, ozero = self.out.get("quantization", (0.0, 0))
        if y.dtype != np.float32 and oscale:
            y = (y.astype(np.float32) - ozero) * oscale
        return y

    def run_batches(self, x: np.ndarray) -> np.ndarray:
        """Outputs on ``x`` run one sample at a time, concatenated."""
        return np.concatenate([self(x[i : i + 1]) for i in range(len(x))])


def _operators(path: str | os.PathLike) -> Iterator[tuple[Any, Any, str]]:
    """``(subgraph, operator, builtin name)`` for every operator of a .tflite file, in order."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(Path(path).read_bytes(), 0)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    for s in range(model.SubgraphsLength()):
        g = model.Subgraphs(s)
        for i in range(g.OperatorsLength()):
            op = g.Operators(i)
            c = codes[op.OpcodeIndex()]
            yield g, op, names.get(max(c.BuiltinCode(), c.DeprecatedBuiltinCode()), "CUSTOM")


def op_counts(path: str | os.PathLike) -> dict[str, int]:
    """Builtin operator inventory of a .tflite file."""
    return dict(Counter(name for _, _, name in _operators(path)).most_common())


WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def weight_types(path: str | os.PathLike) -> dict[str, int]:
    """How many convolution / fully-connected ops of a .tflite file store their weights in each type,
    e.g. ``{"int8": 52}`` for a static int8 file, ``{"float32": 52}`` for a float one.
    """
    from ai_edge_litert import schema_py_generated as fb

    types = {v: k.lower() for k, v in vars(fb.TensorType).items() if not k.startswith("_")}

    def stored(g: Any, op: Any) -> str:
        made = {
            o.Outputs(j): o
            for o in map(g.Operators, range(g.OperatorsLength()))
            for j in range(o.OutputsLength())
        }
        w = op.Inputs(1)
        while w in made:  # a weight dequantised at run time (fp16 files) counts as its stored type
            w = made[w].Inputs(0)
        return types.get(g.Tensors(w).Type(), "other")

    return dict(
        Counter(stored(g, op) for g, op, name in _operators(path) if name in WEIGHTED_OPS).most_common()
    )


def embed_metadata(path: str | os.PathLike, card: dict[str, Any], labels: list[str] | None = None) -> bool:
    """Store the standard TFLite Support metadata built from ``card`` (with ``labels`` as a
    TENSOR_AXIS_LABELS associated file) and ``card`` itself as JSON in the flatbuffer's
    ``metadata`` table; False if the file cannot take them (the sidecar card still has the card).
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    from robkit.export import tflite_metadata as TM

    path = Path(path)
    try:
        raw = path.read_bytes()
        model = fb.ModelT.InitFromPackedBuf(bytearray(raw), 0)
        # ai-edge-quantizer (fp16, dynamic-range int8) stores weights after the flatbuffer, at
        # buffer offsets; re-packing would lose them, so they are moved back inside first.
        outside = [b for b in (model.buffers or []) if (getattr(b, "offset", 0) or 0) > 1]
        if sum(int(b.size) for b in outside) + len(raw) >= 2**31 - 2**24:
            return False  # a model past the flatbuffer's 2 GB limit: leave the file alone
        for b in outside:
            b.data = np.frombuffer(raw[int(b.offset) : int(b.offset) + int(b.size)], dtype=np.uint8)
            b.offset, b.size = 0, 0
        entries = {
            TM.METADATA_NAME: TM.build_metadata(card, labels),
            CARD_METADATA_NAME: json.dumps(card, sort_keys=True).encode(),
        }
        model.metadata = [
            m
            for m in (model.metadata or [])
            if (m.name.decode() if isinstance(m.name, bytes) else m.name) not in entries
        ]
        for name, data in entries.items():
            buf = fb.BufferT()
            buf.data = np.frombuffer(data, dtype=np.uint8)
            model.buffers = (model.buffers or []) + [buf]
            meta = fb.MetadataT()
            meta.name = name
            meta.buffer = len(model.buffers) - 1
            model.metadata.append(meta)
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        packed = TM.append_zip(bytes(builder.Output()), TM.associated_files(labels))
        atomic_write_bytes(path, packed)
        return True
    except Exception as e:  # the sidecar card still exists
        log.warning("could not embed metadata into %s (%s); the sidecar JSON has the card", path, e)
        return False


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The embedded robkit card, or None."""
    from ai_edge_litert import schema_py_generated as fb

    data = Path(path).read_bytes()
    model = fb.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        m = model.Metadata(i)
        if m.Name() and m.Name().decode() == CARD_METADATA_NAME:
            raw = model.Buffers(m.Buffer()).DataAsNumpy()
            return json.loads(bytes(raw).decode())
    return None


class TFLiteBackend:
    """TFLite / LiteRT behind the export protocol (``robkit.export.backends.Backend``)."""

    format, runtime = "tflite", "litert"

    def convert(self, job: ConvertJob) -> Converted:
        """litert-torch fp32; fp16 and dynamic int8 by ai-edge-quantizer; static int8 by PT2E."""
        from robkit.export.int8 import pt2e_static_int8

        target, module, out = job.target, job.module, job.out
        conversion: dict[str, Any] = {"runtime": "ai-edge-litert (XNNPACK)", "converter": "litert-torch"}
        plan, simulated = None, None
        if target.precision == "fp32":
            convert_fp32(module, job.example, out)
        elif target.precision == "fp16" or target.quantization.get("mode") == "dynamic":
            convert_fp32(module, job.example, job.tmp / "fp32.tflite")
            (convert_fp16 if target.precision == "fp16" else convert_dynamic_int8)(
                job.tmp / "fp32.tflite", out
            )
            conversion["quantizer"] = "ai-edge-quantizer"
        else:
            from robkit.export.qat import litert_qat_quantizer

            assert job.search_x is not None
            module, rewritten = xnnpack_int8_friendly(module)
            if rewritten:
                conversion["hardswish_rewritten"] = rewritten  # see XNNPackHardswish
            plan, gm, quantizer = pt2e_static_int8(
                module,
                target,
                job.example,
                job.cal_x,
                job.search_x,
                job.is_vit,
                float_input=target.input_dtype == "float32",
                qat=None if job.qat is None else job.qat.for_quantizer(litert_qat_quantizer),
            )
            simulated = run_torch_batch1(gm, job.par_x)
            convert_static_int8(gm, quantizer, job.example, out)
            conversion["quantizer"] = "litert-torch PT2E (static, per-channel)" + (
                ", quantisation-aware distilled"
                if plan.qat is not None and plan.qat["graph"] == "qat"
                else ""
            )
        runner = TFLiteRunner(out, threads=torch.get_num_threads())
        conversion["ops"] = op_counts(out)
        conversion["weights"] = weight_types(out)
        conversion["input_dtype"] = str(runner.input_dtype)
        scale, zero = runner.inp.get("quantization", (0.0, 0))
        if scale:
            conversion["input_quantization"] = {"scale": float(scale), "zero_point": int(zero)}
        return Converted(conversion, plan, simulated)

    def embed(self, path: Path, card: dict[str, Any], labels: list[str] | None) -> bool:
        """Standard TFLite Support metadata (MediaPipe reads it), labels and the card (:func:`embed_metadata`)."""
        return embed_metadata(path, card, labels)

    def run(
        self, path: Path, job: ConvertJob, converted: Converted
    ) -> tuple[np.ndarray, str, dict[str, Any]]:
        """The file in ai-edge-litert (XNNPACK) on the parity images."""
        return self.runner(path, torch.get_num_threads()).run_batches(job.par_x.numpy()), "", {}

    def runner(self, path: Path, threads: int) -> TFLiteRunner:
        """A LiteRT interpreter."""
        return TFLiteRunner(path, threads)

    def read_back(self, path: Path) -> dict[str, Any]:
        """The embedded card and, under ``standard``, the TFLite Support metadata MediaPipe reads."""
        from robkit.export import tflite_metadata as TM

        out: dict[str, Any] = dict(read_metadata(path) or {})
        standard = TM.read_standard_metadata(Path(path).read_bytes())
        if standard is not None:
            out["standard"] = standard
        return out
