"""RoB from a teacher's head against feature distillation from the same backbone without its head.

One teacher, two ways to distil it, at an equal student budget (same student, steps, batch, seed,
views and optimiser; on Fashion-MNIST):

* the teacher: a ResNet-18 trained with SSLight DINO (``dino-sslight-short``, the demo's teacher);
* **RoB from its head**: ``robkit distill --teacher RUN/checkpoint.pt`` (``rob-dino-short``);
* **feature distillation, headless**: the teacher's backbone saved as a plain torchvision
  ``resnet18`` file (no head) and loaded as ``--teacher torchvision:resnet18 --teacher-file ...``
  (``rob-features-short``: cosine regression of the pooled feature through a projector). The
  teacher sees the same inputs as in RoB: its resolution and normalisation are set to the
  checkpoint's, since the file alone would give torchvision's ImageNet defaults;
* the untrained student (its run's initial weights, BatchNorm re-estimated the same way) and raw pixels.

Evaluation: DINO's weighted kNN (k=20, T=0.07) and a linear probe on frozen features, as
``robkit eval``; the demo's protocol (10,000 train / 2,000 test images) unless told otherwise.

    python benchmarks/bench_headless.py --out benchmarks/results/headless

Results go to ``OUT/results.json`` (finished rows are skipped on a re-run) and ``OUT/headless.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robkit.engine.build import distill, pretrain
from robkit.evaluation import evaluate
from robkit.export.bench import cpu_name
from robkit.models.checkpoint import load_student, safe_load
from robkit.teachers import load as load_teacher

TEACHER_ARCH, STUDENT = "resnet18", "mobilenet_v3_small"


def _train(fn, out: Path, steps: int, batch: int, seed: int, **kw) -> tuple[Path, float]:
    done = out / "checkpoint.pt"
    if done.exists() and safe_load(done).get("progress", {}).get("finished"):
        return out, json.loads((out / "wall.json").read_text())["s"]
    t = time.time()
    fn(
        data="fashion-mnist",
        data_limit=steps * batch,
        out=out,
        overrides={"train": {"epochs": 1, "batch_size": batch}},
        seed=seed,
        progress=True,
        tensorboard=False,
        checkpoint_every_steps=0,
        resume=done.exists(),
        **kw,
    )
    s = round(time.time() - t, 1)
    (out / "wall.json").write_text(json.dumps({"s": s}))
    return out, s


def headless_file(teacher_ckpt: Path, path: Path) -> Path:
    """The teacher's backbone as a torchvision ``resnet18`` state dict: no head, no robkit metadata."""
    net, _ = load_student(teacher_ckpt)
    sd = {k: v.clone() for k, v in net.backbone.state_dict().items() if not k.startswith("fc.")}
    torch.save(sd, path)
    return path


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        n for n in ("pixels", "student_untrained", "rob_head", "features_headless", "teacher") if n in results
    ]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    knn = [results[n]["knn"] * 100 for n in names]
    lin = [(results[n].get("linear") or float("nan")) * 100 for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], knn, 0.4, label="kNN")
    ax.bar([x + 0.2 for x in xs], lin, 0.4, label="linear")
    ax.set_xticks(list(xs), names, rotation=15)
    ax.set_ylim(min(knn) - 10, 100)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"Fashion-MNIST, same teacher backbone ({cpu_name()})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-steps", type=int, default=160)
    ap.add_argument("--steps", type=int, default=160, help="student steps, equal for both objectives")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-train", type=int, default=10000)
    ap.add_argument("--eval-test", type=int, default=2000)
    ap.add_argument("--linear-epochs", type=int, default=50)
    ap.add_argument("--out", default="benchmarks/results/headless")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    common = {"steps": args.steps, "batch": args.batch, "seed": args.seed}

    teacher, t_s = _train(
        pretrain, out / "teacher", args.teacher_steps, args.batch, args.seed,
        method="dino", student=TEACHER_ARCH, recipe="dino-sslight-short",
    )  # fmt: skip
    ckpt = teacher / "checkpoint.pt"
    rob, rob_s = _train(
        distill, out / "rob_head", teacher=str(ckpt), student=STUDENT, recipe="rob-dino-short", **common
    )
    file = headless_file(ckpt, out / "resnet18_headless.pth")
    head_teacher = load_teacher(str(ckpt))
    tv = load_teacher("torchvision:resnet18", file=file)
    # the same inputs as RoB's teacher: its training resolution and normalisation
    tv.resolution, tv.mean, tv.std = head_teacher.resolution, head_teacher.mean, head_teacher.std
    feat, feat_s = _train(
        distill,
        out / "features_headless",
        teacher="torchvision:resnet18",
        teacher_obj=tv,
        student=STUDENT,
        recipe="rob-features-short",
        **common,
    )
    ev = {"train_limit": args.eval_train, "test_limit": args.eval_test, "epochs": args.linear_epochs}
    rows = {
        "pixels": ("pixels", False, None),
        "student_untrained": (rob / "checkpoint.pt", True, None),
        "teacher": (ckpt, False, t_s),
        "rob_head": (rob / "checkpoint.pt", False, rob_s),
        "features_headless": (feat / "checkpoint.pt", False, feat_s),
    }
    for name, (src, untrained, secs) in rows.items():
        if name in results:
            continue
        which = ("knn",) if name == "pixels" else ("knn", "linear")
        r = evaluate(str(src), data="fashion-mnist", which=which, untrained=untrained, **ev)
        results[name] = {
            "knn": r["knn"]["accuracy"],
            "linear": r["linear"]["accuracy"] if "linear" in r else None,
            "train_s": secs,
            "cpu": cpu_name(),
            "threads": args.threads,
        }
        res_path.write_text(json.dumps(results, indent=2))
        print(name, results[name], flush=True)
    plot(results, out / "headless.png")
    print(f"\nCPU: {cpu_name()}, {args.threads} threads; students {args.steps} steps x {args.batch}")
    print("| row | kNN top-1 | linear top-1 | train s |\n|---|---|---|---|")
    for k, v in results.items():
        lin = f"{v['linear'] * 100:.1f}" if v.get("linear") is not None else "–"
        print(f"| {k} | {v['knn'] * 100:.1f} | {lin} | {v.get('train_s') or ''} |")
    gap = (results["features_headless"]["knn"] - results["rob_head"]["knn"]) * 100
    print(f"\nfeature distillation - RoB (kNN): {gap:+.1f} points (target >= -1)")


if __name__ == "__main__":
    main()
