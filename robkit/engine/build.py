"""From a resolved recipe to the objects the engine runs: views, heads, objectives, tasks.

Also the Python API behind ``robkit pretrain`` and ``robkit distill`` (``pretrain()`` and
``distill()``), which the demo and the benchmarks call directly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from robkit.data.datasets import DataError, data_fingerprint, open_dataset
from robkit.data.views import IMAGENET_MEAN, IMAGENET_STD, MultiCropViews
from robkit.engine.config import check_overrides, deep_merge, load_recipe, resolve_recipe_name
from robkit.engine.tasks import DINOTask, MoCoTask, RoBTask, SwAVTask, Task, rob_student_head
from robkit.engine.trainer import CheckpointMeta, Trainer, TrainOptions
from robkit.models.checkpoint import load_student
from robkit.models.heads import build_head
from robkit.models.students import STUDENTS, Student, build_student
from robkit.teachers.teacher import TeacherLoadError
from robkit.utils.errors import RecipeError, RunExistsError
from robkit.utils.files import CheckpointError, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

METHODS = ("dino", "swav", "mocov2")
SMALL_IMAGE_PX = 64  # data sets whose images are at most this size get the "-small" recipes


def build_views(v: dict[str, Any], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> MultiCropViews:
    kw = {k: (tuple(x) if isinstance(x, list) else x) for k, x in v.items()}
    return MultiCropViews(**kw, mean=tuple(mean), std=tuple(std))


PRETRAIN_HEADS = {"dino": "DINOHead", "swav": "SwAVHead", "mocov2": "MLPHead"}


def pretrain_head(method: str, in_dim: int, head_cfg: dict[str, Any]) -> torch.nn.Module:
    """The recipe's head of a pre-training method; the method fixes the head class (``head.type`` is not read)."""
    kwargs = {k: v for k, v in head_cfg.items() if k != "type"}
    if method == "mocov2":  # MoCo's projector [d, hidden, out]
        dims = [in_dim, kwargs["hidden_dim"], kwargs["out_dim"]]
        return build_head("MLPHead", dims=dims, use_bn=kwargs.get("use_bn", False))
    return build_head(PRETRAIN_HEADS[method], in_dim=in_dim, **kwargs)


def build_pretrain_task(method: str, student: Student, cfg: dict[str, Any], channels_last: bool) -> Task:
    """DINO, SwAV or MoCo-v2* with the recipe's head and loss keywords."""
    v, loss_cfg, head_cfg = cfg["views"], dict(cfg["loss"]), cfg["head"]
    n_global, n_local = v["n_global"], v["n_local"]
    epochs = cfg["train"]["epochs"]
    d = student.embed_dim
    if method == "dino":
        from robkit.objectives.dino import DINOLoss

        if loss_cfg.get("warmup_teacher_temp_epochs", 0) > epochs:  # a short run: warm up over all of it
            log.info("teacher-temperature warm-up shortened to the run's %d epochs", epochs)
            loss_cfg["warmup_teacher_temp_epochs"] = epochs

        head = pretrain_head(method, d, head_cfg)
        loss = DINOLoss(head_cfg["out_dim"], n_global=n_global, n_local=n_local, n_epochs=epochs, **loss_cfg)
        return DINOTask(
            student,
            head,
            loss,
            n_global=n_global,
            freeze_last_layer_epochs=cfg["optim"].get("freeze_last_layer_epochs", 1),
            channels_last=channels_last,
        )
    if method == "swav":
        from robkit.objectives.swav import SwAVLoss

        head = pretrain_head(method, d, head_cfg)
        loss = SwAVLoss(
            head_cfg["n_prototypes"],
            embed_dim=head_cfg["out_dim"],
            n_global=n_global,
            n_local=n_local,
            **loss_cfg,
        )
        return SwAVTask(student, head, loss, cfg["optim"].get("freeze_prototypes_epochs", 1), channels_last)
    if method == "mocov2":
        from robkit.objectives.mocov2 import MoCoV2Loss

        if n_global != 2:
            raise RecipeError(
                f"MoCo-v2* uses exactly 2 global views (key + query), got views.n_global={n_global}"
            )
        head = pretrain_head(method, d, head_cfg)
        loss_cfg["dim"] = head_cfg["out_dim"]  # the loss works on the head's output
        loss = MoCoV2Loss(n_local=n_local, **loss_cfg)
        return MoCoTask(
            student,
            head,
            loss,
            key_momentum=cfg["ema"].get("key_momentum", 0.999),
            channels_last=channels_last,
        )
    raise RecipeError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


