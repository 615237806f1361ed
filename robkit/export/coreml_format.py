"""Core ML: mlprogram from the torch.export program, image input, labels, weight compression.

* The TorchScript frontend breaks on numpy 2.4 for timm ViTs (``only 0-dimensional arrays can
  be converted to Python scalars``); the ``ExportedProgram`` frontend does not.
* ``ImageType`` takes one scalar scale for NCHW inputs (a per-channel list is rejected), so the
  image arrives as RGB × 1/255 and the ImageNet-style normalisation is inside the graph.
* Classifiers use ``ClassifierConfig(labels)`` (outputs ``classLabel`` and ``classLabel_probs``,
  the graph ends in a softmax).
* Core ML cannot execute on Linux (``Model prediction is only supported on macOS``): here the
  program is checked structurally and a PyTorch model with the same weight rounding gives the
  numeric proxy; on macOS the file itself runs.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from robkit.export.backends import Converted, ConvertJob
from robkit.export.card import flat_metadata
from robkit.export.quantize import QUANTIZABLE, fake_quant_weight
from robkit.export.targets import ExportTarget

log = logging.getLogger(__name__)

IMAGE_INPUT, TENSOR_INPUT = "image", "input"


def can_run_coreml() -> bool:
    """Whether Core ML files can execute here (macOS only)."""
    return platform.system() == "Darwin"


def convert_coreml(
    module: nn.Module, example: torch.Tensor, target: ExportTarget, labels: Sequence[str] | None = None
) -> Any:
    """The in-memory ``MLModel`` (its MIL program is only available before saving)."""
    import coremltools as ct

    program = torch.export.export(module.eval(), (example,)).run_decompositions({})
    if target.input == "image":
        inputs = [
            ct.ImageType(
                name=IMAGE_INPUT,
                shape=tuple(example.shape),
                scale=1.0 / 255.0,
                color_layout=ct.colorlayout.RGB,
            )
        ]
    else:
        inputs = [ct.TensorType(name=TENSOR_INPUT, shape=tuple(example.shape))]
    deployment = getattr(ct.target, target.coreml.get("minimum_deployment_target", "iOS16"))
    mlmodel = ct.convert(
        program,
        inputs=inputs,
        convert_to="mlprogram",
        minimum_deployment_target=deployment,
        compute_precision=ct.precision.FLOAT32 if target.precision == "fp32" else ct.precision.FLOAT16,
        classifier_config=ct.ClassifierConfig(list(labels)) if labels else None,
    )
    compression = target.coreml.get("compression")
    if compression:
        mlmodel = compress(mlmodel, compression)
    return mlmodel


def compress(mlmodel: Any, compression: str) -> Any:
    """``linear8`` (int8 per-channel weights) or ``palettize8`` / ``palettize6`` (k-means LUT)."""
    from coremltools.optimize import coreml as cto

    if compression == "linear8":
        cfg = cto.OptimizationConfig(
            global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", granularity="per_channel")
        )
        return cto.linear_quantize_weights(mlmodel, cfg)
    if compression.startswith("palettize"):
        nbits = int(compression.removeprefix("palettize"))
        cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=nbits))
        return cto.palettize_weights(mlmodel, cfg)
    raise ValueError(f"unknown Core ML compression {compression!r}; use linear8, palettize8 or palettize6")


def set_metadata(mlmodel: Any, card: dict[str, Any]) -> None:
    """Description fields plus every card entry as user-defined metadata (strings)."""
    import json

    mlmodel.author = "robkit"
    mlmodel.short_description = card.get("description", "")
    mlmodel.version = str(card.get("robkit_version", ""))
    mlmodel.license = str(card.get("license", ""))
    for k, v in flat_metadata(card).items():
        mlmodel.user_defined_metadata[k] = v
    if card.get("labels"):
        mlmodel.user_defined_metadata["com.apple.coreml.model.preview.type"] = "imageClassifier"
    spec_inputs = {i.name for i in mlmodel.get_spec().description.input}
    if IMAGE_INPUT in spec_inputs:
        mlmodel.input_description[IMAGE_INPUT] = (
            f"RGB image {card['input']['shape']}; the model applies x/255, then (x - mean) / std with "
            f"mean {card['normalization']['mean']} std {card['normalization']['std']}"
        )
    del json


def inspect(mlmodel: Any) -> dict[str, Any]:
    """Structure of an in-memory mlprogram: inputs, outputs, op inventory, weight storage."""
    spec = mlmodel.get_spec()
    ops: dict[str, int] = {}
    prog = getattr(mlmodel, "_mil_program", None)
    if prog is not None:
        for fn in prog.functions.values():
            for op in fn.operations:
                ops[op.op_type] = ops.get(op.op_type, 0) + 1
    weight_dtypes: dict[str, int] = {}
    if prog is not None:
        for fn in prog.functions.values():
            for op in fn.operations:
                if (
                    op.op_type == "const"
                    and op.outputs[0].val is not None
                    and np.ndim(op.outputs[0].val) >= 2
                ):
                    dt = str(np.asarray(op.outputs[0].val).dtype)
                    weight_dtypes[dt] = weight_dtypes.get(dt, 0) + 1
                elif op.op_type.startswith("constexpr_"):
                    weight_dtypes[op.op_type] = weight_dtypes.get(op.op_type, 0) + 1
    return {
        "inputs": {i.name: i.type.WhichOneof("Type") for i in spec.description.input},
        "outputs": {o.name: o.type.WhichOneof("Type") for o in spec.description.output},
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "weights": weight_dtypes,
        "metadata_keys": sorted(spec.description.metadata.userDefined.keys()),
    }


def _kmeans_1d(w: torch.Tensor, k: int, iters: int = 8) -> torch.Tensor:
    flat = w.flatten()
    centers = torch.quantile(flat.float()[:: max(1, flat.numel() // 100000)], torch.linspace(0, 1, k))
    for _ in range(iters):
        idx = (flat[:, None] - centers[None]).abs().argmin(1)
        sums = torch.zeros(k).index_add_(0, idx, flat)
        counts = torch.zeros(k).index_add_(0, idx, torch.ones_like(flat))
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    return centers[(flat[:, None] - centers[None]).abs().argmin(1)].view_as(w)


# coremltools' constexpr ops that hold a compressed weight (palettised, int8 affine, blockwise)
_COMPRESSED_OPS = ("constexpr_lut_to_dense", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")


def file_weights(path: str | os.PathLike) -> list[np.ndarray]:
    """The compressed weights the saved package holds, decompressed as Core ML will use them, in
    program order: each ``constexpr_lut_to_dense`` is the file's own look-up table indexed by its own
    indices, each ``constexpr_affine_dequantize`` its own int8 values and scales (read from the saved
    MIL program with coremltools; no macOS needed).
    """
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    prog = milproto.load(
        spec, specification_version=spec.specificationVersion, file_weights_dir=mlmodel.weights_dir
    )
    out = []
    for fn in prog.functions.values():
        for op in fn.operations:
            if op.op_type in _COMPRESSED_OPS:
                out.append(np.asarray(op.materialized_val_inference(), dtype=np.float32))
    return out


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``Conv2d`` directly followed by a ``BatchNorm2d`` (eval statistics) fused
    into that conv and the BatchNorm replaced by ``Identity``: what the Core ML converter stores.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in module.modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                parent._modules[a] = fuse_conv_bn_eval(conv, bn)
                parent._modules[b] = nn.Identity()
    return module


def simulated_module(
    module: nn.Module, target: ExportTarget, weights: list[np.ndarray] | None = None
) -> nn.Module:
    """PyTorch stand-in with the file's weight rounding (fp16, int8 per-channel or k-means LUT).

    ``weights`` (:func:`file_weights`) are the compressed weights read back from the file: with
    BatchNorm folded into the convs as the converter does, in module order, each conv/linear weight
    whose shape is the next one's takes it (coremltools leaves small
    weights uncompressed, and those keep their fp16 rounding), so the stand-in computes with the
    file's own look-up tables or int8 values rather than a rounding of its own.
    """
    sim = copy.deepcopy(module).eval()
    if weights is not None:  # the file stores BatchNorm folded into the convs
        sim = fold_batchnorm(sim)
    compression = str(target.coreml.get("compression") or "")
    queue = list(weights or [])
    with torch.no_grad():
        for m in sim.modules():
            for name, p in m.named_parameters(recurse=False):
                compressed = bool(compression) and isinstance(m, QUANTIZABLE) and name == "weight"
                if compressed and weights is not None:
                    if queue and tuple(queue[0].shape) == tuple(p.shape):
                        p.copy_(torch.from_numpy(queue.pop(0)))
                elif compressed and compression == "linear8":
                    p.copy_(fake_quant_weight(p))
                elif compressed and compression.startswith("palettize") and p.numel() >= 2048:
                    p.copy_(_kmeans_1d(p, 2 ** int(compression.removeprefix("palettize"))))
                if target.precision != "fp32":
                    p.copy_(p.half().float())
    if queue:
        raise ValueError(
            f"{len(queue)} compressed weight(s) of the Core ML file (first of shape {tuple(queue[0].shape)}) "
            "match no layer of the model, in order"
        )
    return sim


def predict(path: str | os.PathLike, x: np.ndarray, target: ExportTarget) -> np.ndarray:
    """Run the saved package (macOS only); ``x`` is the float [0,1] NCHW image batch."""
    import coremltools as ct
    from PIL import Image

    model = ct.models.MLModel(str(path))
    outs = []
    for xi in x:
        if target.input == "image":
            img = Image.fromarray(np.round(xi.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")
            r = model.predict({IMAGE_INPUT: img})
        else:
            r = model.predict({TENSOR_INPUT: xi[None]})
        if "classLabel_probs" in r:
            probs = r["classLabel_probs"]
            outs.append(np.array([probs[k] for k in probs], dtype=np.float32)[None])
        else:
            outs.append(np.asarray(next(iter(r.values())), dtype=np.float32).reshape(1, -1))
    return np.concatenate(outs)


def structure_problems(s: dict[str, Any], target: ExportTarget, labels: Sequence[str] | None) -> list[str]:
    """What is wrong with a program's structure (:func:`inspect`) for ``target``; empty if nothing."""
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


