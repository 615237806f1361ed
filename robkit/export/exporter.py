"""``export_model``: one student (+ optional linear probe) → one file for one target, with
calibration, mixed-precision int8, parity check and card; ``export_checkpoint``: the same from a
checkpoint file, with ``target="auto"`` trying the targets fastest first until one meets parity.

Flow (the same for every format, through its :class:`robkit.export.backends.Backend`): wrap the
student in the target's input contract, take real images (calibration: train split; parity:
held-out test split), **convert** (one ``torch.export`` program per file), **embed** the metadata,
**run** the very file that ships in its own runtime, compare with PyTorch (**parity**), write the
**card**, and fail loudly if parity is out of bounds.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robkit.export import card as cards
from robkit.export.backends import ConvertJob, backend_for
from robkit.export.images import load_images
from robkit.export.int8 import SEARCH_IMAGES
from robkit.export.parity import ParityError, ParityReport, compare
from robkit.export.qat import QATRun, QATSettings
from robkit.export.targets import ExportTarget, TargetError, validate
from robkit.export.wrappers import build_export_module, make_inputs
from robkit.utils.constants import imagenet_normalization

log = logging.getLogger(__name__)
AUTO_ROUNDS = 20  # interleaved timing rounds per candidate file of `--target auto`


@dataclass
class ExportResult:
    """The written file, its card and the parity report; ``skipped``: targets ``auto`` passed over."""

    path: Path
    card_path: Path
    card: dict[str, Any]
    parity: ParityReport
    skipped: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether the file passed its parity check."""
        return self.parity.passed


