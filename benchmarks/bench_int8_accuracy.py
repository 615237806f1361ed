"""What export costs in accuracy: trained students, fp32 PyTorch vs each exported file, on Fashion-MNIST.

For every run folder (``checkpoint.pt`` and, if present, the ``probe.pt`` that ``robkit eval linear``
or the demo wrote), the student is exported to each target with robkit's ``export_model``
(calibration on training images, parity on held-out test images, int8 with the sensitivity
search), then the evaluation images are embedded twice, by the PyTorch checkpoint and by the file
in its own runtime, and compared on:

* weighted kNN top-1 (DINO's protocol, k=20, T=0.07) of the file's own embeddings, and
* linear-probe top-1 with the probe fitted on the *fp32* features applied to the file's
  embeddings: what an app that ships the probe as its classifier gets.

A target written ``NAME+qat`` is the same target after quantisation-aware distillation
(``robkit export --qat``, :mod:`robkit.export.qat`), so post-training and QAT int8 sit side by side;
every file of a run is then timed in the same interleaved rounds (median ms at ``--threads``).

    python benchmarks/bench_int8_accuracy.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/int8-accuracy
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import torch  # noqa: E402
from export_rows import add_qat_args, export_row, float_units, qat_seconds, qat_settings  # noqa: E402

from robkit.evaluation.api import open_eval_splits  # noqa: E402
from robkit.evaluation.features import extract_features  # noqa: E402
from robkit.evaluation.knn import knn_accuracy  # noqa: E402
from robkit.evaluation.linear import load_probe  # noqa: E402
from robkit.export.exporter import time_files  # noqa: E402
from robkit.export.filemodel import ExportedFileModel  # noqa: E402
from robkit.export.qat import QATSettings  # noqa: E402
from robkit.models.checkpoint import load_student  # noqa: E402
from robkit.utils.machine import cpu_name  # noqa: E402

TARGETS = [
    "android-tflite-fp32",
    "android-tflite-int8",
    "android-tflite-int8+qat",
    "onnx-int8-cpu",
    "executorch-xnnpack-int8",
    "executorch-xnnpack-int8+qat",
]


def _probe_top1(probe, feats: torch.Tensor, labels: torch.Tensor) -> float | None:
    if probe is None:
        return None
    with torch.no_grad():
        return float((probe(feats).argmax(1) == labels).float().mean())


def bench_run(
    run: Path,
    targets: list[str],
    train_limit: int,
    test_limit: int,
    tmp: Path,
    qat: QATSettings,
    threads: int = 2,
    resolution: int | None = None,
) -> list[dict]:
    ckpt = run / "checkpoint.pt"
    student, meta = load_student(ckpt)
    probe = load_probe(run / "probe.pt")[0] if (run / "probe.pt").is_file() else None
    res = int(resolution or meta.get("resolution") or 32)
    norm = meta.get("normalization") or {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    train_ds, test_ds = open_eval_splits("fashion-mnist", train_limit, test_limit, canvas_px=res)

    def embed(model):
        kw = {"progress": False, "batch_size": 256}
        tr = extract_features(model, train_ds, res, norm["mean"], norm["std"], **kw)
        te = extract_features(model, test_ds, res, norm["mean"], norm["std"], **kw)
        return tr, te

    (x_tr, y_tr), (x_te, y_te) = embed(student)
    base_knn = knn_accuracy(x_tr, y_tr, x_te, y_te)
    base_probe = _probe_top1(probe, x_te, y_te)
    name = (
        f"{run.name} ({student.arch}, {meta.get('method')}, {meta.get('progress', {}).get('global_step')} steps"
        f"{'' if res == meta.get('resolution') else f', run at {res} px'})"
    )
    rows = [{"run": name, "target": "pytorch fp32", "knn": base_knn, "probe": base_probe}]
    print(f"{name}: pytorch fp32 kNN {base_knn:.4f} probe {base_probe}", flush=True)
    paths = []
    for t in targets:
        r, seconds = export_row(student, t, tmp / run.name, meta, qat, resolution=res)
        if r is None:
            continue
        (f_tr, _), (f_te, _) = embed(ExportedFileModel(r.path, threads=torch.get_num_threads()))
        paths.append(r.path)
        row = {
            "run": name,
            "target": t,
            "knn": knn_accuracy(f_tr, y_tr, f_te, y_te),
            "probe": _probe_top1(probe, f_te, y_te),
            "parity_cosine": r.parity.cosine,
            "passed": r.passed,
            "float_layers": float_units(r),
            "export_s": round(seconds, 1),
            "qat_s": qat_seconds(r),
        }
        rows.append(row)
        print(
            f"  {t}: kNN {row['knn']:.4f} ({100 * (row['knn'] - base_knn):+.2f} pt), probe {row['probe']}, "
            f"parity {row['parity_cosine']:.4f} ({'met' if row['passed'] else 'FAILED'}), "
            f"{row['float_layers']} float units, {row['export_s']} s",
            flush=True,
        )
    for row, ms in zip(rows[1:], time_files(paths, threads), strict=True):
        row["median_ms"], row["threads"] = ms, threads
    return rows


def _pct(v: float | None, base: float | None = None) -> str:
    if v is None:
        return "-"
    s = f"{100 * v:.2f}"
    return s + (f" ({100 * (v - base):+.2f})" if base is not None else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int8-accuracy"))
    ap.add_argument("--threads", type=int, default=2, help="threads the files are timed at")
    ap.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="input px of the files and of the evaluation (default: each checkpoint's training resolution)",
    )
    add_qat_args(ap)
    args = ap.parse_args()
    qat = qat_settings(args)
    logging.disable(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for run in args.runs:
            rows += bench_run(
                run,
                args.targets.split(","),
                args.train_limit,
                args.test_limit,
                Path(d),
                qat,
                args.threads,
                args.resolution,
            )
    lines = [
        "| student run | target | parity cos | float units | kNN top-1 % (Δ pt) | fp32 probe top-1 % (Δ pt) "
        f"| ms ({args.threads} threads) | QAT s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base: dict[str, dict] = {}
    for r in rows:
        if r["target"] == "pytorch fp32":
            base[r["run"]] = r
            lines.append(
                f"| {r['run']} | PyTorch fp32 | - | - | {_pct(r['knn'])} | {_pct(r['probe'])} | - | - |"
            )
            continue
        b = base[r["run"]]
        status = f"{r['parity_cosine']:.4f}" + ("" if r["passed"] else " (FAILED)")
        lines.append(
            f"| | {r['target']} | {status} | {r['float_layers']} | {_pct(r['knn'], b['knn'])} | "
            f"{_pct(r['probe'], b['probe'])} | {r['median_ms']:.2f} | {r['qat_s'] if r['qat_s'] else '-'} |"
        )
    text = "\n".join(lines) + (
        f"\n\nevaluation: {args.train_limit} train / {args.test_limit} test images; QAT {qat.as_dict()}; "
        f"CPU {cpu_name()}\n"
    )
    (args.out / "int8_accuracy.md").write_text(text)
    (args.out / "int8_accuracy.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
