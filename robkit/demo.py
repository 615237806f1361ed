"""``robkit demo``: the whole product on the embedded data, offline, resumable.

Stages (each skipped when its output is already complete, so a second invocation reuses them):

1. ``teacher``  — SSLight DINO pre-training of a larger network (ResNet-18) without a teacher;
2. ``rob``      — RoB distillation of that teacher into ``mobilenet_v3_small``;
3. ``sslight``  — the same student trained with SSLight and no teacher, same budget;
4. ``eval``     — kNN and linear probes for all three plus the raw-pixel floor;
5. ``export``   — the RoB student to TFLite int8, ONNX fp32 and int8, Core ML fp16, with parity, and
   with its linear probe as a labelled TFLite classifier that MediaPipe's ImageClassifier runs;
6. ``bench``    — latency of the exported files against PyTorch eager;
7. ``report``   — ``report.md``, ``report.html`` and PNG figures.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

STUDENT = "mobilenet_v3_small"
TEACHER_ARCH = "resnet18"
FASHION_MNIST_TRAIN = 60000  # training images of the embedded data set
EXPORT_TARGETS = ("android-tflite-int8", "onnx-fp32", "onnx-int8-cpu", "ios-coreml-fp16")
# The RoB student with its linear probe as a labelled classifier, checked in MediaPipe's ImageClassifier.
CLASSIFIER_TARGET = "android-tflite-fp32"
CLASSIFIER_CHECK_IMAGES = 64


@dataclass(frozen=True)
class Budget:
    """Training steps per run, recipes and evaluation sizes of one demo budget.

    ``teacher_steps`` for the teacher, ``steps`` for each student (RoB and SSLight get the same).
    The recipes fit their dynamics (warm-ups, EMA, freezes) to the steps the budget runs.
    """

    steps: int
    teacher_steps: int
    data_limit: int | None
    eval_train: int | None
    eval_test: int | None
    linear_epochs: int
    bench_rounds: int
    parity_images: int
    calibration_images: int
    batch_size: int = 256
    ssl_recipe: str = "sslight"  # resolved per network, e.g. dino-sslight-small
    rob_recipe: str = "auto"  # rob-<teacher family>-small
    # Wall-clock target of the whole demo on this machine: when set, a few probe steps of the teacher
    # and of the student measure this CPU, and every run gets the same share of its steps (at least
    # ``min_steps``) so that training plus evaluation and export fit (see :func:`fit_steps`).
    seconds: float | None = None
    min_steps: int = 48


BUDGETS = {
    # seconds, for the test suite: a handful of images, every stage still runs
    "tiny": Budget(
        steps=2,
        teacher_steps=2,
        data_limit=64,
        eval_train=200,
        eval_test=100,
        linear_epochs=5,
        bench_rounds=3,
        parity_images=16,
        calibration_images=16,
        batch_size=16,
    ),
    # under 10 minutes on 2 CPU cores: a few hundred small-batch steps per run, with the
    # "-short" recipes whose dynamics are fitted to such runs (recipes/dino.yaml, recipes/rob.yaml)
    "small": Budget(
        steps=160,
        teacher_steps=160,
        data_limit=None,
        eval_train=10000,
        eval_test=2000,
        linear_epochs=50,
        bench_rounds=30,
        parity_images=64,
        calibration_images=64,
        batch_size=64,
        ssl_recipe="dino-sslight-short",
        rob_recipe="rob-dino-short",
        seconds=540,
    ),
    # about an hour or two on 2 CPU cores: 5 epochs of Fashion-MNIST per run
    "full": Budget(
        steps=5 * 234,
        teacher_steps=5 * 234,
        data_limit=None,
        eval_train=None,
        eval_test=None,
        linear_epochs=100,
        bench_rounds=80,
        parity_images=256,
        calibration_images=128,
    ),
}


def _log(msg: str) -> None:
    click.echo(click.style(f"[demo] {msg}", fg="cyan"), err=True)


def _done(run: Path) -> bool:
    """A training stage is complete when its checkpoint says so."""
    ckpt = run / "checkpoint.pt"
    if not ckpt.exists():
        return False
    from robkit.models.checkpoint import safe_load

    prog = safe_load(ckpt).get("progress", {})
    return bool(prog.get("finished"))


def _train(stage: str, out: Path, budget: Budget, fn: Callable[..., Any], steps: int, **kw: Any) -> Path:
    run = out / stage
    if _done(run):
        _log(f"{stage}: reusing {run}")
        return run
    resume = (run / "checkpoint.pt").exists()
    _log(f"{stage}: training ({steps} steps of {budget.batch_size} images){' — resuming' if resume else ''}")
    # Schedules (warm-up, cosine) span the whole run: one pass sized to the budget, or whole
    # epochs of the training set when the budget is larger than it.
    images = min(steps * budget.batch_size, budget.data_limit or steps * budget.batch_size)
    epochs = max(1, round(images / FASHION_MNIST_TRAIN))
    overrides = kw.pop("overrides", {})
    overrides = {
        **overrides,
        "train": {**overrides.get("train", {}), "epochs": epochs, "batch_size": budget.batch_size},
    }
    fn(
        data="fashion-mnist",
        data_limit=min(images, FASHION_MNIST_TRAIN),
        out=run,
        overrides=overrides,
        resume=resume,
        progress=True,
        **kw,
    )
    return run


PROBE_STEPS = 6  # training steps each probe runs; the first two (allocation, kernel choice) are not timed
# Evaluation, export and benchmark time in units of one teacher step (measured: 243 s against 2.3 s per
# step on an AVX2-only EPYC, 115 s against about 1.0 s with AVX-512): they slow down with the CPU too.
REST_IN_TEACHER_STEPS = 105
ROB_OVER_SSLIGHT = 1.15  # a RoB step (student + frozen ResNet-18 teacher) over an SSLight step, measured


def fit_steps(budget: Budget, teacher_step_s: float, student_step_s: float, spent_s: float = 0.0) -> int:
    """Steps per run (teacher, RoB and SSLight alike) that keep the demo inside ``budget.seconds``.

    ``teacher_step_s``/``student_step_s``: seconds per step measured on this machine (SSLight student);
    ``spent_s``: seconds already used (the probes). Never more than the budget's steps, never fewer
    than ``min_steps`` (below that the short recipes' dynamics no longer fit the run).
    """
    if budget.seconds is None:
        return budget.steps
    rest = REST_IN_TEACHER_STEPS * teacher_step_s
    per_step = teacher_step_s + student_step_s * (1 + ROB_OVER_SSLIGHT)
    fitted = int((budget.seconds - spent_s - rest) / per_step)
    return max(min(budget.min_steps, budget.steps), min(budget.steps, fitted))


def ema_for_steps(recipe: str, nominal_steps: int, steps: int) -> dict[str, Any]:
    """The recipe's EMA momentum with its horizon ``1 / (1 - m)`` scaled from ``nominal_steps`` to
    ``steps``, so the EMA teacher leaves its initialisation as far in a shorter run (empty if unchanged).
    """
    from robkit.engine.config import load_recipe

    if steps >= nominal_steps:
        return {}
    ema = load_recipe(recipe).get("ema")
    if not ema:
        return {}
    m = float(ema["momentum"])
    return {"ema": {"momentum": round(1 - (1 - m) * nominal_steps / steps, 6)}}


def _probe_step_s(fn: Callable[..., Any], out: Path, budget: Budget, **kw: Any) -> float:
    """Median seconds of one training step of ``fn``'s run on this machine (a few steps, then deleted)."""
    import csv
    import shutil

    probe = out / ".probe"
    shutil.rmtree(probe, ignore_errors=True)
    overrides = kw.pop("overrides", {})
    overrides = {
        **overrides,
        "train": {**overrides.get("train", {}), "epochs": 1, "batch_size": budget.batch_size},
    }
    try:
        fn(
            data="fashion-mnist",
            data_limit=max(budget.steps, PROBE_STEPS) * budget.batch_size,
            out=probe,
            overrides=overrides,
            progress=False,
            tensorboard=False,
            precise_bn_images=0,
            max_steps=PROBE_STEPS,
            **kw,
        )
        with open(probe / "metrics.csv", newline="", encoding="utf-8") as f:
            rates = sorted(float(r["img_per_s"]) for r in csv.DictReader(f) if int(r["step"]) > 2)
        if not rates:
            raise RuntimeError(
                f"the timing probe in {probe} logged no step past the second; this is a robkit bug"
            )
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return budget.batch_size / rates[len(rates) // 2]


def plan_steps(out: Path, budget: Budget, probes: dict[str, Callable[[], float]]) -> dict[str, Any]:
    """The demo's steps per run, fitted to this machine once and kept in ``plan.json`` (a resumed demo
    trains exactly what it started with).
    """
    from robkit.utils.machine import cpu_name

    path = out / "plan.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    plan: dict[str, Any] = {"steps": budget.steps, "nominal_steps": budget.steps, "cpu": cpu_name()}
    if budget.seconds is not None:
        t = time.time()
        step_s = {name: probe() for name, probe in probes.items()}
        plan["steps"] = fit_steps(budget, step_s["teacher"], step_s["student"], time.time() - t)
        plan.update(
            seconds_target=budget.seconds,
            probe_step_s={k: round(v, 3) for k, v in step_s.items()},
            probe_s=round(time.time() - t, 1),
        )
    path.write_text(json.dumps(plan, indent=2))
    return plan


def _cli(*args: str, log: Path, allow_fail: bool = False) -> int:
    """Run a ``robkit`` sub-command in its own process (converters keep their memory to themselves)."""
    cmd = [sys.executable, "-m", "robkit.cli", *args]
    _log("$ robkit " + " ".join(shlex.quote(a) for a in args))
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ robkit " + " ".join(shlex.quote(a) for a in args) + "\n")
        f.flush()
        res = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    if res.returncode != 0 and not allow_fail:
        raise click.ClickException(f"`robkit {' '.join(args)}` failed (exit {res.returncode}); see {log}")
    if res.returncode != 0:
        _log(f"exit {res.returncode}: see {log} (continuing; the report marks it)")
    return res.returncode


def run_demo(out: str | Path = "demo", budget: str = "small") -> dict[str, Any]:
    """Run (or resume) every stage; returns the summary written to ``summary.json``."""
    from robkit.engine.build import distill, pretrain
    from robkit.evaluation import evaluate
    from robkit.export.targets import get_target

    if budget not in BUDGETS:
        raise click.BadParameter(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    b = BUDGETS[budget]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # Seconds per stage, kept across invocations: a reused stage keeps the time it took when it ran.
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    def timed(name: str, f: Callable[..., Path], *a: Any, **k: Any) -> Path:
        t = time.time()
        r = f(*a, **k)
        if not (Path(r) / "checkpoint.pt").exists() or name not in timings or time.time() - t > 5:
            timings[name] = round(time.time() - t, 1)
            timings_path.write_text(json.dumps(timings))
        return r

    small_head = (
        {"head": {"out_dim": 256, "hidden_dim": 256, "bottleneck_dim": 64}} if budget == "tiny" else {}
    )
    ssl = {"method": "dino", "recipe": b.ssl_recipe}
    plan = plan_steps(
        out,
        b,
        {
            "teacher": lambda: _probe_step_s(pretrain, out, b, student=TEACHER_ARCH, **ssl),
            "student": lambda: _probe_step_s(pretrain, out, b, student=STUDENT, **ssl),
        },
    )
    steps = int(plan["steps"])
    if steps < b.steps:
        _log(
            f"this CPU ({plan['cpu']}) fits {steps} of the budget's {b.steps} steps per run in "
            f"{b.seconds:.0f} s (probe: {plan['probe_step_s']} s per step)"
        )
    teacher_steps = b.teacher_steps * steps // b.steps
    ssl_overrides = {**small_head, **ema_for_steps(b.ssl_recipe, b.steps, steps)}
    teacher = timed(
        "teacher",
        _train,
        "teacher",
        out,
        b,
        pretrain,
        teacher_steps,
        method="dino",
        student=TEACHER_ARCH,
        recipe=b.ssl_recipe,
        overrides=ssl_overrides,
    )
    rob = timed(
        "rob",
        _train,
        "rob",
        out,
        b,
        distill,
        steps,
        teacher=str(teacher / "checkpoint.pt"),
        student=STUDENT,
        recipe=b.rob_recipe,
    )
    sslight = timed(
        "sslight",
        _train,
        "sslight",
        out,
        b,
        pretrain,
        steps,
        method="dino",
        student=STUDENT,
        recipe=b.ssl_recipe,
        overrides=ssl_overrides,
    )

    # ---- evaluation
    eval_path = out / "eval.json"
    evals: dict[str, Any] = json.loads(eval_path.read_text()) if eval_path.exists() else {}
    t = time.time()
    # Every trained row stands beside raw pixels and the untrained network of its architecture
    # (the run's initial weights, BatchNorm re-estimated the same way).
    rows: tuple[tuple[str, Any, bool], ...] = (
        ("pixels", "pixels", False),
        ("teacher_untrained", teacher, True),
        ("teacher", teacher, False),
        ("student_untrained", rob, True),
        ("rob", rob, False),
        ("sslight", sslight, False),
    )
    for name, src, untrained in rows:
        if name in evals:
            continue
        _log(f"eval: {name} (kNN + linear probe)")
        which = ("knn",) if name == "pixels" else ("knn", "linear")
        evals[name] = evaluate(
            str(src if name == "pixels" else src / "checkpoint.pt"),
            data="fashion-mnist",
            which=which,
            train_limit=b.eval_train,
            test_limit=b.eval_test,
            epochs=b.linear_epochs,
            progress=False,
            probe_path=None if name == "pixels" or untrained else out / name / "probe.pt",
            untrained=untrained,
        )
        eval_path.write_text(json.dumps(evals, indent=2, default=str))
    if time.time() - t > 5 or "eval" not in timings:
        timings["eval"] = round(time.time() - t, 1)
        timings_path.write_text(json.dumps(timings))

    # ---- export + parity
    exp_dir = out / "export"
    exp_dir.mkdir(exist_ok=True)
    log = out / "export.log"
    t = time.time()
    files = []
    for target in EXPORT_TARGETS:
        dest = exp_dir / f"{STUDENT}-{target}{get_target(target).suffix}"
        if not Path(str(dest) + ".json").exists():
            _export(rob / "checkpoint.pt", target, dest, log, b)
        files.append(dest)
    classifier = exp_dir / f"{STUDENT}-{CLASSIFIER_TARGET}-classifier{get_target(CLASSIFIER_TARGET).suffix}"
    if not Path(str(classifier) + ".json").exists():
        _export(
            rob / "checkpoint.pt", CLASSIFIER_TARGET, classifier, log, b, probe_path=out / "rob" / "probe.pt"
        )
    files.append(classifier)
    app_check_path = out / "app_check.json"
    if classifier.exists() and not app_check_path.exists():
        app_check_path.write_text(
            json.dumps(_mediapipe_check(classifier, rob, out / "rob" / "probe.pt"), indent=2)
        )
    if time.time() - t > 5 or "export" not in timings:
        timings["export"] = round(time.time() - t, 1)
        timings_path.write_text(json.dumps(timings))

    # ---- latency
    bench_json = out / "bench.json"
    t = time.time()
    if not bench_json.exists():
        # the classifier is the embedder plus one linear layer: its latency is the embedder's
        runnable = [str(f) for f in files if f.suffix != ".mlpackage" and f.exists() and f != classifier]
        _cli(
            "bench",
            *runnable,
            "--checkpoint",
            str(rob / "checkpoint.pt"),
            "--threads",
            "1,2",
            "--rounds",
            str(b.bench_rounds),
            "--json",
            str(bench_json),
            "--plot",
            str(out / "latency.png"),
            log=log,
        )
    if time.time() - t > 5 or "bench" not in timings:
        timings["bench"] = round(time.time() - t, 1)
        timings_path.write_text(json.dumps(timings))

    summary = {
        "budget": budget,
        "student": STUDENT,
        "teacher_arch": TEACHER_ARCH,
        "evals": evals,
        "learned": learning_verdict(evals),
        "exports": [_card(f) for f in files],
        "app_check": json.loads(app_check_path.read_text()) if app_check_path.exists() else None,
        "bench": json.loads(bench_json.read_text()),
        "timings_s": timings,
        "plan": plan,
        "runs": {"teacher": str(teacher), "rob": str(rob), "sslight": str(sslight)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    from robkit.report import write_report

    write_report(out, summary)
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


# (trained row, what it must beat, the margin in kNN points it must clear)
LEARNING_CHECKS = (
    ("teacher", "teacher_untrained", 3.0),
    ("rob", "student_untrained", 10.0),
    ("sslight", "student_untrained", 0.0),
    ("rob", "sslight", 3.0),
)


def learning_verdict(evals: dict[str, Any]) -> list[dict[str, Any]]:
    """Did each run beat its own untrained network (and RoB the SSLight student)? kNN points."""
    rows = []
    for run, base, need in LEARNING_CHECKS:
        if run in evals and base in evals:
            gain = 100 * (evals[run]["knn"]["accuracy"] - evals[base]["knn"]["accuracy"])
            rows.append(
                {"run": run, "baseline": base, "gain": round(gain, 2), "target": need, "met": gain > need}
            )
    return rows


def _export(
    checkpoint: Path, target: str, dest: Path, log: Path, b: Budget, probe_path: Path | None = None
) -> None:
    """One ``robkit export`` in this process (Python, torch and each converter are loaded once for every
    file), its output appended to ``log``. A file that misses parity is kept, and its card (and the
    report) says so; a converter that fails is logged and the demo goes on.
    """
    import contextlib

    from robkit.export.exporter import export_checkpoint, quiet_converters
    from robkit.utils.errors import RobkitError

    quiet_converters()
    probe, labels = None, None
    if probe_path is not None:
        from robkit.evaluation.linear import load_probe

        probe, pmeta = load_probe(probe_path)
        labels = pmeta["labels"]
    what = f"export {target}" + (" with its linear probe (labelled classifier)" if probe is not None else "")
    _log(f"{what} -> {dest.name}")
    failed: Exception | None = None
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(
            f"$ robkit export {checkpoint} --target {target} --out {dest}"
            + (f" --probe {probe_path}" if probe_path else "")
        )
        try:
            export_checkpoint(
                checkpoint,
                target=target,
                out=dest,
                probe=probe,
                labels=labels,
                echo=print,
                parity_images=b.parity_images,
                calibration_images=b.calibration_images,
            )
        except (RobkitError, RuntimeError, ValueError) as e:  # ParityError included: the file is kept
            print(f"failed: {type(e).__name__}: {e}")
            failed = e
    if failed is not None:
        _log(f"{target}: {str(failed).splitlines()[0][:200]} (see {log}; continuing, the report marks it)")


def _mediapipe_check(classifier: Path, rob: Path, probe_path: Path) -> dict[str, Any]:
    """The classifier file in MediaPipe's ImageClassifier (what an app runs) on Fashion-MNIST test images:
    its label names, its top-1 against PyTorch's and against the true labels.
    """
    import torch

    from robkit.evaluation.linear import load_probe
    from robkit.export.images import load_images
    from robkit.export.mediapipe_client import classify
    from robkit.models.checkpoint import load_student
    from robkit.utils.errors import RobkitError

    student, meta = load_student(rob / "checkpoint.pt")
    probe, pmeta = load_probe(probe_path)
    res, norm = int(meta["resolution"]), meta["normalization"]
    # test images the parity check did not use
    u8, truth = load_images("fashion-mnist", "test", CLASSIFIER_CHECK_IMAGES, res, offset=5000)
    m, s = torch.tensor(norm["mean"]).view(1, 3, 1, 1), torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = probe(student((u8.float() / 255 - m) / s)).argmax(1)
    try:
        top = classify(classifier, u8)
    except (RobkitError, RuntimeError, ValueError) as e:  # MediaPipe missing, or the file refused
        _log(f"MediaPipe check skipped: {e}")
        return {"client": "mediapipe ImageClassifier", "error": str(e)}
    got = torch.tensor([i for i, _, _ in top])
    labels = pmeta["labels"]
    return {
        "client": "mediapipe ImageClassifier",
        "file": classifier.name,
        "images": len(top),
        "label_names_match": all(name == labels[i] for i, name, _ in top),
        "agreement_with_pytorch": float((got == ref).float().mean()),
        "accuracy": float((got == truth).float().mean()),
        "pytorch_accuracy": float((ref == truth).float().mean()),
        "examples": [{"label": name, "score": round(score, 3)} for _, name, score in top[:4]],
    }


def _card(path: Path) -> dict[str, Any]:
    card_file = Path(str(path) + ".json")
    card = json.loads(card_file.read_text()) if card_file.exists() else {}
    return {"file": path.name, "card": card}


@click.command()
@click.option(
    "--out", type=click.Path(file_okay=False), default="demo", show_default=True, help="Demo folder."
)
@click.option(
    "--budget",
    type=click.Choice(list(BUDGETS)),
    default="small",
    show_default=True,
    help="small: under 10 minutes on 2 CPU cores; full: 5 epochs per run; tiny: a smoke test.",
)
def demo(out: str, budget: str) -> None:
    """Teacher → RoB student → export → benchmark → report, offline on Fashion-MNIST.

    Re-running the same command reuses every finished stage (and resumes an interrupted one).
    """
    summary = run_demo(out, budget)
    ev = summary["evals"]
    click.echo("")
    click.echo(
        f"kNN accuracy: pixels {ev['pixels']['knn']['accuracy']:.3f} · teacher "
        f"{ev['teacher']['knn']['accuracy']:.3f} (untrained {ev['teacher_untrained']['knn']['accuracy']:.3f}) · "
        f"RoB student {ev['rob']['knn']['accuracy']:.3f} · SSLight student {ev['sslight']['knn']['accuracy']:.3f} "
        f"(untrained {ev['student_untrained']['knn']['accuracy']:.3f})"
    )
    for row in summary["learned"]:
        verdict = "ok" if row["met"] else "NOT MET"
        click.echo(
            f"  {row['run']} vs {row['baseline']}: {row['gain']:+.1f} kNN points (target > {row['target']:.0f}): "
            f"{verdict}"
        )
    click.echo(
        f"Done in {summary['seconds']:.0f} s. Report: {Path(out) / 'report.md'} and {Path(out) / 'report.html'}"
    )
    click.echo("Next:")
    click.echo(
        "  robkit distill --teacher dino_vits8 --student mobilenet_v3 --data PATH/TO/IMAGES   "
        "(a zoo teacher on your images; place the file in ~/.cache/robkit/teachers offline)"
    )
    click.echo(
        f"  robkit export {Path(out) / 'rob' / 'checkpoint.pt'} --target auto   (fastest file meeting parity)"
    )
    click.echo(f"  robkit eval lowshot {Path(out) / 'rob' / 'checkpoint.pt'}")
