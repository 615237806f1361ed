"""Quality under one fixed training budget on Fashion-MNIST (SSLight and RoB benchmarks).

Every row trains for the same number of steps (batch 256, 32 px globals) and is evaluated on
frozen features with DINO's weighted kNN (k=20, T=0.07) and a linear probe (BN + linear):

* DINO with its default views (``dino-baseline-small``) — ``mobilenet_v3_small``
* DINO with SSLight views (``dino-sslight-small``)      — ``mobilenet_v3_small``
* the teacher: a larger network (ResNet-18) with SSLight views, same budget
* RoB: that teacher distilled into ``mobilenet_v3_small`` (``rob-dino-small``)
* raw pixels (the floor)

    python benchmarks/bench_quality.py --steps 120 --out benchmarks/results/quality
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robkit.engine.build import distill, pretrain
from robkit.evaluation import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-train", type=int, default=None, help="train images for kNN/linear (default all)")
    ap.add_argument("--eval-test", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/quality")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    images = args.steps * 256
    common = {
        "data": "fashion-mnist",
        "data_limit": images,
        "progress": True,
        "tensorboard": False,
        "checkpoint_every_steps": 0,
    }
    ov = {"train": {"epochs": 1, "batch_size": 256}}
    runs = {
        "dino_default_views": lambda d: pretrain(
            "dino", "mobilenet_v3_small", "dino-baseline-small", out=d, overrides=ov, **common
        ),
        "dino_sslight_views": lambda d: pretrain(
            "dino", "mobilenet_v3_small", "dino-sslight-small", out=d, overrides=ov, **common
        ),
        "teacher_resnet18_sslight": lambda d: pretrain(
            "dino", "resnet18", "dino-sslight-small", out=d, overrides=ov, **common
        ),
        "rob_mobilenet_v3_small": lambda d: distill(
            str(out / "teacher_resnet18_sslight" / "checkpoint.pt"),
            "mobilenet_v3_small",
            "rob-dino-small",
            out=d,
            overrides=ov,
            **common,
        ),
    }
    for name, fn in runs.items():
        if name in results:
            continue
        t = time.time()
        metrics, run = fn(out / name)
        secs = time.time() - t
        ev = evaluate(
            str(run / "checkpoint.pt"),
            which=("knn", "linear"),
            train_limit=args.eval_train,
            test_limit=args.eval_test,
            progress=False,
        )
        results[name] = {
            "knn": ev["knn"]["accuracy"],
            "linear": ev["linear"]["accuracy"],
            "train_s": round(secs, 1),
            "img_per_s": round(images / secs, 1),
            "steps": args.steps,
        }
        res_path.write_text(json.dumps(results, indent=2))
        print(name, results[name], flush=True)
    if "raw_pixels" not in results:
        ev = evaluate("pixels", which=("knn",), train_limit=args.eval_train, test_limit=args.eval_test)
        results["raw_pixels"] = {"knn": ev["knn"]["accuracy"]}
        res_path.write_text(json.dumps(results, indent=2))
    print("\n| run | kNN top-1 | linear top-1 | train s | img/s |\n|---|---|---|---|---|")
    for k, v in results.items():
        print(
            f"| {k} | {v['knn'] * 100:.1f} | {v.get('linear', float('nan')) * 100:.1f} | {v.get('train_s', '')} "
            f"| {v.get('img_per_s', '')} |"
        )


if __name__ == "__main__":
    main()
