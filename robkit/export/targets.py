"""Export targets: catalog lookup and validation of format / precision / input combinations.

A target (``export/*.yaml``) fixes everything an app developer has to agree on: the file
format, the numeric precision, the input layout and dtype, the resolution, how int8 is
calibrated, and the parity thresholds checked after export.  A per-format capability table
(the pattern Ultralytics' ``export_formats()`` uses) validates command-line overrides so an
unsupported combination fails before any conversion starts, naming what is supported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from robkit.catalog import CatalogError, Record, registry
from robkit.utils.errors import RobkitError

FORMATS = ("onnx", "tflite", "coreml", "executorch")
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage", "executorch": ".pte"}

# What each format can produce here (and why the rest is refused).
CAPABILITIES: dict[str, dict[str, tuple[str, ...]]] = {
    "onnx": {
        "precision": ("fp32", "int8"),
        "layout": ("NCHW", "NHWC"),
        "input_dtype": ("float32", "uint8"),
        "input": ("tensor",),
    },
    "tflite": {
        "precision": ("fp32", "fp16", "int8"),
        "layout": ("NCHW", "NHWC"),
        "input_dtype": ("float32", "uint8"),
        "input": ("image", "tensor"),
    },
    "coreml": {
        "precision": ("fp32", "fp16", "int8"),
        "layout": ("NCHW",),
        "input_dtype": ("float32",),
        "input": ("image", "tensor"),
    },
    "executorch": {
        "precision": ("fp32", "int8"),
        "layout": ("NCHW", "NHWC"),
        "input_dtype": ("float32", "uint8"),
        "input": ("tensor",),
    },
}
WHY_NOT = {
    ("onnx", "fp16"): "onnxruntime's CPU provider has no fp16 kernels (it would be slower than fp32); "
    "use --format tflite/coreml --precision fp16 for a half-size file",
    ("executorch", "fp16"): "XNNPACK fp16 needs ARM fp16 hardware to pay off and cannot be checked here",
    ("coreml", "uint8"): "Core ML takes images as ImageType (RGB pixels, scale 1/255); use --input image",
}

DEFAULT_CALIBRATION = {"images": 64, "data": "fashion-mnist", "split": "train"}
DEFAULT_PARITY = {
    "images": 64,
    "data": "fashion-mnist",
    "split": "test",
    "min_cosine": 0.999,
    "min_top1": 0.98,
}


class TargetError(RobkitError, ValueError):
    """An export target or option combination that robkit cannot produce."""


@dataclass
class ExportTarget:
    """Everything fixed by one export target (see ``export/targets.yaml`` for the field meanings)."""

    name: str
    format: str
    precision: str = "fp32"
    layout: str = "NCHW"
    input_dtype: str = "float32"
    input: str = "tensor"
    resolution: int | None = None
    description: str = ""
    default: bool = False
    calibration: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CALIBRATION))
    parity: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARITY))
    quantization: dict[str, Any] = field(default_factory=dict)
    coreml: dict[str, Any] = field(default_factory=dict)
    container: str = ""  # ONNX only: "ort" writes the ORT format of ONNX Runtime Mobile

    @property
    def suffix(self) -> str:
        """The file suffix of the target's format (e.g. ``.onnx``, ``.ort`` for the ORT container)."""
        return ".ort" if self.container == "ort" else SUFFIX[self.format]

    @property
    def folds_normalization(self) -> bool:
        """uint8 pixels and images (Core ML ImageType, TFLite RGB in [0, 1]) arrive un-normalised:
        the model divides by std itself.
        """
        return self.input_dtype == "uint8" or self.input == "image"

    def as_dict(self) -> dict[str, Any]:
        """A deep copy of the target's fields as a dict."""
        return copy.deepcopy(self.__dict__)


def _from_record(rec: Record) -> ExportTarget:
    f = dict(rec.fields)
    calibration = {**DEFAULT_CALIBRATION, **(f.get("calibration") or {})}
    parity = {**DEFAULT_PARITY, **(f.get("parity") or {})}
    return ExportTarget(
        name=rec.name,
        format=str(f["format"]),
        precision=str(f.get("precision", "fp32")),
        layout=str(f.get("layout", "NCHW")).upper(),
        input_dtype=str(f.get("input_dtype", "float32")),
        input=str(f.get("input", "tensor")),
        resolution=f.get("resolution"),
        description=str(f.get("description", "")),
        default=bool(f.get("default", False)),
        calibration=calibration,
        parity=parity,
        quantization=dict(f.get("quantization") or {}),
        coreml=dict(f.get("coreml") or {}),
        container=str(f.get("container") or ""),
    )


