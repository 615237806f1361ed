"""``robkit eval knn|linear|lowshot CHECKPOINT``: frozen-feature evaluation from the command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from robkit.cli import clean_error

PROBE_SUFFIX = ".probe.pt"


def _common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("checkpoint"),
        click.option(
            "--data",
            default="fashion-mnist",
            show_default=True,
            help="`fashion-mnist`, or a folder with train/ and test/ (or val/) holding one sub-folder per class.",
        ),
        click.option("--train-limit", type=click.IntRange(min=1), help="Use only this many training images."),
        click.option("--test-limit", type=click.IntRange(min=1), help="Use only this many test images."),
        click.option(
            "--resolution", type=click.IntRange(min=8), help="Input size in px [default: the checkpoint's]."
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--device", default=None, help="torch device [default: cuda if available, else cpu]."),
        click.option(
            "--amp/--no-amp", default=False, show_default=True, help="bfloat16 autocast for features."
        ),
        click.option(
            "--out", type=click.Path(dir_okay=False), help="Write the results as JSON to this file."
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the results as JSON."),
        click.option(
            "--untrained",
            is_flag=True,
            help="Evaluate CHECKPOINT's architecture at its run's initial weights (BatchNorm re-estimated "
            "as for the trained network): the baseline a trained figure needs beside it.",
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _run(which: str, checkpoint: str, out: str | None, as_json: bool, **kw: Any) -> dict[str, Any]:
    from robkit.data.datasets import DataError
    from robkit.evaluation.api import evaluate
    from robkit.export.executorch_format import ExecuTorchMissing
    from robkit.models.checkpoint import CheckpointError

    probe_path = None
    if which == "linear" and out is not None:
        probe_path = Path(out).with_name(Path(out).stem + PROBE_SUFFIX)
    try:
        results = evaluate(checkpoint, which=(which,), progress=not as_json, probe_path=probe_path, **kw)
    except (CheckpointError, DataError, ValueError, ExecuTorchMissing) as e:
        raise clean_error(e) from None
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(results, indent=2))
    return results


def _where(r: dict[str, Any]) -> str:
    if r["checkpoint"] == "pixels":
        what = "raw pixels"
    elif r.get("method") == "untrained":
        what = f"untrained {r.get('arch')} (seed {r.get('seed')})"
    else:
        what = f"{r.get('arch') or 'model'} {r['checkpoint']}"
    return f"{what} @ {r['resolution']} px on {r['data']} ({r['num_train']} train / {r['num_test']} test)"


def _footer(results: dict[str, Any], out: str | None, next_cmd: str) -> None:
    if out is not None:
        click.echo(f"results: {out}")
    click.echo(f"next: {next_cmd}")


@click.group("eval", context_settings={"help_option_names": ["-h", "--help"]})
def eval_group() -> None:
    """Evaluate frozen features: weighted kNN, linear probe, low-shot.

    CHECKPOINT is a robkit checkpoint (from `robkit pretrain` / `robkit distill`), a file from
    `robkit export` (.onnx, .tflite, .pte: run in its own runtime, so int8 rounding is measured),
    `pixels` for the raw-pixel floor, or `untrained:ARCH` for an untrained network.

    \b
    Examples:
      robkit eval knn pixels                       (raw-pixel floor on Fashion-MNIST)
      robkit eval knn RUN/checkpoint.pt --untrained   (the same network before training)
      robkit eval knn untrained:resnet18 --resolution 32
      robkit eval knn RUN/checkpoint.pt --train-limit 10000
      robkit eval knn exports/model-int8.tflite --train-limit 10000   (what the app computes)
      robkit eval linear RUN/checkpoint.pt --out RUN/eval/linear.json
      robkit eval lowshot RUN/checkpoint.pt --data photos/
    """


@eval_group.command("knn")
@_common_options
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="Neighbours (DINO: 20).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.07, show_default=True)
def knn(checkpoint: str, out: str | None, as_json: bool, **kw: Any) -> None:
    """DINO's weighted kNN (cosine, top-k, votes exp(sim/T)) on frozen features."""
    r = _run("knn", checkpoint, out, as_json, **kw)
    if not as_json:
        click.echo(
            f"kNN top-1 {100 * r['knn']['accuracy']:.2f} % (k={kw['k']}, T={kw['temperature']}) — {_where(r)}"
        )
        _footer(
            r,
            out,
            f"robkit eval linear {checkpoint}"
            + (f" --data {kw['data']}" if kw["data"] != "fashion-mnist" else ""),
        )


@eval_group.command("linear")
@_common_options
@click.option(
    "--bn/--no-bn", default=True, show_default=True, help="BatchNorm before the linear layer (RoB app. C)."
)
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True)
def linear(checkpoint: str, out: str | None, as_json: bool, **kw: Any) -> None:
    """Linear probe (SGD + cosine LR) on frozen features; with --out the probe is saved next to the JSON."""
    r = _run("linear", checkpoint, out, as_json, **kw)
    if not as_json:
        lin = r["linear"]
        click.echo(
            f"linear top-1 {100 * lin['accuracy']:.2f} % (train {100 * lin['train_accuracy']:.2f} %, "
            f"{'BN + ' if kw['bn'] else ''}linear, {kw['epochs']} epochs) — {_where(r)}"
        )
        if "probe" in lin:
            click.echo(f"probe: {lin['probe']}")
        nxt = (
            f"robkit export {checkpoint} --format tflite"
            if checkpoint != "pixels"
            else "robkit eval lowshot pixels"
        )
        _footer(r, out, nxt)


@eval_group.command("lowshot")
@_common_options
@click.option("--shots", default="1,5", show_default=True, help="Labelled images per class, comma-separated.")
@click.option("--splits", "n_splits", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def lowshot(checkpoint: str, out: str | None, as_json: bool, shots: str, **kw: Any) -> None:
    """Low-shot logistic regression (RoB §4.3): k images per class, C chosen on held-out train images."""
    try:
        shot_list = tuple(int(s) for s in shots.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers such as 1,5, got {shots!r}", param_hint="--shots"
        ) from None
    if not shot_list or min(shot_list) < 1:
        raise click.BadParameter(
            f"shots must be integers >= 1, got {shots!r}", param_hint="--shots"
        ) from None
    r = _run("lowshot", checkpoint, out, as_json, shots=shot_list, **kw)
    if not as_json:
        parts = [f"{s}-shot {100 * v['mean']:.2f} ± {100 * v['std']:.2f} %" for s, v in r["lowshot"].items()]
        click.echo(f"low-shot top-1 {', '.join(parts)} ({kw['n_splits']} splits) — {_where(r)}")
        _footer(r, out, f"robkit eval linear {checkpoint}")


__all__ = ["eval_group", "knn", "linear", "lowshot"]
