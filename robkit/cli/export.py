"""``robkit export`` and ``robkit bench``: thin click commands over robkit.export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from robkit.cli import clean_error
from robkit.export.targets import FORMATS
from robkit.utils.errors import RobkitError

if TYPE_CHECKING:
    from robkit.export.exporter import ExportResult


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), help="File format (default target of that format)."
)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), help="Numeric precision.")
@click.option(
    "--target",
    help="Catalog target (see export/targets.yaml), or 'auto': every candidate of the student's "
    "architecture exported, and the fastest file meeting parity (timed here, side by side) returned.",
)
@click.option(
    "--out", type=click.Path(), help="Output file (suffix added if missing). Default: next to CHECKPOINT."
)
@click.option(
    "--probe",
    "probe_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Linear probe from `robkit eval linear`: export a classifier with its labels.",
)
@click.option(
    "--resolution", type=int, help="Input size in px (default: the checkpoint's training resolution)."
)
@click.option(
    "--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False), help="Override input layout."
)
@click.option("--input-dtype", type=click.Choice(["float32", "uint8"]), help="Override input dtype.")
@click.option("--data", help="Images for calibration and parity (default: Fashion-MNIST).")
@click.option("--calibration-images", type=int, help="Number of calibration images (int8).")
@click.option("--parity-images", type=int, help="Number of held-out images for the parity check.")
@click.option(
    "--qat",
    is_flag=True,
    help="int8: quantisation-aware distillation first (the int8-simulated student trained to match its "
    "fp32 self on unlabelled training images); resumes if killed.",
)
@click.option("--qat-steps", type=click.IntRange(min=0), default=300, show_default=True, help="QAT steps.")
@click.option(
    "--qat-images", type=click.IntRange(min=1), default=2048, show_default=True, help="QAT training images."
)
@click.option("--qat-lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--qat-batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--qat-range-lr",
    type=click.FloatRange(min=0),
    default=1e-3,
    show_default=True,
    help="Learning rate of the activation ranges during QAT (0: keep the calibrated ranges).",
)
def export(
    checkpoint: str,
    fmt: str | None,
    precision: str | None,
    target: str | None,
    out: str | None,
    probe_file: str | None,
    resolution: int | None,
    layout: str | None,
    input_dtype: str | None,
    data: str | None,
    calibration_images: int | None,
    parity_images: int | None,
    qat: bool,
    qat_steps: int,
    qat_images: int,
    qat_lr: float,
    qat_batch_size: int,
    qat_range_lr: float,
) -> None:
    """Convert a student CHECKPOINT to a mobile file, check parity, write its card.

    \b
    Examples:
      robkit export run/checkpoint.pt --format tflite                 (default: android-tflite-fp32)
      robkit export run/checkpoint.pt --target android-tflite-int8 --probe run/probe.pt
      robkit export run/checkpoint.pt --target auto                   (fastest target meeting parity)
      robkit export run/checkpoint.pt --target android-tflite-int8 --qat  (quantisation-aware int8)
    """
    from robkit.export.exporter import quiet_converters

    quiet_converters()
    from robkit.export.exporter import export_checkpoint
    from robkit.export.qat import QATSettings
    from robkit.export.targets import TargetError

    try:
        probe, labels = None, None
        if probe_file:
            from robkit.evaluation.linear import load_probe

            probe, pmeta = load_probe(probe_file)
            labels = pmeta.get("labels")
        res = export_checkpoint(
            checkpoint,
            target=target,
            fmt=fmt,
            precision=precision,
            out=out,
            probe=probe,
            labels=labels,
            overrides={"layout": layout, "input_dtype": input_dtype},
            echo=click.echo,
            resolution=resolution,
            data=data,
            calibration_images=calibration_images,
            parity_images=parity_images,
            qat=QATSettings(
                steps=qat_steps,
                images=qat_images,
                lr=qat_lr,
                batch_size=qat_batch_size,
                range_lr=qat_range_lr,
            )
            if qat
            else None,
        )
    except TargetError as e:
        raise click.UsageError(str(e)) from None
    except (RobkitError, RuntimeError) as e:  # parity, checkpoint, data, a converter that is missing
        raise clean_error(e) from None
    _summary(res, res.skipped)


def _summary(res: ExportResult, skipped: list[str]) -> None:
    card = res.card
    click.echo(f"\nwrote {res.path}  ({card['file_bytes'] / 1e6:.2f} MB, sha256 {card['file_sha256'][:12]}…)")
    click.echo(f"  card     {res.card_path}")
    click.echo(
        f"  input    {card['input']['name']} {card['input']['shape']} {card['input']['layout']} "
        f"{card['input']['dtype']} range {card['input']['range']}"
    )
    click.echo(
        f"  output   {card['output']['kind']} [{card['output']['dim']}]"
        + (f", {len(card['labels'])} labels" if card.get("labels") else "")
    )
    click.echo(f"  parity   {res.parity.summary()}: {card['status']}")
    if res.parity.note:
        click.echo(f"           {res.parity.note}")
    q = card.get("quantization")
    if q:
        if q["float_layers"]:
            click.echo(
                f"  int8     {len(q['float_layers'])} sensitive layers kept float: "
                + ", ".join(q["float_layers"][:6])
                + (" …" if len(q["float_layers"]) > 6 else "")
            )
        else:
            click.echo(f"  int8     every supported layer quantised ({q['quantized_ops']})")
        if q.get("qat"):
            a = q["qat"]
            click.echo(
                f"  qat      {a['steps']} steps in {a['seconds']:.0f} s: cosine to fp32 on held-out training "
                f"images {a['cosine_before']:.4f} (calibrated) -> {a['cosine_after']:.4f}"
            )
            if a.get("graph") == "ptq":
                qp, pp = a["qat_plan"], a["ptq_plan"]
                click.echo(
                    f"           QAT fell short ({qp['float_layers']} float, cosine {qp['cosine']:.4f}); the "
                    f"post-training graph is the file ({pp['float_layers']} float, cosine {pp['cosine']:.4f})"
                )
    if skipped:
        click.echo(f"  auto     skipped {', '.join(skipped)} (parity or availability)")
    auto = card.get("auto")
    if auto:
        timed = ", ".join(f"{c['target']} {c['median_ms']:.2f} ms" for c in auto["candidates"])
        click.echo(f"  auto     fastest at {auto['threads']} threads on {auto['cpu']}: {timed}")
    if card["format"] == "coreml":
        click.echo("\nnext: open the .mlpackage in Xcode (Performance tab) to time it on an Apple device")
    else:
        click.echo(
            f"\nnext: robkit bench {res.path}"
            + (f" --checkpoint {card['checkpoint']}" if card.get("checkpoint") else "")
        )


@click.command("bench")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="Also time PyTorch eager.")
@click.option("--threads", default="1,2", show_default=True, help="Comma-separated thread counts.")
@click.option(
    "--rounds", default=50, show_default=True, help="Interleaved rounds (one call per runner each)."
)
@click.option("--warmup", default=5, show_default=True)
@click.option("--json", "json_out", type=click.Path(), help="Write results JSON here.")
@click.option("--plot", "plot_out", type=click.Path(), help="Write a bar plot PNG here.")
@click.option(
    "--merge",
    "merge",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="On-device results (TFLite benchmark_model output or JSON rows) to add to the table.",
)
@click.option("--update-cards/--no-update-cards", default=True, help="Store latency in each file's card.")
def bench(
    paths: tuple[str, ...],
    checkpoint: str | None,
    threads: str,
    rounds: int,
    warmup: int,
    json_out: str | None,
    plot_out: str | None,
    merge: tuple[str, ...],
    update_cards: bool,
) -> None:
    """Latency of exported files (median/p90, interleaved), size, MACs and GFLOP/s vs the CPU's peak."""
    from robkit.export.exporter import quiet_converters

    quiet_converters()
    from robkit.export import bench as B

    if not paths and not merge:
        raise click.UsageError("give exported files (.onnx, .ort, .tflite, .pte) and/or --merge results")
    counts = sorted({int(t) for t in threads.split(",") if t.strip()})
    try:
        report = B.bench_files(
            [Path(p) for p in paths],
            checkpoint=checkpoint,
            threads=counts,
            rounds=rounds,
            warmup=warmup,
            merge=list(merge),
            update_cards=update_cards,
        )
    except RobkitError as e:
        raise clean_error(e) from None
    click.echo(B.format_table(report.rows, report.peaks))
    click.echo(
        f"{report.runners} runners, {rounds} interleaved rounds after {warmup} warm-up calls; CPU: {B.cpu_name()}"
    )
    click.echo(
        "Phones and Apple devices are not reachable from here: these are host-CPU numbers; "
        "merge on-device results with --merge."
    )
    for n in report.notes:
        click.echo(f"note: {n}")
    if json_out:
        B.write_json(json_out, report.rows, report.peaks, {"rounds": rounds, "warmup": warmup})
        click.echo(f"wrote {json_out}")
    if plot_out:
        B.plot(plot_out, report.rows)
        click.echo(f"wrote {plot_out}")
