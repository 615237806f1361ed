"""The one training loop every method runs on (SSLight pre-training and RoB distillation).

Mixed precision (bf16 autocast on CPUs with native bf16, bf16/fp16 on CUDA), channels_last,
optional ``torch.compile``, DistributedDataParallel through ``torchrun``, atomic checkpoints
every N steps and each epoch, exact ``--resume``, a progress bar with images/s and ETA,
CSV/TensorBoard logs and a curve plot, and a NaN guard that keeps the last good checkpoint.

Determinism: the epoch's image order comes from ``(seed, epoch)``, each step's view
parameters and task randomness from ``(seed, global step)``, so a resumed run draws exactly
what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from tqdm import tqdm

from robkit.data.datasets import DataError, ImageTensorDataset
from robkit.data.views import MultiCropViews
from robkit.engine.bn import PRECISE_BN_IMAGES, has_batchnorm, precise_bn_from_dataset
from robkit.engine.hardware import autocast_dtype, usable_cores
from robkit.engine.optim import build_optimizer, param_groups
from robkit.engine.precision import apply_layout, channels_last_allowed, choose_precision
from robkit.engine.recipe import EMASpec, OptimSpec
from robkit.engine.runlog import RunLog
from robkit.engine.schedules import (
    SHORT_RUN_SHARE,
    clip_gradients,
    cosine_schedule,
    lr_for_batch,
    min_lr_for_batch,
)
from robkit.engine.tasks import Task
from robkit.models.checkpoint import atomic_save, make_checkpoint, safe_load
from robkit.utils import distributed as dist_utils
from robkit.utils.errors import RecipeError, ResumeMismatch, RobkitError, leaf_diff

if TYPE_CHECKING:
    from robkit.engine.teacher_cache import CachedTargets

log = logging.getLogger(__name__)


class TrainingDiverged(RobkitError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainOptions:
    """Engine settings that are not part of a recipe's science."""

    out_dir: Path
    epochs: int
    batch_size: int  # global batch (all processes together)
    seed: int = 0
    precision: str = "auto"
    # images to re-estimate BatchNorm statistics at epoch ends (0: off)
    precise_bn_images: int = PRECISE_BN_IMAGES
    channels_last: bool = True
    compile: bool = False
    num_workers: int | None = None  # None: auto (resolve_workers)
    checkpoint_every_steps: int = 200
    max_steps: int | None = None  # stop early (budgeted runs, tests); the schedule still spans `epochs`
    max_seconds: float | None = None  # stop at the first step boundary after this wall time
    progress: bool = True
    tensorboard: bool = True
    device: str = "auto"
    # Steps between reads of the loss on an accelerator (each read waits for the device); the
    # NaN check, the log rows and the bar are updated once per window. A CPU reads every step.
    sync_every: int = 25


@dataclass
class CheckpointMeta:
    """What a checkpoint records about the run besides weights."""

    kind: str
    method: str
    student: dict[str, Any]
    config: dict[str, Any]
    normalization: dict[str, Any]
    resolution: int
    teacher: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    # What a resumed run must share with the stored one besides the recipe and the engine settings:
    # {"data": data-set fingerprint, "teacher_sha256": str, "target_cache": str} (see _identity)
    identity: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] | None = None  # {"path", "sha256"} of the --init weights


def _mix_seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def epoch_order(seed: int, epoch: int, n_images: int, batch_size: int) -> torch.Tensor:
    """Image indices of every global batch of an epoch, ``long [steps, batch_size]``.

    A pure function of ``(seed, epoch)``, so the teacher-target cache replays the same batches.
    """
    steps = n_images // batch_size
    g = torch.Generator().manual_seed(_mix_seed(seed, epoch, 17))
    return torch.randperm(n_images, generator=g)[: steps * batch_size].view(steps, batch_size)


def resolve_workers(setting: int | None, device: torch.device) -> int:
    """DataLoader workers for a folder of images: ``setting``, or (``None``) every core but one on
    an accelerator (16 at most: decoding must keep up with the GPU) and one on a CPU (decoding then
    overlaps the step without taking the training threads' cores).
    """
    if setting is not None:
        if setting < 0:
            raise RecipeError(f"--workers must be 0 or more, got {setting}")
        return setting
    cores = usable_cores()
    if device.type == "cpu":
        return 1 if cores > 1 else 0
    return max(1, min(16, cores - 1))


