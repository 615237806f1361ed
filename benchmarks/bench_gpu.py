"""Throughput of the training paths a GPU user runs, and of the input pipeline that feeds them.

Cases (each through ``robkit.engine.build``, as ``robkit distill`` / ``robkit pretrain`` run them, on
a folder of generated ImageNet-like JPEGs, about 500 x 375, in ``train/<class>/`` layout):

* ``rob-online``: RoB-DINO from a teacher shaped like DINO ViT-S/16 (its official checkpoint layout,
  random weights, 65,536 prototypes) into ``mobilenet_v3`` at the ``rob-dino`` recipe (2 x 224 + 8 x 96);
* ``rob-cached``: the same with teacher targets cached by ``robkit teachers cache`` first (the cache
  build is timed separately: it is paid once for many student runs);
* ``sslight-dino``: SSLight DINO on ``resnet18`` at 224 px.

For each: images/s (median of the logged windows after the first), the fraction of the run's wall
time spent waiting for the next batch, and peak memory (CUDA allocator, else the process RSS).

``--data-only``: images/s per CPU core of the input pipeline alone, JPEG decode + fit to the canvas
(what DataLoader workers do), in one process with one thread.

    python benchmarks/bench_gpu.py --data-only                       # CPU: decode figures
    python benchmarks/bench_gpu.py --steps 60 --batch 256 --workers 16  # on a GPU
    python benchmarks/bench_gpu.py --smoke                            # tiny, any machine (the suite runs it)
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from robkit.data.datasets import ImageFolder
from robkit.engine.build import distill, pretrain
from robkit.engine.teacher_cache import build_cache
from robkit.teachers.teacher import build_backbone, build_head
from robkit.utils.machine import cpu_features, cpu_name

VITS16 = {"type": "vit", "embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16, "mlp_ratio": 4.0}
DINO_HEAD = {"type": "DINOHead", "nlayers": 3, "hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 65536}
# The smoke case: the same code paths with a network small enough for the test suite.
TINY_VIT = {"type": "vit", "embed_dim": 32, "depth": 1, "num_heads": 1, "patch_size": 8, "mlp_ratio": 2.0}
TINY_HEAD = {"type": "DINOHead", "nlayers": 3, "hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64}


def make_jpegs(
    root: Path, n: int, classes: int = 4, size: tuple[int, int] = (500, 375), seed: int = 0
) -> Path:
    """``n`` photo-like JPEGs (smooth colour fields with edges and noise, quality 90) in class folders."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(0.005, 0.03, size=(3, 2))
        ph = rng.uniform(0, 6.3, size=3)
        img = np.stack([127 + 100 * np.sin(f[c, 0] * xx + f[c, 1] * yy + ph[c]) for c in range(3)], -1)
        img += rng.normal(0, 12, size=img.shape)
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 255, size=3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:06d}.JPEG", quality=90)
    return root / "train"


def _pil_canvas(path: Path, canvas_px: int) -> torch.Tensor:
    """The baseline: PIL decode, bicubic resize to fit the canvas, pad (robkit's earlier path)."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        w, h = rgb.size
        s = canvas_px / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        arr = torch.from_numpy(np.asarray(rgb.resize((nw, nh), Image.Resampling.BICUBIC)).copy())
    canvas = torch.zeros(3, canvas_px, canvas_px, dtype=torch.uint8)
    canvas[:, :nh, :nw] = arr.permute(2, 0, 1)
    return canvas


def data_only(folder: Path, canvas_px: int = 256, repeats: int = 3) -> dict[str, Any]:
    """Images/s of decode + canvas in this process on one thread (one core): robkit's path and the
    PIL baseline, interleaved, the best round of each.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ds = ImageFolder(folder, canvas_px=canvas_px)
    n = len(ds)
    ds.get_with_hw(0)  # warm-up (codec tables, allocator)
    rates: dict[str, list[float]] = {"robkit": [], "pil": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            ds.get_with_hw(i)
        rates["robkit"].append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for path, _ in ds.files:
            _pil_canvas(path, canvas_px)
        rates["pil"].append(n / (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    return {
        "images": n,
        "canvas_px": canvas_px,
        "img_per_s_per_core": round(max(rates["robkit"]), 1),
        "pil_baseline_img_per_s_per_core": round(max(rates["pil"]), 1),
    }


def official_dino_file(path: Path, arch: dict[str, Any], head: dict[str, Any]) -> Path:
    """A DINO ``*_full_checkpoint.pth`` in the official layout with random weights of ``arch``/``head``."""
    torch.manual_seed(0)
    backbone = build_backbone({**arch, "img_size": 224})
    head_mod = build_head({**head, "in_dim": arch["embed_dim"], "norm_last_layer": False, "use_bn": False})
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    teacher |= {f"head.{k}": v for k, v in head_mod.state_dict().items()}
    args = argparse.Namespace(arch="vit_small", patch_size=arch["patch_size"], out_dim=head["out_dim"])
    torch.save(
        {
            "teacher": teacher,
            "student": {f"module.{k}": v for k, v in teacher.items()},
            "args": args,
            "epoch": 0,
            "dino_loss": {"center": torch.zeros(1, head["out_dim"])},
        },
        path,
    )
    return path


def _summary(run: Path, metrics: dict[str, Any], batch: int) -> dict[str, Any]:
    import csv

    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["img_per_s"]) for r in rows]
    steady = rates[1:] or rates  # the first window holds start-up (cuDNN autotune, compile)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "img_per_s": round(statistics.median(steady), 1),
        "data_wait_fraction": metrics.get("data_wait_fraction"),
        "peak_memory_gib": round(peak, 2),
        "memory_kind": "cuda allocated" if torch.cuda.is_available() else "process RSS",
        "steps": int(metrics.get("global_step", 0)),
        "batch": batch,
        "precision": metrics.get("precision"),
    }