def target_names(fmt: str | None = None) -> list[str]:
    """Names of the catalog's single export targets, of format ``fmt`` only if given."""
    reg = registry("export")
    return [r.name for r in reg if r.get("format") in FORMATS and (fmt is None or r.get("format") == fmt)]


def get_target(name: str) -> ExportTarget:
    """The catalog target ``name`` (suggests close names on a typo)."""
    rec = registry("export").get(name)
    if rec.get("format") not in FORMATS:
        raise TargetError(f"{name!r} is not a single export target (format {rec.get('format')!r})")
    return _from_record(rec)


def default_target(fmt: str) -> ExportTarget:
    """The target marked ``default: true`` for ``fmt``."""
    check_format(fmt)
    defaults = [n for n in target_names(fmt) if registry("export").get(n).get("default")]
    if len(defaults) != 1:
        raise TargetError(
            f"the export catalog must mark exactly one default target for {fmt}, found {defaults}"
        )
    return get_target(defaults[0])


def auto_candidates(arch: str) -> list[str]:
    """Targets to try in order for ``--target auto`` (fastest measured first)."""
    rec = registry("export").get("auto")
    return list((rec.get("candidates") or {}).get(arch) or rec.get("fallback") or ["onnx-fp32"])


def check_format(fmt: str) -> None:
    """Raise :class:`TargetError` unless ``fmt`` is a supported export format."""
    if fmt not in FORMATS:
        raise TargetError(f"unknown export format {fmt!r}; supported formats: {', '.join(FORMATS)}")


def validate(t: ExportTarget) -> ExportTarget:
    """Refuse combinations a format cannot produce, naming what it supports."""
    check_format(t.format)
    if t.container not in ("", "ort") or (t.container and t.format != "onnx"):
        raise TargetError(
            f"target {t.name}: container {t.container!r} is not supported; the only container is 'ort' "
            "(ONNX Runtime Mobile), for onnx targets"
        )
    caps = CAPABILITIES[t.format]
    for key in ("precision", "layout", "input_dtype", "input"):
        value = getattr(t, key)
        if value not in caps[key]:
            why = WHY_NOT.get((t.format, value))
            raise TargetError(
                f"{t.format} export does not support {key} {value!r}"
                + (f" ({why})" if why else "")
                + f"; supported {key} values for {t.format}: {', '.join(caps[key])}. "
                f"Catalog targets for {t.format}: {', '.join(target_names(t.format))}."
            )
    if (
        t.precision == "int8"
        and t.format != "coreml"
        and t.quantization.get("mode") not in ("static", "dynamic")
    ):
        raise TargetError(f"int8 target {t.name!r} needs quantization.mode static or dynamic")
    if t.format == "tflite" and t.quantization.get("mode") == "dynamic" and t.input_dtype == "uint8":
        raise TargetError("dynamic-range int8 TFLite keeps float activations; uint8 input needs static int8")
    if t.resolution is not None and int(t.resolution) < 16:
        raise TargetError(f"resolution must be at least 16 px, got {t.resolution}")
    return t


def resolve_target(
    fmt: str | None = None, precision: str | None = None, target: str | None = None, **overrides: Any
) -> ExportTarget:
    """The target to export to: a named one, or the format's default, with command-line overrides.

    ``--precision`` alone (no ``--target``) picks the catalog target of that format and precision
    (the default one if it matches, else the first), so ``--format tflite --precision int8`` just works.
    """
    if target:
        try:
            t = get_target(target)
        except CatalogError as e:
            raise TargetError(str(e)) from None
        if fmt and fmt != t.format:
            raise TargetError(f"--format {fmt} contradicts target {target!r}, which is {t.format}")
        if precision and precision != t.precision:
            raise TargetError(
                f"--precision {precision} contradicts target {target!r}, which is {t.precision}; "
                f"{fmt or t.format} targets: {', '.join(target_names(t.format))}"
            )
    else:
        if not fmt:
            raise TargetError("give --format (onnx, tflite, coreml, executorch) or --target NAME")
        t = default_target(fmt)
        if precision and precision != t.precision:
            if precision not in CAPABILITIES[fmt]["precision"]:
                validate(ExportTarget(name="(command line)", format=fmt, precision=precision))
            matches = [get_target(n) for n in target_names(fmt)]
            matches = [m for m in matches if m.precision == precision]
            t = matches[0]
    for key, value in overrides.items():
        if value is not None:
            setattr(t, key, value.upper() if key == "layout" else value)
    return validate(t)
