"""Short-budget tuning on held-out training images (never the test set).

Trains one run (DINO/SwAV/MoCo-v2 with a `-small` recipe, or RoB from a teacher checkpoint) for
``--steps`` steps in one pass, with any recipe overrides, then scores the online student (and the
EMA teacher where there is one) by kNN (k=20, T=0.07): training images 0-10,000 as the memory bank,
training images 50,000-52,000 as queries.  ``--untrained`` scores the untrained network instead.
The rows of BENCHMARKS.md "Choosing the short-budget settings" came from it, e.g.

    python benchmarks/tune_short_budget.py --tag I1 --bs 64 --steps 400 --set optim.freeze_last_layer_epochs=0 \
        --set ema.momentum=0.99 --set optim.name=adamw --set optim.base_lr=0.002 --set optim.min_lr=0.00001 \
        --set optim.weight_decay=0.04 --set optim.weight_decay_end=0.04
    python benchmarks/tune_short_budget.py --tag F1 --method rob --teacher torchvision:resnet18 \
        --teacher-file OUT/resnet18_headless.pth --teacher-inputs-from OUT/teacher/checkpoint.pt --bs 64 --steps 160
    python benchmarks/tune_short_budget.py --tag J1 --method rob --student mobilenet_v3_small --bs 64 --steps 300 \
        --teacher OUT/I1/checkpoint.pt --set optim.base_lr=0.004 --set optim.weight_decay_end=0.04 \
        --set optim.warmup_epochs=0.1
"""

import argparse
import copy
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from robkit.data.datasets import ImageTensorDataset, open_dataset
from robkit.engine import build as B
from robkit.engine.bn import has_batchnorm, precise_bn_from_dataset
from robkit.engine.config import deep_merge, parse_overrides
from robkit.engine.trainer import CheckpointMeta, Trainer
from robkit.evaluation.features import extract_features
from robkit.evaluation.knn import knn_accuracy
from robkit.models.students import build_student

ap = argparse.ArgumentParser()
ap.add_argument("--method", default="dino")
ap.add_argument("--student", default="resnet18")
ap.add_argument("--recipe", default="sslight")
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--epochs", type=int, default=1)
ap.add_argument("--teacher", default=None)
ap.add_argument("--teacher-file", default=None, help="weights for --teacher timm:ARCH / torchvision:ARCH")
ap.add_argument(
    "--teacher-inputs-from",
    default=None,
    help="a robkit checkpoint whose resolution and normalisation the teacher gets",
)
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--tag", default="run")
ap.add_argument("--out", default="benchmarks/results/tune")
ap.add_argument("--untrained", action="store_true")
ap.add_argument("--bs", type=int, default=256)
a = ap.parse_args()
torch.set_num_threads(2)
full = open_dataset("fashion-mnist", "train")


def sub(i, j):
    return ImageTensorDataset(full.images[i:j], full.labels[i:j], full.classes, "fm")


knn_tr, val = sub(0, 10000), sub(50000, 52000)
bs = a.bs
train_ds = sub(0, min(50000, a.steps * bs // a.epochs))
ov = parse_overrides(a.set)
ov = deep_merge(ov, {"train": {"epochs": a.epochs, "batch_size": bs}})


def knn(net, res, mean, std):
    if has_batchnorm(net):
        net = precise_bn_from_dataset(net, train_ds, res, mean, std)
    net.eval()
    xtr, ytr = extract_features(
        net, knn_tr, res, mean, std, batch_size=512, progress=False, amp=False, device="cpu"
    )
    xv, yv = extract_features(
        net, val, res, mean, std, batch_size=512, progress=False, amp=False, device="cpu"
    )
    return knn_accuracy(xtr, ytr, xv, yv, k=20, temperature=0.07, num_classes=10)


out = f"{a.out}/{a.tag}"
shutil.rmtree(out, ignore_errors=True)
os.makedirs(a.out, exist_ok=True)
t0 = time.time()
if a.method == "rob":
    from robkit import teachers as zoo

    tch = zoo.load(a.teacher, file=a.teacher_file)
    if a.teacher_inputs_from:  # e.g. a headless copy of a robkit teacher: the same inputs as the original
        like = zoo.load(a.teacher_inputs_from)
        tch.resolution, tch.mean, tch.std = like.resolution, like.mean, like.std
    fam = B.teacher_head_family(tch)
    recipe = a.recipe if a.recipe.startswith("rob-") else f"rob-{fam}"  # e.g. --recipe rob-dino-short
    cfg = B.resolve_config("rob", a.student, recipe, ov, True)
    torch.manual_seed(0)
    net = build_student(a.student)
    task = B.build_rob_task(tch, fam, net, cfg, channels_last=True)
else:
    cfg = B.resolve_config(a.method, a.student, a.recipe, ov, True)
    torch.manual_seed(0)
    net = build_student(a.student)
    task = B.build_pretrain_task(a.method, net, cfg, channels_last=True)
views = B.build_views(cfg.views)
res = cfg.views.global_size_px
mean, std = list(views.mean), list(views.std)
if a.untrained:
    print(json.dumps({"tag": a.tag, "untrained": knn(copy.deepcopy(task.online.student), res, mean, std)}))
    sys.exit()
meta = CheckpointMeta(
    kind="pretrain",
    method=task.method,
    student={"arch": a.student, "kwargs": {}},
    config=cfg.to_dict(),
    normalization={"mean": mean, "std": std},
    resolution=res,
    data={},
)
opts = B._options(
    cfg,
    Path(out),
    {"progress": False, "tensorboard": False, "checkpoint_every_steps": 0, "precise_bn_images": 0},
)
tr = Trainer(task, views, train_ds, cfg.optim, cfg.ema, opts, meta)
m = tr.fit()
t1 = time.time()
r = {
    "tag": a.tag,
    "steps": m["global_step"],
    "train_s": round(t1 - t0, 1),
    "loss": round(m["loss"], 4),
    "student": knn(copy.deepcopy(task.online.student).float(), res, mean, std),
}
if hasattr(task, "teacher") and isinstance(task.teacher, torch.nn.Module):
    r["ema"] = knn(copy.deepcopy(task.teacher.student).float(), res, mean, std)
rows = list(csv.DictReader(open(f"{out}/metrics.csv"))) if os.path.exists(f"{out}/metrics.csv") else []
if rows:
    L = [float(x["loss"]) for x in rows]
    r["loss_curve"] = [round(L[i], 3) for i in range(0, len(L), max(1, len(L) // 8))]
print(json.dumps(r))
open(f"{a.out}/results.jsonl", "a").write(
    json.dumps(
        {
            **r,
            "set": a.set,
            "method": a.method,
            "arch": a.student,
            "recipe": a.recipe,
            "bs": bs,
            "epochs": a.epochs,
        }
    )
    + "\n"
)