def _replace_package(path: Path, write: Callable[[Path], Any]) -> None:
    """Write a new package next to ``path`` with ``write(tmp)``, then swap it in (never half-written)."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")  # coremltools wants the .mlpackage suffix
    old = path.with_name(f".{path.stem}.old{path.suffix}")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    write(tmp)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


class CoreMLBackend:
    """Core ML (mlprogram) behind the export protocol (``robkit.export.backends.Backend``).

    Off macOS the file cannot execute: ``run`` checks the saved program's structure and gives the
    outputs of a PyTorch model with the file's weight rounding, saying so in its note.
    """

    format, runtime = "coreml", "coreml"

    def convert(self, job: ConvertJob) -> Converted:
        """The mlprogram (image input, classifier labels, weight compression), saved as a package."""
        mlmodel = convert_coreml(job.module, job.example, job.target, job.labels)
        structure = inspect(mlmodel)  # the MIL program exists only before saving
        out = job.out
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        mlmodel.save(str(out))
        conversion = {
            "runtime": "coremltools (structural)",
            "converter": "coremltools torch.export frontend",
            **structure,
        }
        return Converted(conversion)

    def embed(self, path: Path, card: dict[str, Any], labels: list[str] | None) -> bool:
        """Author, description, input description and ``robkit.*`` user-defined metadata (Xcode shows them)."""
        import coremltools as ct

        model = ct.models.MLModel(str(path), skip_model_load=True)
        set_metadata(model, card)
        _replace_package(Path(path), lambda tmp: model.save(str(tmp)))
        return True

    def run(
        self, path: Path, job: ConvertJob, converted: Converted
    ) -> tuple[np.ndarray, str, dict[str, Any]]:
        """The package on macOS; elsewhere the structural check and the weight-rounding proxy."""
        from robkit.export.parity import ParityError

        spec_keys = sorted(self.read_back(path))
        structure = {**converted.conversion, "metadata_keys": spec_keys}
        problems = structure_problems(structure, job.target, job.labels)
        if problems:
            raise ParityError(f"Core ML program for {job.target.name} is malformed: {'; '.join(problems)}")
        facts: dict[str, Any] = {"metadata_keys": spec_keys}
        if can_run_coreml():
            facts.update(runtime="Core ML (macOS)", executed=True)
            return predict(path, job.par_x.numpy(), job.target), "", facts
        compression = job.target.coreml.get("compression")
        weights = file_weights(path) if compression else None
        if weights is not None:
            facts["compressed_weights_read_back"] = len(weights)
        with torch.no_grad():
            proxy = simulated_module(job.module, job.target, weights)(job.par_x).numpy()
        note = (
            "Core ML cannot execute on Linux: the program was checked structurally (inputs, outputs, ops, "
            "weight dtypes, metadata) and the numbers are from PyTorch with the file's weight rounding"
            + (" (its compressed weights read back from the file)" if weights is not None else "")
            + "; numeric parity of the file itself needs macOS."
        )
        return proxy, note, facts

    def runner(self, path: Path, threads: int) -> NoReturn:
        """Core ML files run only on Apple devices."""
        from robkit.export.filemodel import ExportError

        raise ExportError(
            f"{path}: coreml files cannot run on this machine (Core ML needs macOS); "
            "run an ONNX, TFLite or ExecuTorch export instead."
        )

    def read_back(self, path: Path) -> dict[str, Any]:
        """The package's user-defined metadata, as Xcode and ``MLModel.modelDescription`` show it."""
        import coremltools as ct

        spec = ct.utils.load_spec(str(path))
        return dict(spec.description.metadata.userDefined)