def quiet_converters() -> None:
    """The converters log every pass; keep the terminal for robkit's own summary."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "3")
    for name in ("torch.onnx", "coremltools", "absl", "onnxscript", "litert_torch", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
    qat: QATSettings | None = None,
) -> ExportResult:
    """Export ``student`` (+ ``probe``: ``[B, D] -> [B, C]`` logits) to ``out`` for ``target``.

    ``qat``: fine-tune the int8-simulated module to match its fp32 self before conversion
    (:mod:`robkit.export.qat`), on ``qat.images`` training images after the calibration and search
    ones; its state is kept next to ``out`` until the file is written, so a killed export resumes.

    Raises :class:`ParityError` (after writing the file and its card marked failed) when the
    file misses the target's parity thresholds and ``strict``.
    """
    target = validate(target)
    if qat is not None and not qat_capable(target):
        raise TargetError(
            f"--qat trains for static int8 through PT2E (TFLite and ExecuTorch int8 targets, e.g. "
            f"android-tflite-int8, executorch-xnnpack-int8); target {target.name} is {target.format} "
            f"{target.precision}. Pick one of those targets, or drop --qat."
        )
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
    qat_run = None
    if qat is not None:
        q_u8, _ = load_images(
            data or target.calibration["data"],
            target.calibration["split"],
            qat.images,
            res,
            offset=cal_n + SEARCH_IMAGES,
        )
        qat_run = QATRun(qat, make_inputs(q_u8, target, mean, std), out.with_name(out.name + ".qat-state.pt"))
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

    backend = backend_for(target.format)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpd:
        job = ConvertJob(
            module=module,
            target=target,
            out=out,
            tmp=Path(tmpd),
            example=example,
            cal_x=cal_x,
            par_x=par_x,
            search_x=search_x,
            is_vit=is_vit,
            labels=labels,
            qat=qat_run,
        )
        converted = backend.convert(job)
        conversion, plan = converted.conversion, converted.plan
        conversion["seconds"] = round(time.perf_counter() - t0, 2)
        # Metadata goes in before the file runs: the file measured is the file that ships. The embedded
        # card has provenance, I/O contract and conversion; the parity numbers are in the sidecar card,
        # next to the hash of these very bytes.
        card["quantization"] = plan.as_dict() if plan is not None else None
        embedded = {**card, "conversion": conversion}
        card["metadata_embedded"] = backend.embed(out, embedded, labels)
        conversion["parity_file_sha256"] = cards.sha256(out)
        outputs, note, facts = backend.run(out, job, converted)
    conversion.update(facts)
    card["conversion"] = conversion

    report = compare(
        outputs,
        reference,
        runtime=conversion.get("runtime", target.format),
        classifier=probe is not None,
        thresholds=target.parity,
        simulated=converted.simulated,
        note=note,
    )
    card["parity"] = report.as_dict()
    if target.format == "coreml" and not conversion.get("executed"):
        card["status"] = "passed (structural; numeric parity needs macOS)" if report.passed else "failed"
    else:
        card["status"] = "passed" if report.passed else "failed"
    card_path = cards.write_card(out, card)
    if qat_run is not None and qat_run.state is not None:
        qat_run.state.unlink(missing_ok=True)  # the file is written: nothing left to resume
    if card["conversion"]["parity_file_sha256"] != cards.sha256(out):
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


def qat_capable(target: ExportTarget) -> bool:
    """Whether ``target`` is static int8 through PT2E, which quantisation-aware distillation trains for."""
    return (
        target.precision == "int8"
        and target.format in ("tflite", "executorch")
        and target.quantization.get("mode") != "dynamic"
    )


def _input_range(target: ExportTarget) -> str:
    """What one input value is: raw pixels, pixels / 255, or training-normalised values.

    TFLite ``image`` files take RGB float in [0, 1] (MediaPipe feeds ``pixel / 255`` when the
    metadata says mean 0, std 255); Core ML ``image`` inputs are ImageType pixels 0..255.
    """
    if target.input_dtype == "uint8":
        return "0-255"
    if target.input == "image":
        return "0-255" if target.format == "coreml" else "0-1"
    return "normalized"


def export_checkpoint(
    checkpoint: str | Path,
    target: str | None = None,
    fmt: str | None = None,
    precision: str | None = None,
    out: str | Path | None = None,
    probe: nn.Module | None = None,
    labels: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    echo: Callable[[str], None] = log.info,
    auto_threads: int | None = None,
    **options: Any,
) -> ExportResult:
    """Export a robkit ``checkpoint`` (+ a linear ``probe`` such as ``robkit eval linear``'s, with its ``labels``).

    A ``robkit finetune`` checkpoint exports as its classifier, with its label names, unless ``probe`` is given.

    ``target``: a catalog target, or ``"auto"`` for the fastest target of the student's
    architecture that meets parity: every candidate (``targets.auto_candidates``) is exported, a
    target that misses parity or whose converter is not installed is skipped, and the files that pass
    are timed side by side here (``auto_threads``, default 2) and the fastest is returned
    (:func:`choose_fastest`). ``fmt``/``precision``
    pick the default target of that format; ``overrides`` change its ``layout``/``input_dtype``.
    The file goes to ``out`` (default: ``export/<checkpoint stem>-<target>`` next to the
    checkpoint). ``options`` are :func:`export_model`'s keywords (resolution, data, image counts).
    """
    from robkit.export.targets import auto_candidates, resolve_target
    from robkit.models.checkpoint import checkpoint_classifier, load_student

    student, meta = load_student(checkpoint)
    if probe is None and meta.get("method") == "finetune":
        # A `robkit finetune` checkpoint is a classifier: its head and label names go into the file.
        found = checkpoint_classifier(checkpoint)
        if found is not None:
            probe, labels = found
    auto = target == "auto"
    if auto and (fmt or precision):
        raise TargetError("--target auto chooses the format and precision; drop --format/--precision")
    names = auto_candidates(student.arch) if auto else [target]
    skipped: list[str] = []
    passed: list[ExportResult] = []
    last_error: BaseException | None = None
    for name in names:
        t = resolve_target(fmt, precision, name, **{k: v for k, v in (overrides or {}).items() if v})
        kw = dict(options)
        if auto and kw.get("qat") is not None and not qat_capable(t):
            kw["qat"] = None  # auto: QAT where it applies, the other candidates as they are
        stem = Path(checkpoint).with_suffix("").name
        dest = Path(out) if out else Path(checkpoint).parent / "export" / f"{stem}-{t.name}"
        if out and auto:
            dest = Path(out).with_name(f"{Path(out).stem}-{t.name}")
        echo(f"exporting {student.arch} to {t.name} ({t.description})")
        try:
            res = export_model(
                student, t, dest, probe=probe, labels=labels, meta=meta, checkpoint=str(checkpoint), **kw
            )
        except ParityError as e:
            if not auto:
                raise
            echo(f"  {t.name} misses parity ({e.report.summary() if e.report else e}); trying the next")
            skipped.append(t.name)
            last_error = e
            continue
        except RuntimeError as e:
            if not auto or "pip install" not in str(e):
                raise
            echo(f"  {t.name} unavailable ({str(e).splitlines()[0]}); trying the next")
            skipped.append(t.name)
            last_error = e
            continue
        if not auto:
            return res
        passed.append(res)
    if not passed:
        assert last_error is not None  # auto_candidates is never empty
        raise last_error
    best = choose_fastest(passed, echo=echo, threads=auto_threads)
    best.skipped = skipped
    return best


def time_files(paths: list[Path], threads: int, rounds: int = AUTO_ROUNDS) -> list[float]:
    """Median latency in ms of each exported file, timed side by side (interleaved rounds)."""
    from robkit.export import bench

    runners = [bench.file_runner(p, threads) for p in paths]
    bench.run_interleaved(runners, rounds=rounds, warmup=3)
    return [sorted(r.times)[len(r.times) // 2] * 1e3 for r in runners]


def choose_fastest(
    results: list[ExportResult], echo: Callable[[str], None] = log.info, threads: int | None = None
) -> ExportResult:
    """The fastest of the files that met parity, measured here side by side; every card records the
    comparison (``auto``: candidates, their median ms, the threads and CPU), so a file that meets parity
    but is slower than another one never becomes the default.
    """
    from robkit.engine.hardware import usable_cores
    from robkit.utils.machine import cpu_name

    if len(results) == 1:
        return results[0]
    n = int(threads or min(2, usable_cores()))
    medians = time_files([r.path for r in results], n)
    best_i = min(range(len(results)), key=lambda i: medians[i])
    record: dict[str, Any] = {
        "chosen": results[best_i].card.get("target"),
        "threads": n,
        "cpu": cpu_name(),
        "rounds": AUTO_ROUNDS,
        "candidates": [
            {"target": r.card.get("target"), "file": r.path.name, "median_ms": round(m, 3)}
            for r, m in zip(results, medians, strict=True)
        ],
    }
    for r in results:
        r.card = {**r.card, "auto": record}
        cards.write_card(r.path, r.card)
    echo(
        "  measured at "
        + f"{n} threads: "
        + ", ".join(f"{c['target']} {c['median_ms']:.2f} ms" for c in record["candidates"])
        + f" -> {record['chosen']}"
    )
    return results[best_i]
