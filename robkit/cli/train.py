"""``robkit pretrain``, ``robkit distill`` and ``robkit recipes``: thin click commands."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from robkit.catalog import CatalogError, registry
from robkit.engine.config import load_recipe, parse_overrides
from robkit.models.students import STUDENTS
from robkit.utils.errors import RobkitError
from robkit.utils.files import atomic_write_json


def _engine_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--data",
            default="fashion-mnist",
            show_default=True,
            help="'fashion-mnist' (embedded default), a folder of images (flat or class sub-folders), "
            "or a folder of idx files.",
        ),
        click.option("--epochs", type=int, default=None, help="Override train.epochs."),
        click.option("--batch-size", type=int, default=None, help="Global batch size (train.batch_size)."),
        click.option(
            "--out",
            type=click.Path(file_okay=False),
            default=None,
            help="Run folder (default runs/<method>-<student>-<time>).",
        ),
        click.option(
            "--set",
            "sets",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help="Override any recipe field, e.g. --set optim.base_lr=0.3 --set views.n_local=4.",
        ),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue the interrupted run in --out exactly; refuses, naming every difference, if the "
            "recipe, data, teacher, batch size, processes, epochs, seed or precision changed.",
        ),
        click.option(
            "--init",
            "init",
            type=click.Path(dir_okay=False),
            default=None,
            metavar="CHECKPOINT",
            help="Start a new run from the student weights of a robkit checkpoint (fresh head, optimiser "
            "and schedule).",
        ),
        click.option(
            "--precision",
            type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
            default=None,
            help="Mixed precision (auto: bf16 where the CPU/GPU runs it natively).",
        ),
        click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the student."),
        click.option(
            "--channels-last/--no-channels-last", default=None, help="channels_last memory for CNNs."
        ),
        click.option(
            "--workers",
            type=int,
            default=None,
            help="Data-loading worker processes for image folders (default: every core but one on a GPU, "
            "one on a CPU).",
        ),
        click.option(
            "--checkpoint-every",
            type=int,
            default=200,
            show_default=True,
            help="Also checkpoint every N steps (0: only at epoch ends).",
        ),
        click.option("--max-steps", type=int, default=None, help="Stop after this many steps (resumable)."),
        click.option(
            "--time-budget", type=float, default=None, help="Stop after this many minutes (resumable)."
        ),
        click.option("--data-limit", type=int, default=None, help="Use only the first N training images."),
        click.option(
            "--eval/--no-eval",
            "do_eval",
            default=True,
            show_default=True,
            help="kNN-evaluate the student at the end (labelled data only).",
        ),
        click.option("--eval-limit", type=int, default=None, help="Images per split for the final kNN."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _overrides(
    epochs: int | None,
    batch_size: int | None,
    sets: tuple[str, ...],
    precision: str | None,
    compile_: bool | None,
    channels_last: bool | None,
) -> dict:
    ov = parse_overrides(list(sets))
    train = ov.setdefault("train", {})
    for key, val in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("precision", precision),
        ("compile", compile_),
        ("channels_last", channels_last),
    ):
        if val is not None:
            train[key] = val
    return ov


def _engine_kwargs(
    workers: int | None,
    checkpoint_every: int,
    max_steps: int | None,
    time_budget: float | None,
    seed: int,
    quiet: bool,
) -> dict:
    return {
        "num_workers": workers,
        "checkpoint_every_steps": checkpoint_every,
        "max_steps": max_steps,
        "max_seconds": time_budget * 60 if time_budget else None,
        "seed": seed,
        "progress": not quiet,
    }


def _finish(metrics: dict, out_dir: Path, data: str, do_eval: bool, eval_limit: int | None) -> None:
    from robkit.utils.distributed import rank

    if rank() != 0:
        return
    ckpt = out_dir / "checkpoint.pt"
    failed = None
    if do_eval and metrics.get("finished"):
        from robkit.evaluation.api import NoLabelsError, evaluate

        try:
            res = evaluate(
                str(ckpt), data=data, which=("knn",), train_limit=eval_limit, test_limit=eval_limit
            )
            metrics["knn_accuracy"] = res["knn"]["accuracy"]
            atomic_write_json(out_dir / "eval.json", res)
        except NoLabelsError as e:  # an unlabelled folder: nothing to evaluate, not a failure
            click.echo(f"(no kNN evaluation: {e})", err=True)
        except (RobkitError, ValueError, RuntimeError) as e:
            failed = e
    click.echo(json.dumps({k: v for k, v in metrics.items()}, default=str))
    if failed is not None:
        raise click.ClickException(
            f"training finished (checkpoint {ckpt}) but the final kNN evaluation failed: {failed}. "
            f"Rerun it with `robkit eval knn {ckpt} --data {data}`, or train with --no-eval."
        )
    click.echo(f"\nRun folder: {out_dir}  (checkpoint.pt, metrics.csv, curves.png, config.yaml)")
    if not metrics.get("finished"):
        click.echo(f"Stopped before the end; continue with the same command plus --resume --out {out_dir}")
    click.echo("Next:")
    click.echo(f"  robkit eval linear {ckpt} --data {data}")
    click.echo(f"  robkit export {ckpt} --format tflite")


def _launch(fn: Callable[..., tuple[dict[str, Any], Path]], o: dict, **what: Any) -> None:
    """Run ``pretrain``/``distill`` with the shared engine options ``o`` and print the summary."""
    metrics, out_dir = _run(
        fn,
        **what,
        data=o["data"],
        out=o["out"],
        overrides=_overrides(
            o["epochs"], o["batch_size"], o["sets"], o["precision"], o["compile_"], o["channels_last"]
        ),
        resume=o["resume"],
        init=o["init"],
        data_limit=o["data_limit"],
        **_engine_kwargs(
            o["workers"], o["checkpoint_every"], o["max_steps"], o["time_budget"], o["seed"], o["quiet"]
        ),
    )
    _finish(metrics, out_dir, o["data"], o["do_eval"], o["eval_limit"])


def _run(fn: Callable[..., tuple[dict[str, Any], Path]], **kw: Any) -> tuple[dict[str, Any], Path]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from robkit.utils.distributed import init_from_env

    init_from_env()  # launched by torchrun: join the process group (one process otherwise)
    return fn(**kw)  # robkit's own errors become one clean line in robkit.cli


_student_option = click.option(
    "--student", type=click.Choice(sorted(STUDENTS)), default="mobilenet_v3_small", show_default=True
)


@click.command()
@click.option("--method", type=click.Choice(["dino", "swav", "mocov2"]), default="dino", show_default=True)
@_student_option
@click.option(
    "--recipe",
    default="sslight",
    show_default=True,
    help="'sslight' or 'baseline' (picked per method and student), or a full recipe name.",
)
@_engine_options
def pretrain(method: str, student: str, recipe: str, **opts: Any) -> None:
    """Self-supervised pre-training of a small student without a teacher (SSLight)."""
    from robkit.engine.build import pretrain as run

    _launch(run, opts, method=method, student=student, recipe=recipe)


@click.command()
@click.option(
    "--teacher",
    required=True,
    help="Zoo name (robkit teachers list), an official checkpoint file, a robkit checkpoint, or "
    "timm:ARCH / torchvision:ARCH with --teacher-file.",
)
@_student_option
@click.option(
    "--recipe",
    default="auto",
    show_default=True,
    help="'auto' picks rob-<teacher family> (its -small variant on small images), or a recipe name.",
)
@click.option(
    "--teacher-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="The weights for a catalog name (e.g. a gated DINOv3 file) or for timm:ARCH / torchvision:ARCH "
    "(any backbone as a headless teacher).",
)
@click.option(
    "--teacher-cache",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Targets cached by `robkit teachers cache` (same teacher, recipe, data, seed): replays its "
    "global views and runs only the teacher's head.",
)
@_engine_options
def distill(
    teacher: str, student: str, recipe: str, teacher_file: str | None, teacher_cache: str | None, **opts: Any
) -> None:
    """RoB distillation: a frozen self-supervised teacher replaces one branch (a teacher without a
    released head, such as DINOv2, is feature-distilled).
    """
    from robkit.engine.build import distill as run

    _launch(
        run,
        opts,
        teacher=teacher,
        student=student,
        recipe=recipe,
        teacher_cache=teacher_cache,
        teacher_file=teacher_file,
    )


@click.group()
def recipes() -> None:
    """The training recipes (the papers' settings as data)."""


@recipes.command("list")
@click.argument("pattern", default="*")
def recipes_list(pattern: str) -> None:
    """List recipes, optionally filtered by a wildcard PATTERN (e.g. 'rob-*')."""
    reg = registry("recipes")
    names = reg.names(pattern)
    if not names:
        raise click.ClickException(
            f"no recipe matches {pattern!r}; `robkit recipes list` shows all {len(reg)}"
        )
    width = max(len(n) for n in names)
    for n in names:
        r = load_recipe(n)
        v = r["views"]
        views = f"{v['n_global']}x{v['global_size_px']}+{v['n_local']}x{v['local_size_px']}"
        click.echo(f"{n:<{width}}  {r.get('method', ''):<7} {views:<12} {r.get('description', '')}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name: str) -> None:
    """Print the fully resolved recipe NAME as YAML."""
    try:
        click.echo(yaml.safe_dump(load_recipe(name), sort_keys=False))
    except CatalogError as e:
        raise click.ClickException(str(e)) from e
