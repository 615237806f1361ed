"""Learning curves: frozen-feature accuracy against wall-clock training time on Fashion-MNIST.

Every (run, budget) pair is a fresh run whose schedule is sized to the budget: a 4-step probe
measures the run's images/s, the schedule (one pass over ``steps x 256`` images, or whole epochs
of the training set when that is more) spans ``budget x images/s`` images, and ``--time-budget``
stops it at the budget at the latest.  Evaluation on the full protocol (60,000 train / 10,000
test): DINO's weighted kNN (k=20, T=0.07) and a linear probe (BN + linear, 100 epochs), the same
calls as ``robkit eval``.  Rows:

* SSLight DINO, SwAV and MoCo-v2 (``--recipe sslight``) on ``mobilenet_v3_small`` and ``resnet18``;
* RoB into ``mobilenet_v3_small`` from the ResNet-18 SSLight DINO run of the largest budget, or
  from any robkit checkpoint (``--rob-teacher``; one without prototypes, such as a MoCo-v2 run, is
  feature-distilled by ``rob-features-small``: the row records the recipe);
* the untrained network of each architecture (``robkit eval ... --untrained``) and raw pixels;
* lightly's DINO example with a MobileNetV3-Small (``examples/pytorch/dino.py`` settings:
  ``DINOProjectionHead(576, 512, 64, 1024)``, ``DINOLoss(output_dim=1024,
  warmup_teacher_temp_epochs=5)``, Adam 1e-3, EMA 0.996 -> 1 over a 10-epoch schedule, blur
  off, 2 x 32 px + 6 x 16 px views, batch 256), stopped at the same wall-clock budget.

    pip install lightly   # the peer row only
    python benchmarks/bench_curves.py --budgets 2,5,10,25 --threads 2 --out benchmarks/results/curves

Results are appended to ``OUT/results.json`` (finished pairs are skipped on a re-run) and
plotted to ``OUT/curves.png``; every row records the CPU and its vector features, and ``--tag``
keeps the rows of another CPU class apart (``KEY@TAG``, its own curve).  Settings are never chosen on these test-set figures.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from robkit.data.datasets import fashion_mnist
from robkit.engine.bn import precise_bn_from_dataset
from robkit.engine.build import distill, pretrain
from robkit.engine.config import deep_merge, parse_overrides
from robkit.evaluation import evaluate
from robkit.models.checkpoint import safe_load
from robkit.utils.machine import cpu_features, cpu_name

TRAIN_IMAGES = 60000
BATCH = 256  # --batch-size sets it
SSL_RUNS = [(m, s) for s in ("mobilenet_v3_small", "resnet18") for m in ("dino", "swav", "mocov2")]


def _quiet() -> dict:
    return {"progress": False, "tensorboard": False, "checkpoint_every_steps": 0}


def _probe_img_per_s(fn, out: Path) -> float:
    """Median images/s of steps 2-4 of a throw-away run with the same settings."""
    shutil.rmtree(out, ignore_errors=True)
    fn(out, {"train": {"epochs": 1, "batch_size": BATCH}}, 4 * BATCH, max_steps=4, precise_bn_images=0)
    with open(out / "metrics.csv", newline="") as f:
        rates = [float(r["img_per_s"]) for r in csv.DictReader(f)][1:]
    shutil.rmtree(out, ignore_errors=True)
    return statistics.median(rates)


def _schedule(minutes: float, img_per_s: float) -> tuple[int, int]:
    """``(epochs, images per epoch)`` whose steps fill ``minutes`` at ``img_per_s``."""
    images = max(BATCH, int(minutes * 60 * img_per_s))
    if images <= TRAIN_IMAGES:
        return 1, images - images % BATCH
    return max(1, round(images / TRAIN_IMAGES)), TRAIN_IMAGES


def run_budgeted(fn, minutes: float, out: Path) -> tuple[Path, dict]:
    rate = _probe_img_per_s(fn, out.with_name(out.name + "-probe"))
    epochs, images = _schedule(minutes, rate)
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    metrics, run = fn(
        out, {"train": {"epochs": epochs, "batch_size": BATCH}}, images, max_seconds=minutes * 60
    )
    return run, {
        "probe_img_per_s": round(rate, 1),
        "epochs": epochs,
        "images_per_epoch": images,
        "steps": metrics["global_step"],
        "train_s": round(time.time() - t, 1),
    }


def lightly_dino(minutes: float, threads: int) -> tuple[torch.nn.Module, dict]:
    """lightly's DINO example (MobileNetV3-Small), run until the wall-clock budget."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.dino_transform import DINOTransform
    from lightly.utils.scheduler import cosine_schedule
    from PIL import Image

    from robkit.models.students import build_student

    class PILSet(torch.utils.data.Dataset):
        def __init__(self, images: torch.Tensor) -> None:
            self.images = images
            self.tf = DINOTransform(global_crop_size=32, local_crop_size=16, gaussian_blur=(0.0, 0.0, 0.0))

        def __len__(self) -> int:
            return self.images.shape[0]

        def __getitem__(self, i: int):
            return self.tf(Image.fromarray(self.images[i, 0].numpy()).convert("RGB"))

    torch.manual_seed(0)
    backbone = build_student("mobilenet_v3_small")
    student = torch.nn.Sequential(backbone, DINOProjectionHead(576, 512, 64, 1024, freeze_last_layer=1))
    teacher = torch.nn.Sequential(build_student("mobilenet_v3_small"), DINOProjectionHead(576, 512, 64, 1024))
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    crit = DINOLoss(output_dim=1024, warmup_teacher_temp_epochs=5)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    train = fashion_mnist("train")
    loader = torch.utils.data.DataLoader(
        PILSet(train.images), batch_size=BATCH, shuffle=True, drop_last=True, num_workers=1
    )
    epochs, steps, t0 = 10, 0, time.time()
    done = False
    for epoch in range(epochs):
        momentum = cosine_schedule(epoch, epochs, 0.996, 1)
        for views in loader:
            if time.time() - t0 > minutes * 60:
                done = True
                break
            update_momentum(student[0], teacher[0], m=momentum)
            update_momentum(student[1], teacher[1], m=momentum)
            t_out = [teacher(v) for v in views[:2]]
            s_out = [student(v) for v in views]
            loss = crit(t_out, s_out, epoch=epoch)
            loss.backward()
            student[1].cancel_last_layer_gradients(current_epoch=epoch)
            opt.step()
            opt.zero_grad()
            steps += 1
        if done:
            break
    elapsed = time.time() - t0
    net = precise_bn_from_dataset(
        copy.deepcopy(backbone), train, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ).eval()
    return net, {
        "steps": steps,
        "train_s": round(elapsed, 1),
        "epochs_done": round(steps * BATCH / len(train), 2),
    }


