"""``robkit finetune``: a pre-trained or distilled student → a labelled classifier for an app."""

from __future__ import annotations

import json
from typing import Any

import click


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    default="fashion-mnist",
    show_default=True,
    help="'fashion-mnist' or a folder with train/ and test/ (or val/), one sub-folder of images per class.",
)
@click.option(
    "--mode",
    type=click.Choice(["full", "linear"]),
    default="full",
    show_default=True,
    help="full: fine-tune every weight (SSLight appendix B); linear: frozen backbone + the linear probe of "
    "`robkit eval linear`.",
)
@click.option(
    "--labels",
    "labels_fraction",
    default="100%",
    show_default=True,
    help="Share of the training labels, class-balanced: 1% or 10% is SSLight's semi-supervised protocol "
    "(60 / 30 epochs).",
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    help="Override the protocol's epochs (full: 60 at 1 %, else 30; linear: 100).",
)
@click.option(
    "--batch-size", type=int, default=256, show_default=True, help="Learning rate 0.03 x batch / 256."
)
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/finetune-...)."
)
@click.option("--resume", is_flag=True, help="Continue the interrupted fine-tuning in --out exactly.")
@click.option(
    "--untrained",
    is_flag=True,
    help="Start from the checkpoint architecture's initial weights instead: the from-scratch baseline.",
)
@click.option("--train-limit", type=int, default=None, help="Use N training images (before --labels).")
@click.option("--test-limit", type=int, default=None, help="Evaluate on N test images.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps (resumable).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def finetune(
    checkpoint: str,
    data: str,
    mode: str,
    labels_fraction: str,
    epochs: int | None,
    batch_size: int,
    out: str | None,
    resume: bool,
    untrained: bool,
    train_limit: int | None,
    test_limit: int | None,
    max_steps: int | None,
    seed: int,
    quiet: bool,
) -> None:
    """Fine-tune the student of CHECKPOINT into a classifier (SSLight's semi-supervised protocol)."""
    from robkit.evaluation.finetune import finetune as run
    from robkit.evaluation.finetune import parse_fraction

    kw: dict[str, Any] = {"max_steps": max_steps, "progress": not quiet}
    results, out_dir = run(
        checkpoint,
        data=data,
        out=out,
        mode=mode,
        labels_fraction=parse_fraction(labels_fraction),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        train_limit=train_limit,
        test_limit=test_limit,
        resume=resume,
        untrained=untrained,
        **kw,
    )
    click.echo(json.dumps({k: v for k, v in results.items() if k != "train"}, default=str))
    ckpt = out_dir / "checkpoint.pt"
    click.echo(
        f"\nTest top-1 {100 * results['accuracy']:.1f} % ({results['num_test']} images, "
        f"{results['num_train']} labelled training images, {mode} fine-tuning)."
    )
    if not results["train"].get("finished", True):
        click.echo(f"Stopped before the end; continue with the same command plus --resume --out {out_dir}")
    click.echo(f"Run folder: {out_dir}  (checkpoint.pt, probe.pt, finetune.json, metrics.csv)")
    click.echo("Next (a classifier with its label names inside the file):")
    click.echo(f"  robkit export {ckpt} --target android-tflite-int8")
    click.echo(f"  robkit export {ckpt} --target ios-coreml-fp16")