def step_generator(seed: int, global_step: int) -> torch.Generator:
    """The generator of one step's view parameters (global crops first, then locals)."""
    return torch.Generator().manual_seed(_mix_seed(seed, global_step, 29))


class _HWDataset(torch.utils.data.Dataset):
    """Adapter yielding ``(canvas, (h, w), newly skipped files)`` from any robkit data set."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, list[str]]:
        if hasattr(self.ds, "get_with_hw"):
            before = set(self.ds.skipped)
            img, label, hw = self.ds.get_with_hw(i)
            return img, torch.tensor(hw), int(label), [str(p) for p in set(self.ds.skipped) - before]
        img, label = self.ds[i]
        return img, torch.tensor([img.shape[-2], img.shape[-1]]), int(label), []


def _collate(
    items: list[tuple[torch.Tensor, torch.Tensor, int, list[str]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    imgs = torch.stack([it[0] for it in items])
    hw = torch.stack([it[1] for it in items])
    labels = torch.tensor([it[2] for it in items], dtype=torch.long)
    skipped = [p for it in items for p in it[3]]
    return imgs, hw, labels, skipped


class _BatchPlan(torch.utils.data.Sampler):
    """The current epoch's list of index batches (set by the trainer before each epoch)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Trainer:
    """Runs a ``Task`` over a data set with a ``MultiCropViews`` sampler and a recipe's optimiser."""

    _loader: torch.utils.data.DataLoader | None
    _batch_plan: _BatchPlan

    def __init__(
        self,
        task: Task,
        views: MultiCropViews,
        dataset: Any,
        optim: OptimSpec,
        ema: EMASpec,
        opts: TrainOptions,
        meta: CheckpointMeta,
        target_source: CachedTargets | None = None,
    ) -> None:
        """``target_source``: cached teacher targets (``robkit.engine.teacher_cache.CachedTargets``) that
        replace the global views' parameters and the teacher's outputs of every step.
        """
        self.task, self.views, self.dataset = task, views, dataset
        self.target_source = target_source
        self.optim, self.ema, self.opts, self.meta = optim, ema, opts, meta
        self.out_dir = Path(opts.out_dir)
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        if opts.batch_size % self.world:
            raise RecipeError(f"batch size {opts.batch_size} is not divisible by the {self.world} processes")
        self.local_batch = opts.batch_size // self.world
        self.steps_per_epoch = len(dataset) // opts.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the data set has {len(dataset)} images, fewer than one batch of {opts.batch_size}; "
                "lower --batch-size or use more images"
            )
        self.total_steps = self.steps_per_epoch * opts.epochs
        dev = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda" and self.world > 1:
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.device = torch.device(dev)
        crops = [views.global_size_px] * views.n_global + [views.local_size_px] * views.n_local
        self.precision, self.precision_choice = choose_precision(
            opts.precision,
            self.device,
            task.online,
            str(meta.student.get("arch", type(task.student).__name__)),
            crops,
            channels_last=opts.channels_last and not task.student.is_vit,
        )
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        self._resume_ckpt: dict[str, Any] | None = None

    def _identity(self) -> dict[str, Any]:
        """Everything a resumed run must share with the stored one to continue it bitwise."""
        return {
            "recipe": self.meta.config,
            **self.meta.identity,
            "student": self.meta.student,
            "method": self.task.method,
            "epochs": self.opts.epochs,
            "batch_size": self.opts.batch_size,
            "world_size": self.world,
            "seed": self.opts.seed,
            "precision": self.precision,
            "init": self.meta.init,
        }

    def check_resume(self) -> dict[str, Any]:
        """Load the run's checkpoint and refuse (:class:`ResumeMismatch`) if this run differs from it.

        The message names every difference (recipe fields, data, teacher, batch, processes, epochs,
        seed, precision). Returns the checkpoint, which :meth:`fit` then continues.
        """
        if not self.ckpt_path.exists():
            raise ResumeMismatch(
                f"--resume: no checkpoint at {self.ckpt_path}; start the run without --resume "
                "(or pass the --out of the run to continue)"
            )
        ckpt = safe_load(self.ckpt_path, map_location="cpu")
        st = ckpt.get("train_state")
        if not st:
            raise ResumeMismatch(f"--resume: {self.ckpt_path} holds no training state (a finished export?)")
        stored = st.get("identity")
        if stored is None:  # checkpoints from before identities were stored: what they did record
            stored = {"batch_size": st["batch_size"], "world_size": st.get("world_size", 1)}
            now = {k: self._identity()[k] for k in stored}
        else:
            if self.opts.precision == "auto" and stored.get("precision") in ("fp32", "bf16", "fp16"):
                # auto resumes with the stored run's choice: a new probe may pick otherwise on a
                # noisy machine, and the run must continue exactly as it was.
                self.precision = str(stored["precision"])
                self.precision_choice = {"rule": "resumed"}
            now = self._identity()
        diff = leaf_diff(stored, now)
        if diff:
            raise ResumeMismatch(
                f"cannot resume {self.ckpt_path}: this run differs from the stored one in "
                f"{len(diff)} setting(s): "
                + "; ".join(diff)
                + ". Resume with the same command, or start a new "
                "run from these weights with --init " + str(self.ckpt_path) + " --out NEW_FOLDER"
            )
        self._resume_ckpt = ckpt
        return ckpt

    # ----------------------------------------------------------------- set-up
    def _build(self) -> None:
        task, cfg = self.task, self.optim
        task.to(self.device)
        self.channels_last, why_not = channels_last_allowed(
            self.opts.channels_last and not task.student.is_vit, self.precision, self.device, task.online
        )
        if why_not:
            log.info("%s", why_not)
        apply_layout(task, self.channels_last)  # the online network and its momentum copies alike
        if self.opts.compile:
            task.online.student.compile()
        if self.world > 1:
            ddp = nn.parallel.DistributedDataParallel(
                task.online, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            task.wrap_online(ddp)
        groups = param_groups(
            task.online,
            weight_decay=cfg.weight_decay,
            exclude_depthwise_from_lars=cfg.exclude_depthwise_from_lars,
        )
        base_lr = lr_for_batch(cfg.base_lr, self.opts.batch_size)
        self.optimizer = build_optimizer(
            cfg.name,
            groups,
            lr=base_lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            nesterov=bool(cfg.nesterov),
            **cast(
                "dict[str, Any]",
                {"trust_coefficient": cfg.trust_coefficient}
                if cfg.name == "lars" and cfg.trust_coefficient is not None
                else {},
            ),
        )
        spe, total = self.steps_per_epoch, self.total_steps
        warm = min(int(round(cfg.warmup_epochs * spe)), int(total * SHORT_RUN_SHARE))  # short runs
        self.lr_sched = cosine_schedule(
            base_lr,
            min_lr_for_batch(cfg.min_lr, self.opts.batch_size, cfg.min_lr_batch),
            total,
            warm,
            lr_for_batch(cfg.start_warmup_lr, self.opts.batch_size),
        )
        self.wd_sched = cosine_schedule(cfg.weight_decay, cfg.final_weight_decay, total)
        self.ema_sched = cosine_schedule(self.ema.momentum, self.ema.final_momentum, total)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def _checkpoint(
        self,
        epoch: int,
        step_in_epoch: int,
        global_step: int,
        metrics: dict[str, Any],
        final: bool = False,
        at_end: bool = False,
    ) -> Path | None:
        if self.rank != 0:
            return None
        task, meta = self.task, self.meta
        head = task.online.head
        head_rec = None
        if hasattr(head, "init_kwargs"):
            head_rec = {
                "type": type(head).__name__,
                "kwargs": head.init_kwargs,
                "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
            }
        backbone = task.eval_backbone()
        if self.opts.precise_bn_images and has_batchnorm(backbone) and (step_in_epoch == 0 or at_end):
            backbone = self._precise_bn(backbone)
        state = {
            "task": {k: v.detach().cpu() for k, v in task.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "rng": torch.get_rng_state(),
            "world_size": self.world,
            "batch_size": self.opts.batch_size,
            "identity": self._identity(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        ckpt = make_checkpoint(
            kind=meta.kind,
            method=task.method,
            student=meta.student,
            backbone={
                k: v.detach().cpu() for k, v in cast(nn.Module, backbone.backbone).state_dict().items()
            },
            head=head_rec,
            teacher=meta.teacher,
            normalization=meta.normalization,
            resolution=meta.resolution,
            config=meta.config,
            data=meta.data,
            metrics=metrics,
            init=meta.init,
            seed=self.opts.seed,  # the initial weights: an untrained baseline rebuilds them
            progress={
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": global_step,
                "total_steps": self.total_steps,
                "finished": final,
            },
            train_state=state,
        )
        return atomic_save(ckpt, self.ckpt_path)

    def _precise_bn(self, backbone: nn.Module) -> nn.Module:
        """A copy of the eval network with BatchNorm statistics of clean images at the global size."""
        return precise_bn_from_dataset(
            backbone,
            self.dataset,
            self.meta.resolution,
            self.meta.normalization["mean"],
            self.meta.normalization["std"],
            n=self.opts.precise_bn_images,
            seed=self.opts.seed,
        )

    def _resume(self) -> tuple[int, int, int]:
        ckpt = self._resume_ckpt if self._resume_ckpt is not None else self.check_resume()
        self._resume_ckpt = None  # applied below; do not keep a second copy of the weights for the run
        st = ckpt["train_state"]
        self.task.load_state_dict(st["task"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["rng"])
        log.info("resumed from %s at epoch %d step %d", self.ckpt_path, st["epoch"], st["step_in_epoch"])
        return st["epoch"], st["step_in_epoch"], st["global_step"]

    # ----------------------------------------------------------------- data
    def _epoch_batches(self, epoch: int, start_step: int):
        """Yield ``(uint8 images, valid_hw, labels)`` of this process's share of each global batch
        (labels ``int64 [B]``, ``-1`` for unlabelled images; only tasks with ``uses_labels`` read them).
        """
        batches = epoch_order(self.opts.seed, epoch, len(self.dataset), self.opts.batch_size)[start_step:]
        batches = batches[:, self.rank :: self.world]  # this rank's rows of every global batch
        if isinstance(self.dataset, ImageTensorDataset):
            imgs = self.dataset.images
            full = torch.tensor([imgs.shape[-2], imgs.shape[-1]])
            pin = self.device.type == "cuda"
            labels = self.dataset.labels
            for idx in batches:
                x = imgs[idx]
                x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
                yield (x.pin_memory() if pin else x), full.expand(len(idx), 2), labels[idx]
            return
        if getattr(self, "_loader", None) is None:
            # One loader for the whole run, so worker processes persist across epochs; the batch
            # sampler is told each epoch's batches (it is iterated in this process).
            self._batch_plan = _BatchPlan()
            workers = resolve_workers(self.opts.num_workers, self.device)
            # Workers decode and fit images to the canvas (uint8); pinned batches copy to a GPU
            # without a wait, and 4 batches per worker stay ready ahead of the step.
            self._loader = torch.utils.data.DataLoader(
                _HWDataset(self.dataset),
                batch_sampler=self._batch_plan,
                num_workers=workers,
                collate_fn=_collate,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
                prefetch_factor=4 if workers else None,
            )
        self._batch_plan.batches = batches.tolist()
        loader = self._loader
        assert loader is not None  # built above, or on an earlier epoch
        for imgs, hw, labels, skipped in loader:
            for p in skipped:
                self.skipped.add(p)
            yield imgs, hw, labels

    def _close_loader(self) -> None:
        """Stop the DataLoader's persistent workers (they would outlive a failed run otherwise)."""
        loader = getattr(self, "_loader", None)
        self._loader = None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    # ----------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end (or ``max_steps`` / ``max_seconds``), checkpointing; returns the final metrics.

        ``resume``: continue the run's checkpoint exactly (see :meth:`check_resume`).
        """
        if resume and self._resume_ckpt is None:
            self.check_resume()  # before _build: an auto precision takes the stored run's choice
        self._build()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.skipped: set[str] = set()
        epoch, step0, gstep = 0, 0, 0
        if resume:
            epoch, step0, gstep = self._resume()
            if step0 >= self.steps_per_epoch:
                epoch, step0 = epoch + 1, 0
        runlog = (
            RunLog(
                self.out_dir,
                resume_step=gstep if resume else None,
                tensorboard=self.opts.tensorboard and self.rank == 0,
            )
            if self.rank == 0
            else None
        )
        amp = autocast_dtype(self.precision)
        limit = self.opts.max_steps if self.opts.max_steps is not None else self.total_steps
        bar = tqdm(
            total=min(limit, self.total_steps) * self.opts.batch_size,
            initial=gstep * self.opts.batch_size,
            unit="img",
            unit_scale=True,
            dynamic_ncols=True,
            disable=not self.opts.progress or self.rank != 0,
            desc=f"{self.task.method} {self.meta.student['arch']}",
        )
        sync_every = self._sync_every()
        last_loss = float("nan")
        pending: list[tuple[dict[str, Any], torch.Tensor, dict[str, Any]]] = []
        window = {"t": time.time(), "images": 0}

        def flush() -> None:
            """Read the pending steps' losses (one wait for the device), check them, log them."""
            nonlocal last_loss
            if not pending:
                return
            rate = window["images"] / max(time.time() - window["t"], 1e-9)
            for row, loss, parts in pending:
                value = float(loss)
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"the loss became {value} at epoch {row['epoch']}, step {row['step']}. The last good "
                        f"checkpoint is {self.ckpt_path} (continue with --resume). Try a lower "
                        "optim.base_lr, optim.clip_grad=3.0, or train.precision=fp32."
                    )
                last_loss = value
                row |= {
                    "loss": value,
                    **{
                        f"loss_{k.removeprefix('loss_')}": float(v)
                        for k, v in parts.items()
                        if "loss" in k and not (isinstance(v, float) and math.isnan(v))
                    },
                    "img_per_s": rate,
                }
                if runlog is not None:
                    runlog.add(row)
            bar.update(window["images"])
            bar.set_postfix(
                ep=pending[-1][0]["epoch"], loss=f"{last_loss:.4f}", lr=f"{pending[-1][0]['lr']:.2e}"
            )
            pending.clear()
            window.update(t=time.time(), images=0)

        try:
            t_start = time.time()
            self.data_wait_s = 0.0
            stopped_early = False
            metrics: dict[str, Any] = {}
            self.task.train()
            while epoch < self.opts.epochs and not stopped_early:
                t_epoch, n_img = time.time(), 0
                batches = self._epoch_batches(epoch, step0)
                step_in_epoch = step0
                while True:
                    t_wait = time.time()
                    try:
                        imgs, hw, labels = next(batches)
                    except StopIteration:
                        break
                    data_s = time.time() - t_wait
                    self.data_wait_s += data_s
                    if gstep >= limit or (
                        self.opts.max_seconds and time.time() - t_start > self.opts.max_seconds
                    ):
                        stopped_early = True
                        break
                    loss, parts = self._step(imgs, hw, epoch, gstep, amp, labels)
                    gstep += 1
                    step_in_epoch += 1
                    n_img += imgs.shape[0] * self.world
                    window["images"] += imgs.shape[0] * self.world
                    pending.append(
                        (
                            {
                                "step": gstep,
                                "epoch": epoch,
                                "lr": self.optimizer.param_groups[0]["lr"],
                                "wd": self.optimizer.param_groups[0]["weight_decay"],
                                "data_s": data_s,
                            },
                            loss,
                            parts,
                        )
                    )
                    checkpoint_now = bool(
                        self.opts.checkpoint_every_steps and gstep % self.opts.checkpoint_every_steps == 0
                    )
                    if len(pending) >= sync_every or checkpoint_now:
                        flush()  # a checkpoint is written only after its steps' losses were checked
                    if checkpoint_now:
                        self._checkpoint(epoch, step_in_epoch, gstep, metrics)
                flush()
                if not stopped_early:
                    step0 = 0
                    metrics = {
                        "epoch": epoch + 1,
                        "loss": last_loss,
                        "img_per_s": n_img / max(time.time() - t_epoch, 1e-9),
                    }
                    self._checkpoint(epoch + 1, 0, gstep, metrics)
                    if runlog is not None:
                        runlog.plot(title=f"{self.task.method} · {self.meta.student['arch']}")
                    epoch += 1
                    continue
                # stopped early inside an epoch: keep an exact resume point
                self._checkpoint(epoch, step_in_epoch, gstep, metrics)
            if self.skipped:
                log.warning(
                    "skipped %d unreadable image(s); first: %s", len(self.skipped), sorted(self.skipped)[0]
                )
            elapsed = time.time() - t_start
            finished = epoch >= self.opts.epochs
            metrics = {
                **metrics,
                "loss": last_loss,
                "global_step": gstep,
                "seconds": round(elapsed, 1),
                "skipped_images": len(self.skipped),
                "finished": finished,
                # the share of the run's wall time spent waiting for the next batch
                "data_wait_fraction": round(self.data_wait_s / max(elapsed, 1e-9), 4),
                "precision": self.precision,
                "channels_last": self.channels_last,
            }
            self._checkpoint(
                epoch, 0 if finished else step_in_epoch, gstep, metrics, final=finished, at_end=True
            )
            if runlog is not None:
                runlog.plot(title=f"{self.task.method} · {self.meta.student['arch']}")
        finally:  # a diverged or interrupted run still closes its bar, logs and workers
            bar.close()
            if runlog is not None:
                runlog.close()
            self._close_loader()
        return metrics

    def _sync_every(self) -> int:
        """Steps per read of the loss: every step on a CPU (reading costs nothing there)."""
        return 1 if self.device.type == "cpu" else max(1, self.opts.sync_every)

    def _step(
        self,
        imgs: torch.Tensor,
        hw: torch.Tensor,
        epoch: int,
        gstep: int,
        amp: torch.dtype | None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        g = step_generator(self.opts.seed, gstep)
        step_in_epoch = gstep - epoch * self.steps_per_epoch
        self.task.reseed(_mix_seed(self.opts.seed, gstep, self.rank, 31))
        with torch.no_grad():
            # Draw the view parameters of the whole global batch and keep this process's rows, so a
            # run on N processes sees exactly the views a single process would.
            hw_all = torch.full((self.opts.batch_size, 2), imgs.shape[-1], dtype=torch.long)
            rows = torch.arange(self.rank, self.opts.batch_size, self.world)
            hw_all[rows] = hw.long()
            params = self.views.sample(hw_all, g)
            if self.target_source is not None:  # replay the cached global views (locals stay fresh)
                self.target_source.replay_views(epoch, step_in_epoch, params)
            if self.world > 1:
                params.crops = [cp.index(rows) for cp in params.crops]
            # Parameters are drawn on the host (the same draws on every device); the views are
            # rendered where the model runs, from the uint8 batch (4x less to copy than floats).
            views = self.views.render(imgs.to(self.device, non_blocking=True), params)
        for pg in self.optimizer.param_groups:
            pg["lr"] = float(self.lr_sched[gstep])
            pg["weight_decay"] = float(self.wd_sched[gstep]) * pg.get("wd_factor", 1.0)
        # Tasks see fractional epochs elapsed, so short budgets can set warm-ups and freezes in
        # fractions of an epoch; a whole-epoch recipe value acts exactly as with the epoch index.
        progress = gstep / self.steps_per_epoch
        ctx = torch.autocast(self.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            if getattr(self.task, "uses_labels", False):  # supervised fine-tuning
                if labels is None:
                    raise ValueError(f"the {self.task.method} task needs the batch's labels")
                loss, parts = self.task(views, progress, labels=labels.to(self.device, non_blocking=True))
            elif self.target_source is None:
                loss, parts = self.task(views, progress)
            else:
                t_out = self.target_source.targets(epoch, step_in_epoch, rows, self.device)
                loss, parts = self.task(views, progress, teacher_out=t_out)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        clip = self.optim.clip_grad
        if clip:
            clip_gradients(self.task.online, clip)
        self.task.before_optimizer_step(progress)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.task.after_optimizer_step(float(self.ema_sched[gstep]))
        # The loss and its parts stay on the device: fit() reads them once per sync window.
        return loss.detach(), parts
