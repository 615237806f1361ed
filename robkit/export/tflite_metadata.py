"""Standard TFLite Support metadata (the ``TFLITE_METADATA`` entry MediaPipe Tasks, ML Kit and the
TFLite Task Library read), built from the export card.

What MediaPipe Tasks 0.10 / 1.x requires of an image model (``image_tensor_specs.cc``, and measured
with ``ImageEmbedder.create_from_options`` on robkit's files):

* a float32 input needs ``NormalizationOptions``, else "Input tensor has type float32: it requires
  specifying NormalizationOptions metadata to preprocess input images";
* the options must hold *one* mean and *one* std: per-channel values (the ImageNet mean/std) are
  refused with "Per-channel image normalization is not available";
* MediaPipe feeds ``(pixel - mean) / std`` with ``pixel`` in 0..255, so robkit's float files, whose
  graph takes RGB in [0, 1] and applies the training normalisation itself, declare mean 0, std 255;
* a uint8 input is fed raw pixels and needs no normalisation options.

The metadata flatbuffer (file identifier ``M001``) is written with the schema's generated Python
object API as shipped by MediaPipe (``mediapipe.tasks.metadata.metadata_schema_py_generated``;
tflite-support's copy pins protobuf<4, which onnx and litert-torch cannot live with).  Associated
files (the label list) are appended to the model as a zip archive, the TFLite Support convention
that clients read with their metadata extractor; the flatbuffer itself ignores trailing bytes.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

METADATA_NAME = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
# Every feature used here (image properties, normalisation, axis labels) is in metadata 1.0.0.
MIN_PARSER_VERSION = "1.0.0"


def _schema():
    try:
        from mediapipe.tasks.metadata import metadata_schema_py_generated as md
    except ImportError as e:  # pragma: no cover - the export extra installs mediapipe
        raise RuntimeError(
            "writing standard TFLite metadata needs the metadata schema shipped by mediapipe: "
            "pip install 'robkit[export]' (or pip install mediapipe)"
        ) from e
    return md


def input_normalization(card: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` a MediaPipe client applies to 0..255 pixels for this file, or None (uint8 input)."""
    spec = card["input"]
    if spec["dtype"] == "uint8":
        return None
    if spec["range"] == "0-1":
        return [0.0], [255.0]
    if spec["range"] == "0-255":
        return [0.0], [1.0]
    # A normalised-tensor file: the training normalisation in 0..255 units (single values when
    # the channels agree; per-channel otherwise, which MediaPipe refuses but the Task Library reads).
    norm = card["normalization"]
    mean = [255.0 * float(m) for m in norm["mean"]]
    std = [255.0 * float(s) for s in norm["std"]]
    if len(set(mean)) == 1 and len(set(std)) == 1:
        mean, std = mean[:1], std[:1]
    return mean, std


def build_metadata(card: dict[str, Any], labels: list[str] | None) -> bytes:
    """The ``M001`` metadata flatbuffer for one image model (embedding or classifier)."""
    import flatbuffers

    md = _schema()
    spec, out_spec = card["input"], card["output"]

    image = md.TensorMetadataT()
    image.name = "image"
    res = spec["resolution"]
    contract = {
        "uint8": "raw RGB pixels 0..255",
        "0-1": "RGB float32 in [0, 1] (pixel / 255)",
        "0-255": "RGB float32 in [0, 255]",
    }.get("uint8" if spec["dtype"] == "uint8" else spec["range"], "normalised RGB float32")
    image.description = (
        f"{contract}, {spec['layout']} {spec['shape']}, {res}x{res}; the model applies the training "
        f"normalisation (mean {card['normalization'].get('mean')}, std {card['normalization'].get('std')})"
        if card["normalization"].get("applied_in_model")
        else f"{contract}, {spec['layout']} {spec['shape']}"
    )
    image.content = md.ContentT()
    image.content.contentPropertiesType = md.ContentProperties.ImageProperties
    image.content.contentProperties = md.ImagePropertiesT()
    image.content.contentProperties.colorSpace = md.ColorSpaceType.RGB
    norm = input_normalization(card)
    image.stats = md.StatsT()
    if norm is not None:
        unit = md.ProcessUnitT()
        unit.optionsType = md.ProcessUnitOptions.NormalizationOptions
        unit.options = md.NormalizationOptionsT()
        unit.options.mean, unit.options.std = norm
        image.processUnits = [unit]
        image.stats.min = [(0.0 - m) / s for m, s in zip(*norm)]
        image.stats.max = [(255.0 - m) / s for m, s in zip(*norm)]
    else:
        image.stats.min, image.stats.max = [0.0], [255.0]

    output = md.TensorMetadataT()
    output.content = md.ContentT()
    output.content.contentPropertiesType = md.ContentProperties.FeatureProperties
    output.content.contentProperties = md.FeaturePropertiesT()
    output.stats = md.StatsT()
    if labels:
        output.name = "score"
        output.description = f"{out_spec['kind']} of {len(labels)} classes [1, {out_spec['dim']}]"
        labels_file = md.AssociatedFileT()
        labels_file.name = LABELS_FILE
        labels_file.description = "class names, one a line, in output order"
        labels_file.type = md.AssociatedFileType.TENSOR_AXIS_LABELS
        output.associatedFiles = [labels_file]
    else:
        output.name = "embedding"
        output.description = (
            f"{out_spec['kind']} [1, {out_spec['dim']}] (not L2-normalised; compare with cosine similarity)"
        )

    subgraph = md.SubGraphMetadataT()
    subgraph.inputTensorMetadata = [image]
    subgraph.outputTensorMetadata = [output]

    model = md.ModelMetadataT()
    model.name = f"{card.get('model')} ({card.get('target')})"
    model.description = card.get("description", "") + "".join(
        f"; {k} {card[k]}" for k in ("teacher", "recipe", "method", "precision") if card.get(k)
    )
    model.version = f"robkit {card.get('robkit_version', '')} card {card.get('robkit_card', '')}".strip()
    model.author = str(card.get("author") or "robkit")
    model.license = str(card.get("license") or "")
    model.subgraphMetadata = [subgraph]
    model.minParserVersion = MIN_PARSER_VERSION

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=METADATA_IDENTIFIER)
    return bytes(builder.Output())


def associated_files(labels: list[str] | None) -> dict[str, bytes]:
    """The files packed with the model: ``labels.txt`` (one label a line) if there are labels."""
    return {LABELS_FILE: ("\n".join(labels) + "\n").encode()} if labels else {}


def append_zip(model: bytes, files: dict[str, bytes]) -> bytes:
    """``model`` followed by a stored (uncompressed) zip of ``files``, as TFLite Support packs them."""
    if not files:
        return model
    buf = io.BytesIO(model)
    buf.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buf, "a", compression=zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def read_standard_metadata(data: bytes) -> Any | None:
    """The ``ModelMetadataT`` of a .tflite file's bytes, or None."""
    from ai_edge_litert import schema_py_generated as fb

    md = _schema()
    model = fb.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        m = model.Metadata(i)
        if m.Name() and m.Name().decode() == METADATA_NAME:
            raw = bytes(model.Buffers(m.Buffer()).DataAsNumpy())
            return md.ModelMetadataT.InitFromObj(md.ModelMetadata.GetRootAs(raw, 0))
    return None
