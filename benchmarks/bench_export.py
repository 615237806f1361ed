"""Export latency benchmark: students × formats × precisions on this CPU, one interleaved run per model.

Students are untrained, with BatchNorm statistics re-estimated on 256 Fashion-MNIST training
images, so that quantisation damage shows up as a parity change rather than noise on dead
features.  Each model is exported to its rows' targets with robkit's own ``export_model`` (parity
checked on held-out test images, int8 with the sensitivity search), then every file and PyTorch
eager are timed in one interleaved loop at 1 and 2 threads (ExecuTorch's pool is process-wide:
2 threads only).  A row ``NAME+qat`` is target NAME after quantisation-aware distillation
(``robkit export --qat`` with ``--qat-steps``/``--qat-lr``), beside the post-training row.  Run it
alone on the machine.

    python benchmarks/bench_export.py --out benchmarks/results/export
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import torch  # noqa: E402
from export_rows import add_qat_args, export_row, float_units, qat_graph, qat_seconds, qat_settings  # noqa: E402

from robkit.export import bench as B  # noqa: E402
from robkit.export.images import load_images, reestimate_batchnorm  # noqa: E402
from robkit.export.qat import QATSettings  # noqa: E402
from robkit.export.targets import auto_candidates  # noqa: E402
from robkit.export.wrappers import freeze_input_size  # noqa: E402
from robkit.models.students import build_student  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # the ImageNet statistics students train with
ROWS = {
    "mobilenet_v3": [
        "onnx-fp32",
        "onnx-int8-cpu",
        "android-tflite-fp32",
        "android-tflite-int8",
        "android-tflite-int8+qat",
        "executorch-xnnpack-int8",
        "executorch-xnnpack-int8+qat",
    ],
    "mobilenet_v3_small": [
        "onnx-fp32",
        "android-tflite-fp32",
        "android-tflite-int8",
        "android-tflite-int8+qat",
        "executorch-xnnpack-int8",
        "executorch-xnnpack-int8+qat",
    ],
    "resnet18": ["onnx-fp32", "onnx-int8-cpu", "android-tflite-fp32", "android-tflite-int8"],
    "vit_tiny": ["onnx-fp32", "android-tflite-fp32", "android-tflite-int8"],
}
GOALS_MS = {"mobilenet_v3": 3.7, "resnet18": 4.0, "vit_tiny": 6.5}  # 2-thread targets of the default target


def prepare_student(arch: str, res: int) -> torch.nn.Module:
    torch.manual_seed(0)
    student = build_student(arch)
    u8, _ = load_images("fashion-mnist", "train", 256, res, offset=20000)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return reestimate_batchnorm(student, (u8.float() / 255 - m) / s).eval()


def bench_model(
    arch: str,
    res: int,
    rounds: int,
    outdir: Path,
    threads: list[int],
    qat: QATSettings | None,
    args_cal: int = 64,
) -> list[dict]:
    student = prepare_student(arch, res)
    meta = {
        "normalization": {"mean": MEAN, "std": STD},
        "resolution": res,
        "method": "untrained+BN-reestimated",
        "config": {"data": "fashion-mnist"},
    }
    runners, exported = [], {}
    for name in ROWS[arch]:
        if qat is None and name.endswith("+qat"):
            continue
        r, seconds = export_row(
            student, name, outdir / arch, meta, qat, calibration_images=args_cal, parity_images=64
        )
        if r is None:
            continue
        exported[name] = r
        print(
            f"  {arch} {name}: {seconds:.0f} s, {r.parity.summary()}"
            + (f", {float_units(r)} float layers" if r.card.get("quantization") else ""),
            flush=True,
        )
    macs = B.count_macs(freeze_input_size(student, res), torch.zeros(1, 3, res, res))
    for name, r in exported.items():
        fmt = r.card["format"]
        for t in threads if fmt != "executorch" else [max(threads)]:
            run = B.file_runner(r.path, t)
            run.name, run.macs_g = f"{arch} {name}", macs
            runners.append(run)
    x = torch.randn(1, 3, res, res)
    for t in threads:
        run = B.torch_runner(student, x, t, name=f"{arch} pytorch-eager")
        run.macs_g = macs
        runners.append(run)
    B.run_interleaved(runners, rounds=rounds, warmup=5)
    peaks = {t: B.measure_peak(t) for t in threads}
    rows = []
    for row in B.rows_from(runners, peaks):
        d = row.__dict__.copy()
        name = row.name.split(" ", 1)[1]
        if name in exported:
            e = exported[name]
            d.update(
                target=name,
                passed=e.passed,
                float_layers=float_units(e),
                qat_s=qat_seconds(e),
                qat_graph=qat_graph(e),
                top1=e.parity.top1_agreement,
                vs_sim=(e.parity.vs_simulated or {}).get("cosine"),
            )
        rows.append(d)
    return rows


def default_choice(arch: str, rows: list[dict], t: int) -> dict | None:
    """What `--target auto` picks: of the catalog candidates that met parity, the fastest measured here
    (ties: the catalog's order)."""
    names = auto_candidates(arch)
    met = [r for r in rows if r.get("target") in names and r["threads"] == t and r.get("passed")]
    return min(met, key=lambda r: (r["median_ms"], names.index(r["target"])), default=None)


def _qat_cell(r: dict) -> str:
    """QAT seconds, and the graph the file holds when the post-training plan won."""
    if not r.get("qat_s"):
        return "-"
    return f"{r['qat_s']}" + (" (PTQ graph kept)" if r.get("qat_graph") == "ptq" else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ROWS))
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default="benchmarks/results/export")
    ap.add_argument("--no-qat", action="store_true", help="skip the +qat rows (post-training int8 only)")
    add_qat_args(ap)
    args = ap.parse_args()
    qat = None if args.no_qat else qat_settings(args)
    logging.disable(logging.WARNING)
    threads = [int(t) for t in args.threads.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for t in threads:  # fresh peak for this run (not a cached value measured under other load)
        B.measure_peak(t, refresh=True)
    all_rows = []
    with tempfile.TemporaryDirectory() as d:
        for arch in args.models.split(","):
            print(f"{arch} @ {args.resolution}px", flush=True)
            all_rows += bench_model(arch, args.resolution, args.rounds, Path(d), threads, qat)
    peaks = {t: B.measure_peak(t) for t in threads}
    lines = [
        "| model | target / runtime | prec | threads | median ms | p90 ms | MB | GMACs | GFLOP/s (% peak) "
        "| parity cos | top-1 agree | float layers | parity | QAT s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in all_rows:
        arch, name = r["name"].split(" ", 1)
        lines.append(
            f"| {arch} | {name} ({r['runtime']}) | {r['precision']} | {r['threads']} | {r['median_ms']:.2f} | "
            f"{r['p90_ms']:.2f} | {r['size_mb'] or '-'} | {r['macs_g']:.3f} | {r['gflops']:.0f} "
            f"({100 * (r['peak_fraction'] or 0):.0f} %) | "
            f"{'-' if r['parity_cosine'] is None else format(r['parity_cosine'], '.4f')} | "
            f"{'-' if r.get('top1') is None else format(r['top1'], '.3f')} | {r.get('float_layers', '-')} | "
            f"{'-' if 'passed' not in r else ('met' if r['passed'] else 'FAILED')} | {_qat_cell(r)} |"
        )
    lines.append("")
    for arch in args.models.split(","):
        mine = [r for r in all_rows if r["name"].startswith(arch + " ")]
        pick = default_choice(arch, mine, max(threads))
        goal = GOALS_MS.get(arch)
        met = sorted(
            (r for r in mine if r.get("passed") and r["threads"] == max(threads)),
            key=lambda r: r["median_ms"],
        )
        lines.append(
            f"- `{arch}` measured order (parity met, {max(threads)} threads): "
            + " < ".join(f"{r['target']} {r['median_ms']:.2f}" for r in met)
        )
        if pick:
            lines.append(
                f"- `{arch}`: `--target auto` → `{pick['target']}`, {pick['median_ms']:.2f} ms at "
                f"{max(threads)} threads, cosine {pick['parity_cosine']:.4f}"
                + (f" (goal ≤ {goal} ms: {'met' if pick['median_ms'] <= goal else 'missed'})" if goal else "")
            )
    lines.append(
        "\npeak (fp32 sgemm, onnxruntime MLAS): "
        + ", ".join(f"{p:.0f} GFLOP/s at {t} thread(s)" for t, p in peaks.items())
        + f"; CPU {B.cpu_name()}; QAT {qat.as_dict() if qat else 'rows skipped (--no-qat)'}; total wall time {time.perf_counter() - t_start:.0f} s"
    )
    (out / "export_latency.md").write_text("\n".join(lines) + "\n")
    (out / "export_latency.json").write_text(
        json.dumps({"peaks": peaks, "rows": all_rows}, indent=1, default=str)
    )
    B.plot(
        out / "export_latency.png",
        [
            B.BenchRow(**{k: v for k, v in r.items() if k in B.BenchRow.__dataclass_fields__})
            for r in all_rows
        ],
    )
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
