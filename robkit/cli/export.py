"""``robkit export`` and ``robkit bench``: thin click commands over robkit.export."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from robkit.cli import clean_error
from robkit.export.targets import FORMATS


def _quiet_converters() -> None:
    """The converters log every pass; keep the terminal for robkit's own summary."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "3")
    for name in ("torch.onnx", "coremltools", "absl", "onnxscript", "litert_torch", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), help="File format (default target of that format)."
)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), help="Numeric precision.")
@click.option(
    "--target", help="Catalog target (see export/targets.yaml), or 'auto': fastest target meeting parity."
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
def export(
    checkpoint,
    fmt,
    precision,
    target,
    out,
    probe_file,
    resolution,
    layout,
    input_dtype,
    data,
    calibration_images,
    parity_images,
) -> None:
    """Convert a student CHECKPOINT to a mobile file, check parity, write its card.

    \b
    Examples:
      robkit export run/checkpoint.pt --format tflite                 (default: android-tflite-fp32)
      robkit export run/checkpoint.pt --target android-tflite-int8 --probe run/probe.pt
      robkit export run/checkpoint.pt --target auto                   (fastest target meeting parity)
    """
    _quiet_converters()
    from robkit.export.exporter import export_model
    from robkit.export.parity import ParityError
    from robkit.export.targets import TargetError, auto_candidates, resolve_target
    from robkit.models.checkpoint import CheckpointError, load_student

    try:
        student, meta = load_student(checkpoint)
    except CheckpointError as e:
        raise clean_error(e) from None
    probe, labels = None, None
    if probe_file:
        from robkit.evaluation.linear import load_probe

        probe, pmeta = load_probe(probe_file)
        labels = pmeta.get("labels")
    overrides = {"layout": layout, "input_dtype": input_dtype}
    if target == "auto":
        if fmt or precision:
            raise click.UsageError(
                "--target auto chooses the format and precision; drop --format/--precision"
            )
        names = auto_candidates(student.arch)
    else:
        names = [target]
    failures = []
    for i, name in enumerate(names):
        try:
            t = resolve_target(fmt, precision, name, **overrides)
        except TargetError as e:
            raise click.UsageError(str(e)) from None
        stem = Path(checkpoint).with_suffix("").name
        dest = Path(out) if out else Path(checkpoint).parent / "export" / f"{stem}-{t.name}"
        if out and target == "auto":
            dest = Path(out).with_name(f"{Path(out).stem}-{t.name}")
        click.echo(f"exporting {student.arch} to {t.name} ({t.description})")
        try:
            res = export_model(
                student,
                t,
                dest,
                probe=probe,
                labels=labels,
                meta=meta,
                resolution=resolution,
                data=data,
                calibration_images=calibration_images,
                parity_images=parity_images,
                checkpoint=str(checkpoint),
            )
        except ParityError as e:
            if target == "auto" and i + 1 < len(names):
                click.echo(
                    f"  {t.name} misses parity ({e.report.summary() if e.report else e}); trying the next"
                )
                failures.append(t.name)
                continue
            raise clean_error(e) from None
        except RuntimeError as e:
            if target == "auto" and i + 1 < len(names) and "pip install" in str(e):
                click.echo(f"  {t.name} unavailable ({str(e).splitlines()[0]}); trying the next")
                failures.append(t.name)
                continue
            raise clean_error(e) from None
        _summary(res, failures)
        return


def _summary(res, skipped: list[str]) -> None:
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
    if skipped:
        click.echo(f"  auto     skipped {', '.join(skipped)} (parity or availability)")
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
def bench(paths, checkpoint, threads, rounds, warmup, json_out, plot_out, merge, update_cards) -> None:
    """Latency of exported files (median/p90, interleaved), size, MACs and GFLOP/s vs the CPU's peak."""
    _quiet_converters()
    from robkit.export import bench as B
    from robkit.export import card as cards

    if not paths and not merge:
        raise click.UsageError("give exported files (.onnx, .tflite, .pte) and/or --merge results")
    counts = sorted({int(t) for t in threads.split(",") if t.strip()})
    runners, notes = [], []
    et_threads = None
    macs_by_card: dict[str, float] = {}
    for p in map(Path, paths):
        card = cards.read_card(p)
        if card is None:
            raise click.ClickException(
                f"{p} has no card ({cards.card_path(p).name}); export it with `robkit export`"
            )
        if card["format"] == "coreml":
            notes.append(
                f"{p.name}: Core ML runs only on Apple devices; time it with Xcode's Performance tab "
                "and pass the numbers with --merge"
            )
            continue
        macs = _macs_for(card, macs_by_card)
        for t in counts:
            if card["format"] == "executorch":  # one process-wide pool: measure at one count only
                if et_threads is not None and t != et_threads:
                    continue
                et_threads = et_threads or max(counts)
                t = et_threads
            r = B.file_runner(p, t)
            r.macs_g = macs
            runners.append(r)
        if card["format"] == "executorch" and len(counts) > 1:
            notes.append(
                f"{p.name}: ExecuTorch's thread pool is process-wide; timed at {et_threads} threads only"
            )
    if checkpoint:
        runners += _torch_runners(checkpoint, counts)
    peaks = {t: B.measure_peak(t) for t in counts}
    B.run_interleaved(runners, rounds=rounds, warmup=warmup)
    rows = B.rows_from(runners, peaks)
    for m in merge:
        rows += B.parse_merge(m)
    click.echo(B.format_table(rows, peaks))
    click.echo(
        f"{len(runners)} runners, {rounds} interleaved rounds after {warmup} warm-up calls; CPU: {B.cpu_name()}"
    )
    click.echo(
        "Phones and Apple devices are not reachable from here: these are host-CPU numbers; "
        "merge on-device results with --merge."
    )
    for n in notes:
        click.echo(f"note: {n}")
    if update_cards:
        for p in map(Path, paths):
            mine = [r for r in rows if r.name == p.name]
            if mine:
                cards.update_card(
                    p,
                    latency={
                        f"{r.threads}t": {"median_ms": r.median_ms, "p90_ms": r.p90_ms, "cpu": B.cpu_name()}
                        for r in mine
                    },
                )
    if json_out:
        B.write_json(json_out, rows, peaks, {"rounds": rounds, "warmup": warmup})
        click.echo(f"wrote {json_out}")
    if plot_out:
        B.plot(plot_out, rows)
        click.echo(f"wrote {plot_out}")


def _macs_for(card: dict, cache: dict[str, float]) -> float | None:
    """MACs of the card's architecture at its resolution (weights do not matter for the count)."""
    import torch

    from robkit.export import bench as B
    from robkit.export.wrappers import freeze_input_size
    from robkit.models.students import STUDENTS, build_student

    arch, res = card.get("arch"), int(card["input"]["resolution"])
    key = f"{arch}@{res}"
    if key not in cache and arch in STUDENTS:
        net = freeze_input_size(build_student(arch).eval(), res)
        cache[key] = B.count_macs(net, torch.zeros(1, 3, res, res))
    return cache.get(key)


def _torch_runners(checkpoint: str, counts: list[int]):
    import torch

    from robkit.export import bench as B
    from robkit.models.checkpoint import load_student

    student, meta = load_student(checkpoint)
    res = int(meta.get("resolution") or 224)
    x = torch.randn(1, 3, res, res)
    macs = B.count_macs(student, x)
    out = []
    for t in counts:
        r = B.torch_runner(student, x, t, name=f"{student.arch} (pytorch)")
        r.macs_g = macs
        out.append(r)
    return out