def run_cases(args: argparse.Namespace, work: Path, folder: Path) -> dict[str, Any]:
    smoke = args.smoke
    arch, head = (TINY_VIT, TINY_HEAD) if smoke else (VITS16, DINO_HEAD)
    teacher = str(official_dino_file(work / "dino_deitsmall16_pretrain_full_checkpoint.pth", arch, head))
    views = {"global_size_px": 32, "local_size_px": 16, "n_local": 2} if smoke else {}
    # enough epochs over the generated folder for the steps asked (the data repeats; decoding still runs)
    epochs = -(-args.steps * args.batch // args.images)
    train: dict[str, Any] = {"epochs": epochs, "batch_size": args.batch}
    if smoke:  # a check that the paths run: pinned like every engine test, since the auto choice is
        train["precision"] = "fp32"  # timed per machine (bf16 on a batch of 4 at 16 px could overflow)
    engine = {
        "progress": not smoke,
        "tensorboard": False,
        "checkpoint_every_steps": 0,
        "precise_bn_images": 0,
        "max_steps": args.steps,
        "num_workers": args.workers,
        "sync_every": args.sync_every,
    }
    rob = {"views": views, "train": train, **({"rob": {"teacher_resolution": "student"}} if smoke else {})}
    student = "mobilenet_v3_small" if smoke else "mobilenet_v3"
    out: dict[str, Any] = {}
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    m, run = distill(teacher, student, "rob-dino", str(folder), work / "online", rob, **engine)
    out["rob-online"] = _summary(run, m, args.batch)

    t0 = time.perf_counter()
    build_cache(
        teacher, work / "cache", epochs, student=student, recipe="rob-dino", data=str(folder), overrides=rob,
        progress=not smoke, shard_steps=max(1, args.steps),
    )  # fmt: skip
    cache_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    m, run = distill(
        teacher,
        student,
        "rob-dino",
        str(folder),
        work / "cached",
        rob,
        teacher_cache=work / "cache",
        **engine,
    )
    out["rob-cached"] = {**_summary(run, m, args.batch), "cache_build_s": round(cache_s, 1)}

    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    pre = {"views": views or {"global_size_px": 224, "local_size_px": 96}, "train": train}
    m, run = pretrain("dino", "resnet18", "sslight", str(folder), work / "sslight", pre, **engine)
    out["sslight-dino"] = _summary(run, m, args.batch)
    return out


def machine() -> dict[str, Any]:
    """The machine the figures come from."""
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_features": cpu_features(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints and returns the result (also written to ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny networks and data: checks the paths run")
    p.add_argument("--data-only", action="store_true", help="only the decode + canvas rate per core")
    p.add_argument("--images", type=int, default=None, help="generated JPEGs (default 2048; smoke 16)")
    p.add_argument("--steps", type=int, default=None, help="training steps per case (default 40; smoke 2)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default 256; smoke 4)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: auto)")
    p.add_argument("--sync-every", type=int, default=25, help="steps per read of the loss on a GPU")
    p.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    args.images = args.images or (16 if args.smoke else 2048)
    args.steps = args.steps or (2 if args.smoke else 40)
    args.batch = args.batch or (4 if args.smoke else 256)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        folder = work / "data" / "train"
        if not folder.is_dir():
            make_jpegs(work / "data", args.images)
        result: dict[str, Any] = {"machine": machine(), "data": data_only(folder)}
        if not args.data_only:
            result["cases"] = run_cases(args, work, folder)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
