"""Training throughput of the DINO + SSLight step (images/s, view sampling included).

Compares robkit's engine in several settings (fp32, channels_last, bf16 autocast, torch.compile)
with a plain PyTorch multi-crop DINO loop built from lightly's blocks (``DINOTransform`` on PIL
images through a DataLoader, ``DINOProjectionHead``, ``DINOLoss``), all on Fashion-MNIST with
32 px globals + 6 locals, batch 256, in one process, variants interleaved over rounds so machine
noise hits them equally.  lightly is only needed here: ``pip install lightly``.

    python benchmarks/bench_train.py --students mobilenet_v3_small mobilenet_v3 resnet18 --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from robkit.data.datasets import fashion_mnist
from robkit.engine.build import build_pretrain_task, build_views, resolve_config
from robkit.engine.hardware import cpu_has_fast_bf16
from robkit.engine.trainer import CheckpointMeta, Trainer, TrainOptions
from robkit.models.students import build_student


def robkit_runner(arch: str, recipe: str, precision: str, channels_last: bool, compile_: bool, ds, out: Path):
    cfg = resolve_config("dino", arch, recipe, {"train": {"batch_size": 256}}, small_images=True)
    task = build_pretrain_task("dino", build_student(arch), cfg, channels_last=channels_last)
    views = build_views(cfg.views)
    opts = TrainOptions(
        out_dir=out,
        epochs=1,
        batch_size=256,
        precision=precision,
        channels_last=channels_last,
        compile=compile_,
        progress=False,
        tensorboard=False,
    )
    meta = CheckpointMeta("pretrain", "dino", {"arch": arch, "kwargs": {}}, cfg.to_dict(), {}, 32)
    tr = Trainer(task, views, ds, cfg.optim, cfg.ema, opts, meta)
    tr._build()
    amp = {"bf16": torch.bfloat16, "fp32": None}[precision]
    batches = tr._epoch_batches(0, 0)
    state = {"step": 0}

    def step(n_steps: int) -> float:
        t = time.perf_counter()
        for _ in range(n_steps):
            imgs, hw, _ = next(batches)
            tr._step(imgs, hw, 0, state["step"], amp)
            state["step"] += 1
        return n_steps * 256 / (time.perf_counter() - t)

    return step


def lightly_runner(arch: str, ds, workers: int):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.dino_transform import DINOTransform
    from PIL import Image

    class PILSet(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = images
            self.tf = DINOTransform(
                global_crop_size=32,
                global_crop_scale=(0.14, 1.0),
                local_crop_size=16,
                local_crop_scale=(0.05, 0.14),
                n_local_views=6,
            )

        def __len__(self):
            return self.images.shape[0]

        def __getitem__(self, i):
            return self.tf(Image.fromarray(self.images[i, 0].numpy()).convert("RGB"))

    def make():
        bb = build_student(arch)
        return torch.nn.Sequential(bb, DINOProjectionHead(bb.embed_dim, 2048, 256, 4096, batch_norm=True))

    student = make()
    teacher = make()  # lightly's weight-normalised head cannot be deep-copied
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    crit = DINOLoss(output_dim=4096, warmup_teacher_temp_epochs=2)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    loader = torch.utils.data.DataLoader(
        PILSet(ds.images),
        batch_size=256,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    it = iter(loader)

    def step(n_steps: int) -> float:
        nonlocal it
        t = time.perf_counter()
        for _ in range(n_steps):
            views = next(it)
            update_momentum(student, teacher, 0.996)
            t_out = [teacher(v) for v in views[:2]]
            s_out = [student(v) for v in views]
            loss = crit(t_out, s_out, epoch=0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return n_steps * 256 / (time.perf_counter() - t)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", nargs="+", default=["mobilenet_v3_small", "mobilenet_v3", "resnet18"])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lightly-workers", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow first compile)")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = fashion_mnist("train", limit=256 * (args.steps * args.rounds + 4) * 2)
    tmp = Path("benchmarks/results/tmp")
    results = {}
    bf16 = cpu_has_fast_bf16()
    for arch in args.students:
        variants = {"robkit fp32": ("fp32", False, False), "robkit fp32+channels_last": ("fp32", True, False)}
        if bf16:
            variants["robkit bf16"] = ("bf16", False, False)
            variants["robkit bf16+channels_last"] = ("bf16", True, False)
            if args.compile:
                variants["robkit bf16+channels_last+compile"] = ("bf16", True, True)
        runners = {
            name: robkit_runner(arch, "sslight", *cfg, ds, tmp / name.replace(" ", "_"))
            for name, cfg in variants.items()
        }
        runners["plain loop (lightly blocks)"] = lightly_runner(arch, ds, args.lightly_workers)
        for r in runners.values():  # warm-up (and compile)
            r(2)
        rates: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for name, r in runners.items():
                rates[name].append(r(args.steps))
        base = statistics.median(rates["plain loop (lightly blocks)"])
        results[arch] = {
            k: {
                "img_per_s": round(statistics.median(v), 1),
                "vs_plain": round(statistics.median(v) / base, 2),
            }
            for k, v in rates.items()
        }
        print(f"\n{arch} (batch 256, 32 px globals + 6 locals, {args.threads} threads)")
        for k, v in results[arch].items():
            print(f"  {k:<36} {v['img_per_s']:>7.1f} img/s   x{v['vs_plain']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"bf16_native": bf16, "threads": args.threads, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
