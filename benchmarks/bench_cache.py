"""Cached vs online RoB on Fashion-MNIST: per-epoch wall time, kNN accuracy, cache size.

Steps (one process, run alone; each result is written to ``OUT/results.json`` as it comes):

1. a teacher: ``robkit pretrain --method dino --student TEACHER`` for ``--teacher-epochs``;
2. the SSLight reference: DINO-SSLight pre-training of the student, no teacher;
3. online RoB from the teacher (the teacher's forward every step);
4. ``robkit teachers cache`` for each stored form (embedding fp16, top-k with several k),
   then RoB from each cache;

each student for ``--epochs`` epochs on the first ``--images`` training images, evaluated with
DINO's weighted kNN (train features of those images, ``--test`` test images).  The per-epoch
time is the last epoch's images / (images/s) as the engine measures it (view rendering,
forward, backward, optimiser; no checkpoint writing).

    python benchmarks/bench_cache.py --out runs/bench-cache --images 4096 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from robkit.engine.build import distill, pretrain
from robkit.engine.teacher_cache import CacheForm, build_cache
from robkit.evaluation import evaluate

ENGINE = {"progress": False, "tensorboard": False, "checkpoint_every_steps": 0, "precise_bn_images": 1024}


def knn(run: Path, images: int, test: int) -> float:
    res = evaluate(str(run / "checkpoint.pt"), which=("knn",), train_limit=images, test_limit=test)
    return float(res["knn"]["accuracy"])


def epoch_seconds(metrics: dict, images: int, batch: int) -> float:
    return (images // batch) * batch / float(metrics["img_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-cache"))
    ap.add_argument("--teacher", default="resnet18", help="student architecture trained as the teacher")
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--student", default="mobilenet_v3_small")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--topk", type=int, nargs="*", default=[1, 10, 100])
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def record(name: str, **row) -> None:
        results[name] = row
        results_path.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(row), flush=True)

    # (float32 engine: bf16 autocast would make online and cached runs differ by more than fp16 rounding)
    train = {"epochs": args.epochs, "batch_size": args.batch, "precision": "fp32"}
    teacher_ckpt = out / "teacher" / "checkpoint.pt"
    if not teacher_ckpt.exists():
        t0 = time.time()
        pretrain(
            method="dino",
            student=args.teacher,
            data_limit=args.images,
            out=out / "teacher",
            overrides={"train": {**train, "epochs": args.teacher_epochs}},
            **ENGINE,
        )
        record(
            "teacher",
            arch=args.teacher,
            seconds=round(time.time() - t0, 1),
            knn=knn(out / "teacher", args.images, args.test),
        )

    def student_run(name: str, fn, **kw) -> None:
        if name in results:
            return
        metrics, run = fn(student=args.student, data_limit=args.images, out=out / name, **kw, **ENGINE)
        record(
            name,
            epoch_s=round(epoch_seconds(metrics, args.images, args.batch), 2),
            img_per_s=round(float(metrics["img_per_s"]), 1),
            knn=knn(run, args.images, args.test),
        )

    student_run("sslight", lambda **kw: pretrain(method="dino", overrides={"train": train}, **kw))
    ov = {"train": train}
    student_run("rob-online", lambda **kw: distill(str(teacher_ckpt), overrides=ov, **kw))
    forms = [("embedding", CacheForm("embedding"))] + [
        (f"topk{k}", CacheForm("topk", k=k)) for k in args.topk
    ]
    for name, form in forms:
        cache_dir = out / f"cache-{name}"
        if f"build-{name}" not in results:
            t0 = time.time()
            build_cache(
                str(teacher_ckpt),
                cache_dir,
                args.epochs,
                student=args.student,
                overrides=ov,
                data_limit=args.images,
                form=form,
                progress=False,
            )
            size = sum(f.stat().st_size for f in cache_dir.glob("e*.pt"))
            record(f"build-{name}", seconds=round(time.time() - t0, 1), mib=round(size / 2**20, 2))
        student_run(
            f"rob-cached-{name}",
            lambda cache=cache_dir, **kw: distill(str(teacher_ckpt), overrides=ov, teacher_cache=cache, **kw),
        )


if __name__ == "__main__":
    main()