def _tagged(key: str, tag: str) -> str:
    return f"{key}@{tag}" if tag else key


def _eval(model, **kw) -> dict:
    ev = evaluate(model, which=("knn", "linear"), progress=False, **kw)
    return {"knn": ev["knn"]["accuracy"], "linear": ev["linear"]["accuracy"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    series: dict[str, dict[str, list[tuple[float, float]]]] = {"knn": {}, "linear": {}}
    budgets: set[float] = set()
    for r in results.values():
        if "minutes" in r:
            name = r["run"] + (f" [{r['tag']}]" if r.get("tag") else "")
            budgets.add(r["minutes"])
            for metric in series:
                series[metric].setdefault(name, []).append((r["minutes"], 100 * r[metric]))
    names = sorted(series["knn"])
    # More runs than one palette has colours: each run gets its own colour *and* marker, so no two look alike.
    palette = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    style = {n: (palette[i % len(palette)], markers[i % len(markers)]) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, metric in zip(axes, ("knn", "linear")):
        for name in names:
            pts = sorted(series[metric][name])
            colour, marker = style[name]
            ls = "--" if "[" in name else "-"
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=marker,
                ls=ls,
                lw=1.2,
                color=colour,
                label=name,
            )
        for key, r in results.items():
            if "minutes" not in r and metric in r:
                ax.axhline(100 * r[metric], ls=":", lw=0.8, color="grey")
                ax.text(
                    0.01,
                    100 * r[metric] + 0.3,
                    key,
                    fontsize=6,
                    color="grey",
                    transform=ax.get_yaxis_transform(),
                )
        ax.set_xscale("log")
        # Ticks at the budgets actually run, written as plain minutes.
        ax.xaxis.set_major_locator(FixedLocator(sorted(budgets)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("training wall-clock (minutes, 2 threads)")
        ax.set_ylabel(f"Fashion-MNIST {metric} top-1 (%)")
        ax.set_title(f"{metric} (dashed: runs tagged with a machine or a pairing)", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.70, 0.5), fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.70, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2,5,10,25", help="minutes, comma-separated")
    ap.add_argument(
        "--runs", default="all", help="comma-separated: METHOD:STUDENT, rob, lightly (default all)"
    )
    ap.add_argument(
        "--recipe",
        default="sslight",
        help="pretrain recipe (sslight: the -small records; dino-sslight-short for DINO runs of a few hundred steps)",
    )
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for the robkit SSL runs (repeatable), e.g. head.out_dim=1024; needs --variant",
    )
    ap.add_argument(
        "--variant",
        default="",
        help="name of the --set overrides: the runs become METHOD:STUDENT+VARIANT, their own rows and curves",
    )
    ap.add_argument(
        "--rob-teacher",
        default="",
        metavar="CHECKPOINT",
        help="the RoB row's teacher: a robkit checkpoint, with a DINO or SwAV head or feature-distilled (default: this run's "
        "dino:resnet18 checkpoint of the largest budget); its rows become rob:mobilenet_v3_small+from-DIR",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-train", type=int, default=None, help="train images for kNN/linear (default all)")
    ap.add_argument("--eval-test", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/curves")
    ap.add_argument(
        "--tag",
        default="",
        help="suffix for this run's keys (KEY@TAG), e.g. a CPU class, so rows of another machine sit beside them",
    )
    args = ap.parse_args()
    if bool(args.set) != bool(args.variant):
        ap.error("--set and --variant go together: name the overrides so their rows stay apart")
    overrides = parse_overrides(args.set)
    global BATCH
    BATCH = args.batch_size
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    wanted = None if args.runs == "all" else set(args.runs.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    ev_kw = {"train_limit": args.eval_train, "test_limit": args.eval_test}

    def save(key: str, row: dict) -> None:
        if args.tag and "minutes" in row:
            key, row = f"{key}@{args.tag}", {**row, "tag": args.tag}
        results[key] = {**row, "cpu": cpu_name(), "cpu_features": cpu_features(), "threads": args.threads}
        res_path.write_text(json.dumps(results, indent=2))
        print(key, json.dumps(results[key]), flush=True)

    if "pixels" not in results:
        ev = evaluate("pixels", which=("knn",), **ev_kw)
        save("pixels", {"knn": ev["knn"]["accuracy"]})
    for arch in ("mobilenet_v3_small", "resnet18"):
        if f"untrained:{arch}" not in results:
            save(f"untrained:{arch}", _eval(f"untrained:{arch}", resolution=32, **ev_kw))

    def ssl_fn(method: str, student: str):
        def fn(d, ov, images, **eng):
            return pretrain(
                method,
                student,
                args.recipe,
                out=d,
                overrides=deep_merge(overrides, ov),
                data_limit=images,
                **_quiet(),
                **eng,
            )

        return fn

    suffix = f"+{args.variant}" if args.variant else ""
    runs = [(f"{m}:{s}{suffix}", ssl_fn(m, s)) for m, s in SSL_RUNS]
    teacher = (
        Path(args.rob_teacher)
        if args.rob_teacher
        else out / f"dino:resnet18-{max(budgets):g}min" / "checkpoint.pt"
    )
    rob_name = "rob:mobilenet_v3_small" + (f"+from-{teacher.parent.name}" if args.rob_teacher else "")

    def rob_fn(d, ov, images, **eng):
        return distill(
            str(teacher), "mobilenet_v3_small", out=d, overrides=ov, data_limit=images, **_quiet(), **eng
        )

    runs.append((rob_name, rob_fn))
    for minutes in sorted(budgets):
        for name, fn in runs:
            if (
                wanted is not None
                and name.removesuffix(suffix) not in wanted
                and name.split(":")[0] not in wanted
            ):
                continue
            key = f"{name}-{minutes:g}min"
            if _tagged(key, args.tag) in results:
                continue
            if name.startswith("rob") and not teacher.exists():
                print(
                    f"{key}: skipped, no teacher at {teacher} "
                    f"(run dino:resnet18 at {max(budgets):g} min first, or name one with --rob-teacher)"
                )
                continue
            run, info = run_budgeted(fn, minutes, out / key)
            recipe = (
                safe_load(run / "checkpoint.pt")["config"]["name"] if name.startswith("rob") else args.recipe
            )
            row = {"run": name, "minutes": minutes, "recipe": recipe, "batch": BATCH, **info}
            if args.set:
                row["overrides"] = args.set
            save(key, {**row, **_eval(str(run / "checkpoint.pt"), **ev_kw)})
        if wanted is None or "lightly" in wanted:
            key = f"lightly-dino:mobilenet_v3_small-{minutes:g}min"
            if _tagged(key, args.tag) not in results:
                net, info = lightly_dino(minutes, args.threads)
                row = _eval(
                    net, resolution=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), **ev_kw
                )
                save(key, {"run": "lightly-dino:mobilenet_v3_small", "minutes": minutes, **info, **row})
    plot(results, out / "curves.png")
    print("\n| run | minutes | steps | kNN top-1 | linear top-1 |\n|---|---|---|---|---|")
    for key, r in results.items():
        print(
            f"| {r.get('run', key)}{' @' + r['tag'] if r.get('tag') else ''} | {r.get('minutes', '–')} | {r.get('steps', '–')} | {100 * r['knn']:.1f} | "
            f"{100 * r['linear']:.1f} |"
            if "linear" in r
            else f"| {key} | – | – | {100 * r['knn']:.1f} | – |"
        )


if __name__ == "__main__":
    main()
