"""How far quantisation-aware distillation closes the int8 gap, against its length and learning rate.

For each run folder the student's export module (the student with the wrapper's folded
normalisation: exactly what the int8 file computes) is quantised with *every* module int8 (no float
fallback, so the search's threshold does not hide the gap), simulated in PyTorch, and compared with
the fp32 module by mean cosine on held-out *training* images, never the test set:

* PTQ: the runtime's post-training static int8, calibrated on the first calibration images;
* QAT start: the fake-quantised graph after calibration only (histogram activation ranges);
* QAT: after ``robkit export --qat``'s distillation for each ``LR:STEPS[:RANGE_LR]`` of ``--grid``
  (``RANGE_LR``: the activation ranges' learning rate, default ``--range-lr``; 0 keeps them fixed).

``--target`` picks the runtime's quantiser (litert-torch for TFLite, XNNPACK for ExecuTorch). Results
go to ``OUT/qat_steps.json`` and ``.md`` and a plot of cosine against steps, ``OUT/qat_steps.png``.

    python benchmarks/bench_qat_steps.py RUN_DIR --grid 1e-4:300,1e-4:1000,3e-4:1000 --out benchmarks/results/qat-steps
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import torch  # noqa: E402

from robkit.export import tflite_format as T  # noqa: E402
from robkit.export.images import load_images  # noqa: E402
from robkit.export.qat import QATSettings, litert_qat_quantizer, qat_distill  # noqa: E402
from robkit.export.quantize import cosine  # noqa: E402
from robkit.export.targets import get_target  # noqa: E402
from robkit.export.wrappers import build_export_module, make_inputs  # noqa: E402
from robkit.models.checkpoint import load_student  # noqa: E402
from robkit.utils.machine import cpu_features, cpu_name  # noqa: E402

HELD_OUT_OFFSET = 40000  # training images no QAT or calibration batch sees


def quantizers(target: str):
    """``(PTQ quantiser factory, QAT quantiser factory)`` of the target's runtime."""
    if target.startswith("executorch"):
        from robkit.export.executorch_format import (
            require_executorch,
            xnnpack_qat_quantizer,
            xnnpack_quantizer,
        )

        require_executorch()
        return xnnpack_quantizer, xnnpack_qat_quantizer
    return None, litert_qat_quantizer  # None: litert-torch's PTQ quantiser, the TFLite default


def bench_run(run: Path, args: argparse.Namespace) -> list[dict]:
    target = get_target(args.target)
    student, meta = load_student(run / "checkpoint.pt")
    res = int(meta.get("resolution") or 32)
    norm = meta.get("normalization") or {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    module = build_export_module(student, target, norm["mean"], norm["std"], resolution=res).eval()

    def images(n: int, offset: int) -> torch.Tensor:
        u8, _ = load_images("fashion-mnist", "train", n, res, offset=offset)
        return make_inputs(u8, target, norm["mean"], norm["std"])

    train_x, held_x = images(args.images, 0), images(args.held_out, HELD_OUT_OFFSET)
    with torch.no_grad():
        ref = module(held_x)
    ptq_factory, qat_factory = quantizers(args.target)
    ptq, _ = T.pt2e_quantize(
        torch.export.export(module, (held_x[:1],)), held_x[:1], train_x[: args.calibration], None, ptq_factory
    )
    ptq_cos = cosine(T.run_torch_batch1(ptq, held_x), ref)
    name = f"{run.name} ({student.arch}, {meta.get('method')}, {meta.get('progress', {}).get('global_step')} steps)"
    print(f"{name}: PTQ all-int8 cosine {ptq_cos:.4f}", flush=True)
    rows = [{"run": name, "target": args.target, "mode": "ptq", "cosine": ptq_cos}]
    for spec in args.grid.split(","):
        parts = spec.split(":")
        lr, steps = float(parts[0]), int(parts[1])
        range_lr = float(parts[2]) if len(parts) > 2 else args.range_lr
        settings = QATSettings(
            steps=steps, lr=lr, batch_size=args.batch_size, images=args.images, range_lr=range_lr
        )
        t0 = time.perf_counter()
        _, _, r = qat_distill(
            module,
            held_x[:1],
            train_x,
            held_x,
            quantizer_factory=qat_factory,
            settings=settings,
            progress=True,
        )
        row = {
            "run": name,
            "target": args.target,
            "mode": "qat",
            "lr": lr,
            "range_lr": range_lr,
            "steps": steps,
            "cosine_start": r.cosine_before,
            "cosine": r.cosine_after,
            "loss_first": r.losses[0] if r.losses else None,
            "loss_last": r.losses[-1] if r.losses else None,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(
            f"  QAT lr {lr:g} range lr {range_lr:g} {steps} steps: cosine {r.cosine_before:.4f} -> {r.cosine_after:.4f}, "
            f"{row['seconds']} s",
            flush=True,
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in dict.fromkeys(r["run"] for r in rows):
        ptq = [r for r in rows if r["run"] == run and r["mode"] == "ptq"]
        qat = [r for r in rows if r["run"] == run and r["mode"] == "qat"]
        for lr, rlr in sorted({(r["lr"], r.get("range_lr", 0.0)) for r in qat}):
            pts = sorted(
                (r["steps"], r["cosine"]) for r in qat if (r["lr"], r.get("range_lr", 0.0)) == (lr, rlr)
            )
            start = qat[0]["cosine_start"]
            ax.plot(
                [0] + [p[0] for p in pts],
                [start] + [p[1] for p in pts],
                marker="o",
                label=f"QAT lr {lr:g}, range lr {rlr:g}",
            )
        if ptq:
            ax.axhline(ptq[0]["cosine"], ls="--", color="grey", lw=0.8, label="PTQ")
    ax.axhline(0.995, ls=":", color="red", lw=0.8, label="target 0.995")
    ax.set_xlabel("QAT steps")
    ax.set_ylabel("held-out cosine to fp32 (all modules int8)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--target", default="android-tflite-int8")
    ap.add_argument("--grid", default="1e-4:300,1e-4:1000,3e-4:1000", help="LR:STEPS, comma-separated")
    ap.add_argument("--images", type=int, default=QATSettings.images, help="QAT training images")
    ap.add_argument("--batch-size", type=int, default=QATSettings.batch_size)
    ap.add_argument("--range-lr", type=float, default=QATSettings.range_lr, help="activation-range lr")
    ap.add_argument(
        "--calibration", type=int, default=64, help="PTQ calibration images (robkit export's default)"
    )
    ap.add_argument("--held-out", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/qat-steps"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for run in args.runs for row in bench_run(run, args)]
    machine = {"cpu": cpu_name(), "cpu_features": cpu_features(), "threads": args.threads}
    (args.out / "qat_steps.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [
        "| run | target | mode | lr | range lr | steps | cosine start | cosine | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        start = "-" if r.get("cosine_start") is None else f"{r['cosine_start']:.4f}"
        lines.append(
            f"| {r['run']} | {r['target']} | {r['mode']} | {r.get('lr', '-')} | {r.get('range_lr', '-')} "
            f"| {r.get('steps', '-')} | {start} "
            f"| {r['cosine']:.4f} | {r.get('seconds', '-')} |"
        )
    lines.append(
        f"\nCPU {machine['cpu']} ({', '.join(machine['cpu_features']) or 'no AVX flags read'}), {args.threads} threads"
    )
    (args.out / "qat_steps.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "qat_steps.png")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