HEAD_FAMILIES = {"DINOHead": "dino", "iBOTHead": "ibot", "SwAVHead": "swav", "MSNHead": "msn"}


def teacher_head_family(teacher) -> str:
    """The RoB loss family of a teacher: its own family, or for a robkit teacher its head's."""
    fam = getattr(teacher, "family", "")
    if fam in ("dino", "ibot", "msn", "swav"):
        return fam
    head_type = getattr(teacher, "head_type", None) or type(getattr(teacher, "head", None)).__name__
    if head_type in HEAD_FAMILIES:
        return HEAD_FAMILIES[head_type]
    raise TeacherLoadError(
        f"teacher {getattr(teacher, 'name', '?')!r} has no prototype head (head type {head_type!r}); RoB "
        "distils a distribution over prototypes, so the teacher needs a DINO, iBOT, MSN or SwAV head "
        "(train one with `robkit pretrain --method dino` or `--method swav`)."
    )


def build_rob_task(
    teacher,
    family: str,
    student: Student,
    cfg: dict[str, Any],
    channels_last: bool,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> RoBTask:
    from robkit.objectives.rob import build_rob_loss

    v, rob = cfg["views"], cfg.get("rob", {})
    head_cfg = dict(cfg["head"])
    head_type = head_cfg.pop("type", "teacher")
    k = int(teacher.num_prototypes)
    head = rob_student_head(family, student.embed_dim, k, head_type=head_type, **head_cfg)
    loss = build_rob_loss(family, n_teacher_crops=v["n_global"], **cfg["loss"])
    return RoBTask(
        student,
        head,
        loss,
        teacher,
        family,
        n_global=v["n_global"],
        student_mean=mean,
        student_std=std,
        mask_ratio_range=tuple(rob.get("mask_ratio_range", (0.1, 0.5))),
        mask_p_zero=rob.get("mask_p_zero", 0.5),
        patch_drop=rob.get("patch_drop", 0.0),
        teacher_resolution=_teacher_resolution(rob.get("teacher_resolution", "native"), v),
        channels_last=channels_last,
    )


def _teacher_resolution(setting, views_cfg: dict[str, Any]) -> int | None:
    """``native`` (the teacher's own resolution), ``student`` (the global crops' size) or pixels."""
    if setting in (None, "native"):
        return None
    if setting == "student":
        return int(views_cfg["global_size_px"])
    return int(setting)


def resolve_config(
    method: str, student_arch: str, recipe: str, overrides: dict[str, Any], small_images: bool
) -> dict[str, Any]:
    kind = STUDENTS[student_arch].kind if student_arch in STUDENTS else "cnn"
    name = None
    if small_images and not recipe.endswith("-small"):
        try:
            name = resolve_recipe_name(f"{recipe}-small", method, kind)
        except KeyError:
            name = None
    name = name or resolve_recipe_name(recipe, method, kind)
    base = load_recipe(name)
    check_overrides(base, overrides)
    return deep_merge(base, overrides)


def resolve_run_config(
    method: str,
    student_arch: str,
    recipe: str,
    overrides: dict[str, Any] | None,
    ds: Any,
    family: str | None = None,
) -> dict[str, Any]:
    """The one recipe resolver of ``pretrain``, ``distill`` and ``teachers cache``.

    ``method`` is a pre-training method or ``"rob"`` (then ``family`` is the teacher's head family and
    ``recipe="auto"`` means ``rob-<family>``); small-image data sets (``ds.canvas_px`` <= 64) get the
    recipe's ``-small`` variant where one exists.
    """
    small = getattr(ds, "canvas_px", 256) <= SMALL_IMAGE_PX
    if method == "rob" and recipe == "auto":
        if family is None:
            raise ValueError("recipe 'auto' needs the teacher's head family")
        recipe = f"rob-{family}"
    return resolve_config(method, student_arch, recipe, overrides or {}, small)


def _dataset(data, limit: int | None):
    """A data-set spec (see ``open_dataset``) or an already built data set."""
    if isinstance(data, (str, Path)):
        return open_dataset(data, "train", limit=limit)
    return data


def _run_dir(out: str | Path | None, prefix: str, resume: bool) -> Path:
    out_dir = Path(out) if out else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out_dir / "checkpoint.pt").exists() and not resume:
        raise RunExistsError(
            f"{out_dir} already holds a run (checkpoint.pt). Continue it with --resume, start a new run from its "
            "weights with --init, or choose another --out."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _options(cfg: dict[str, Any], out_dir: Path, engine: dict[str, Any]) -> TrainOptions:
    t = cfg["train"]
    return TrainOptions(
        out_dir=out_dir,
        epochs=int(t["epochs"]),
        batch_size=int(t["batch_size"]),
        precision=t.get("precision", "auto"),
        channels_last=t.get("channels_last", True),
        compile=t.get("compile", False),
        **engine,
    )


def pretrain(
    method: str = "dino",
    student: str = "mobilenet_v3_small",
    recipe: str = "sslight",
    data: str = "fashion-mnist",
    out: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    data_limit: int | None = None,
    init: str | Path | None = None,
    **engine: Any,
) -> tuple[dict[str, Any], Path]:
    """Self-supervised pre-training without a teacher (SSLight). Returns ``(metrics, run folder)``.

    ``init``: a robkit checkpoint whose student backbone weights start this new run (``--init``);
    ``resume`` instead continues the interrupted run in ``out`` exactly.
    """
    if method not in METHODS:
        raise RecipeError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    ds = _dataset(data, data_limit)
    cfg = resolve_run_config(method, student, recipe, overrides, ds)
    out_dir = _run_dir(out, f"{method}-{student}", resume)
    net, init_rec = _initial_student(student, cfg, engine.get("seed", 0), init)
    task = build_pretrain_task(method, net, cfg, channels_last=cfg["train"].get("channels_last", True))
    return _fit(task, cfg, ds, data, out_dir, "pretrain", None, resume, engine, init_rec=init_rec)


def distill(
    teacher: str,
    student: str = "mobilenet_v3_small",
    recipe: str = "auto",
    data: str = "fashion-mnist",
    out: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    data_limit: int | None = None,
    teacher_obj=None,
    teacher_cache: str | Path | None = None,
    init: str | Path | None = None,
    **engine: Any,
) -> tuple[dict[str, Any], Path]:
    """RoB distillation from a frozen teacher (zoo name, teacher file or robkit checkpoint).

    ``teacher_cache``: a folder built by ``robkit teachers cache`` for the same teacher, recipe,
    data and seed; its global views are replayed and only the teacher's head runs. ``init``: a robkit
    checkpoint whose student backbone weights start this new run.
    """
    from robkit import teachers as zoo

    tch = teacher_obj if teacher_obj is not None else zoo.load(teacher)
    family = teacher_head_family(tch)
    ds = _dataset(data, data_limit)
    cfg = resolve_run_config("rob", student, recipe, overrides, ds, family)
    if cfg.get("teacher_family") and cfg["teacher_family"] != family:
        log.warning(
            "recipe %s was written for %s teachers; the teacher is a %s teacher",
            cfg["name"],
            cfg["teacher_family"],
            family,
        )
    out_dir = _run_dir(out, f"rob-{family}-{student}", resume)
    net, init_rec = _initial_student(student, cfg, engine.get("seed", 0), init)
    task = build_rob_task(tch, family, net, cfg, channels_last=cfg["train"].get("channels_last", True))
    teacher_rec = {
        "name": getattr(tch, "name", str(teacher)),
        "sha256": getattr(tch, "sha256", None),
        "family": family,
    }
    source = None
    if teacher_cache is not None:
        from robkit.engine.teacher_cache import open_cache

        source = open_cache(teacher_cache, tch, cfg, ds, engine.get("seed", 0), needs_patches=task.use_masks)
    return _fit(task, cfg, ds, data, out_dir, "distill", teacher_rec, resume, engine, source, init_rec)


def _fingerprint(ds) -> dict[str, Any] | None:
    try:
        return data_fingerprint(ds)
    except DataError:  # a data set type that cannot be fingerprinted: resume checks the rest
        return None


def _initial_student(arch: str, cfg: dict[str, Any], seed: int, init) -> tuple[Student, dict | None]:
    """The run's seeded initial student (the same seed gives the same weights), or ``--init``'s weights."""
    torch.manual_seed(seed)
    vit_drop = STUDENTS[arch].kind == "vit" and cfg["train"].get("drop_path")
    net = build_student(arch, **({"drop_path_rate": cfg["train"]["drop_path"]} if vit_drop else {}))
    return net, (init_from_checkpoint(net, init) if init else None)


def init_from_checkpoint(student: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a robkit checkpoint's student backbone into ``student`` (``--init``); returns its record.

    Only the backbone is taken: the head, optimiser and schedule start fresh, as a new run should.
    """
    src, meta = load_student(path)
    arch = meta.get("student", {}).get("arch")
    if arch != getattr(student, "arch", None):
        raise CheckpointError(
            f"--init {path}: its student is {arch!r}, this run trains {getattr(student, 'arch', '?')!r}; "
            f"pass --student {arch} or a checkpoint of the same student"
        )
    student.backbone.load_state_dict(src.backbone.state_dict())
    return {"path": str(path), "sha256": sha256_file(path), "method": meta.get("method")}


def _spec(data) -> str:
    return str(data) if isinstance(data, (str, Path)) else getattr(data, "name", type(data).__name__)


def _fit(
    task: Task,
    cfg: dict[str, Any],
    ds,
    data: str,
    out_dir: Path,
    kind: str,
    teacher_rec,
    resume: bool,
    engine: dict[str, Any],
    target_source=None,
    init_rec: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Path]:
    views = build_views(cfg["views"])
    student = task.student
    identity: dict[str, Any] = {"data": _fingerprint(ds)}
    if teacher_rec is not None:
        identity["teacher_sha256"] = teacher_rec.get("sha256")
    if target_source is not None:
        identity["target_cache"] = getattr(target_source, "key", None)
    meta = CheckpointMeta(
        kind=kind,
        method=task.method,
        student={"arch": student.arch, "kwargs": student.build_kwargs},
        config=cfg,
        normalization={"mean": list(views.mean), "std": list(views.std)},
        resolution=int(cfg["views"]["global_size_px"]),
        teacher=teacher_rec,
        data={"spec": _spec(data), "images": len(ds), "name": getattr(ds, "name", _spec(data))},
        identity=identity,
        init=init_rec,
    )
    trainer = Trainer(
        task, views, ds, cfg["optim"], cfg.get("ema", {}), _options(cfg, out_dir, engine), meta, target_source
    )
    if resume:
        trainer.check_resume()  # before anything in the run folder changes
    atomic_write_text(
        out_dir / "config.yaml",
        yaml.safe_dump(
            {**cfg, "data": {"spec": _spec(data), "images": len(ds)}, "teacher": teacher_rec},
            sort_keys=False,
        ),
    )
    metrics = trainer.fit(resume=resume)
    return metrics, out_dir
