"""From a resolved recipe to the objects the engine runs: views, heads, objectives, tasks.

Also the Python API behind ``robkit pretrain`` and ``robkit distill`` (``pretrain()`` and
``distill()``), which the demo and the benchmarks call directly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import yaml
from torch import nn

from robkit.data.datasets import DataError, data_fingerprint, open_dataset
from robkit.data.views import IMAGENET_MEAN, IMAGENET_STD, MultiCropViews
from robkit.engine.config import deep_merge, load_recipe, resolve_recipe_name
from robkit.engine.hardware import TEACHER_PRECISIONS
from robkit.engine.recipe import (
    DINOLossSpec,
    HeadSpec,
    MoCoLossSpec,
    Recipe,
    RoBLossSpec,
    RoBSpec,
    SwAVLossSpec,
    parse_recipe,
)
from robkit.engine.schedules import SHORT_RUN_SHARE
from robkit.engine.tasks import (
    DINOTask,
    FeatureDistillTask,
    MoCoTask,
    RoBTask,
    SwAVTask,
    Task,
    rob_student_head,
)
from robkit.engine.trainer import CheckpointMeta, Trainer, TrainOptions
from robkit.models.checkpoint import load_student
from robkit.models.heads import DINOHead, MLPHead, SwAVHead, build_head
from robkit.models.students import STUDENTS, Student, build_student
from robkit.teachers.teacher import Teacher, TeacherLoadError
from robkit.utils.errors import RecipeError, RunExistsError
from robkit.utils.files import CheckpointError, atomic_write_text, sha256_file

if TYPE_CHECKING:
    from robkit.engine.teacher_cache import CachedTargets

log = logging.getLogger(__name__)

METHODS = ("dino", "swav", "mocov2")
SMALL_IMAGE_PX = 64  # data sets whose images are at most this size get the "-small" recipes


def build_views(
    views: MultiCropViews, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> MultiCropViews:
    """The recipe's views with the data's normalisation (ImageNet's unless given)."""
    return dataclasses.replace(
        views,
        mean=cast("tuple[float, float, float]", tuple(mean)),
        std=cast("tuple[float, float, float]", tuple(std)),
    )


PRETRAIN_HEADS = {"dino": "DINOHead", "swav": "SwAVHead", "mocov2": "MLPHead"}


def pretrain_head(method: str, in_dim: int, head: HeadSpec) -> torch.nn.Module:
    """The recipe's head of a pre-training method; the method fixes the head class (``head.type`` is not read)."""
    kwargs = head.options()
    if method == "mocov2":  # MoCo's projector [d, hidden, out]
        dims = [in_dim, kwargs["hidden_dim"], kwargs["out_dim"]]
        return build_head("MLPHead", dims=dims, use_bn=kwargs.get("use_bn", False))
    return build_head(PRETRAIN_HEADS[method], in_dim=in_dim, **kwargs)


def _required(recipe: Recipe, section: str, value: Any, field: str) -> Any:
    if value is None:
        raise RecipeError(f"recipe {recipe.name!r}: {recipe.method} needs {section}.{field}")
    return value


def short_run_freeze(freeze_epochs: float, run_epochs: int, what: str) -> float:
    """``freeze_epochs`` capped at :data:`~robkit.engine.schedules.SHORT_RUN_SHARE` of the run.

    DINO freezes its last layer, and SwAV its prototypes, for the first epoch of runs of 100 epochs or
    more; a one-epoch run (a short budget) would keep them frozen all along, so the head would never
    learn its prototypes.  As the LR warm-up (half the run at most) and the teacher-temperature
    warm-up (the run at most), the freeze is shortened, and the log says so.
    """
    cap = SHORT_RUN_SHARE * run_epochs
    if freeze_epochs > cap:
        log.info(
            "%s frozen for %g of the run's %d epochs, not %g (short run)",
            what,
            cap,
            run_epochs,
            freeze_epochs,
        )
        return cap
    return freeze_epochs


def build_pretrain_task(method: str, student: Student, recipe: Recipe, channels_last: bool) -> Task:
    """DINO, SwAV or MoCo-v2* with the recipe's head and loss keywords."""
    v, head_spec, loss_spec = recipe.views, recipe.head, recipe.loss
    n_global, n_local = v.n_global, v.n_local
    epochs = recipe.train.epochs
    d = student.embed_dim
    if recipe.method != method:
        raise RecipeError(f"recipe {recipe.name!r} is a {recipe.method} recipe, not {method}")
    if isinstance(loss_spec, DINOLossSpec):
        from robkit.objectives.dino import DINOLoss

        if loss_spec.warmup_teacher_temp_epochs > epochs:  # a short run: warm up over all of it
            log.info("teacher-temperature warm-up shortened to the run's %d epochs", epochs)
            loss_spec = dataclasses.replace(loss_spec, warmup_teacher_temp_epochs=epochs)

        head = pretrain_head(method, d, head_spec)
        out_dim = _required(recipe, "head", head_spec.out_dim, "out_dim")
        loss: nn.Module = DINOLoss(
            out_dim, n_global=n_global, n_local=n_local, n_epochs=epochs, **dataclasses.asdict(loss_spec)
        )
        return DINOTask(
            student,
            cast(DINOHead, head),
            loss,
            n_global=n_global,
            freeze_last_layer_epochs=short_run_freeze(
                recipe.optim.freeze_last_layer_epochs, epochs, "DINO's last layer"
            ),
            channels_last=channels_last,
        )
    if isinstance(loss_spec, SwAVLossSpec):
        from robkit.objectives.swav import SwAVLoss

        head = pretrain_head(method, d, head_spec)
        loss = SwAVLoss(
            _required(recipe, "head", head_spec.n_prototypes, "n_prototypes"),
            embed_dim=_required(recipe, "head", head_spec.out_dim, "out_dim"),
            n_global=n_global,
            n_local=n_local,
            **dataclasses.asdict(loss_spec),
        )
        freeze = short_run_freeze(recipe.optim.freeze_prototypes_epochs, epochs, "SwAV's prototypes")
        return SwAVTask(student, cast(SwAVHead, head), loss, freeze, channels_last)
    if isinstance(loss_spec, MoCoLossSpec):
        from robkit.objectives.mocov2 import MoCoV2Loss

        if n_global != 2:
            raise RecipeError(
                f"MoCo-v2* uses exactly 2 global views (key + query), got views.n_global={n_global}"
            )
        head = pretrain_head(method, d, head_spec)
        dim = _required(recipe, "head", head_spec.out_dim, "out_dim")  # the loss works on the head's output
        loss = MoCoV2Loss(dim=dim, n_local=n_local, **dataclasses.asdict(loss_spec))
        return MoCoTask(
            student,
            cast(MLPHead, head),
            loss,
            key_momentum=recipe.ema.key_momentum,
            channels_last=channels_last,
        )
    raise RecipeError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


HEAD_FAMILIES = {"DINOHead": "dino", "iBOTHead": "ibot", "SwAVHead": "swav", "MSNHead": "msn"}


def teacher_head_family(teacher: Any) -> str:
    """The RoB loss family of a teacher: its own family, for a robkit teacher its head's, and
    ``features`` (feature distillation) for a backbone without a released head.
    """
    fam = getattr(teacher, "family", "")
    if fam in ("dino", "ibot", "msn", "swav"):
        return fam
    if getattr(teacher, "headless", False):
        return "features"  # no head: feature distillation (objectives/feature.py)
    head_type = getattr(teacher, "head_type", None) or type(getattr(teacher, "head", None)).__name__
    if head_type in HEAD_FAMILIES:
        return HEAD_FAMILIES[head_type]
    raise TeacherLoadError(
        f"teacher {getattr(teacher, 'name', '?')!r} has no prototype head (head type {head_type!r}); RoB "
        "distils a distribution over prototypes, so the teacher needs a DINO, iBOT, MSN or SwAV head "
        "(train one with `robkit pretrain --method dino` or `--method swav`)."
    )


def build_rob_task(
    teacher: Teacher,
    family: str,
    student: Student,
    recipe: Recipe,
    channels_last: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> RoBTask:
    """The RoB task: the frozen ``teacher``, a fresh student head of its kind and the family's loss."""
    from robkit.objectives.rob import build_rob_loss

    if not isinstance(recipe.loss, RoBLossSpec):
        raise RecipeError(f"recipe {recipe.name!r} is a {recipe.method} recipe; RoB needs a rob-* recipe")
    v, rob = recipe.views, recipe.rob or RoBSpec()
    if rob.teacher_precision not in TEACHER_PRECISIONS:
        raise RecipeError(
            f"rob.teacher_precision must be one of {', '.join(TEACHER_PRECISIONS)}, got {rob.teacher_precision!r}"
        )
    head_opts = recipe.head.options()
    common: dict[str, Any] = {
        "n_global": v.n_global,
        "student_mean": mean,
        "student_std": std,
        "teacher_resolution": teacher_resolution(rob.teacher_resolution, v),
        "channels_last": channels_last,
        "teacher_precision": rob.teacher_precision,
        "compile_teacher": rob.teacher_compile,
    }
    if family == "features":
        return _feature_task(teacher, student, recipe, common)
    k = int(teacher.num_prototypes)
    head = rob_student_head(
        family, student.embed_dim, k, head_type=recipe.head.type or "teacher", **head_opts
    )
    try:
        loss = build_rob_loss(family, n_teacher_crops=v.n_global, **recipe.loss.options())
    except TypeError as e:  # a loss field this family's loss does not take
        raise RecipeError(f"recipe {recipe.name!r} with a {family} teacher: {e}") from None
    return RoBTask(
        student,
        head,
        loss,
        teacher,
        family,
        mask_ratio_range=rob.mask_ratio_range,
        mask_p_zero=rob.mask_p_zero,
        patch_drop=rob.patch_drop,
        **common,
    )


FEATURE_LOSS_FIELDS = {"distance", "patch_weight", "beta", "cross_view", "center_momentum"}


def _feature_task(teacher: Any, student: Student, recipe: Recipe, common: dict[str, Any]) -> RoBTask:
    """Feature distillation from a headless teacher: a projector to the teacher's width and the feature loss."""
    from robkit.objectives.rob import build_rob_loss

    opts = cast(RoBLossSpec, recipe.loss).options()
    head_fields = sorted(set(opts) - FEATURE_LOSS_FIELDS)
    if head_fields:
        raise RecipeError(
            f"recipe {recipe.name!r} distils a head's distribution (it sets {', '.join(head_fields)}), but "
            f"teacher {getattr(teacher, 'name', '?')!r} is a backbone without a released head: use "
            "--recipe auto (rob-features), or a rob-features recipe"
        )
    try:
        loss = build_rob_loss(
            "features", n_teacher_crops=recipe.views.n_global, dim=int(teacher.embed_dim), **opts
        )
    except (TypeError, ValueError) as e:  # a RoB field the feature loss does not take, or a bad value
        raise RecipeError(f"recipe {recipe.name!r} with a headless teacher: {e}") from None
    head_opts = recipe.head.options()
    unknown = sorted(set(head_opts) - {"hidden_dim"})
    if unknown or recipe.head.type not in (None, "teacher", "projector"):
        raise RecipeError(
            f"recipe {recipe.name!r}: feature distillation's projector takes head.hidden_dim only "
            f"(head.type 'projector'), got type {recipe.head.type!r} and {unknown or 'no other field'}; "
            "use a rob-features recipe"
        )
    head = build_head(
        "FeatureProjector",
        in_dim=student.embed_dim,
        out_dim=int(teacher.embed_dim),
        hidden_dim=head_opts.get("hidden_dim", 2048),
        patch=float(getattr(loss, "patch_weight", 0.0)) > 0,
    )
    return FeatureDistillTask(student, head, loss, teacher, **common)


def teacher_resolution(setting: str | int | None, views: MultiCropViews) -> int | None:
    """``native`` (the teacher's own resolution), ``student`` (the global crops' size) or pixels."""
    if setting in (None, "native"):
        return None
    if setting == "student":
        return int(views.global_size_px)
    try:
        return int(setting)
    except ValueError:
        raise RecipeError(
            f"rob.teacher_resolution must be native, student or a size in pixels, got {setting!r}"
        ) from None


def resolve_config(
    method: str, student_arch: str, recipe: str, overrides: dict[str, Any], small_images: bool
) -> Recipe:
    """The typed recipe ``recipe`` (a short name such as ``sslight`` or a full one) with ``overrides``."""
    kind = STUDENTS[student_arch].kind if student_arch in STUDENTS else "cnn"
    name = None
    if small_images and not recipe.endswith("-small"):
        try:
            name = resolve_recipe_name(f"{recipe}-small", method, kind)
        except KeyError:
            name = None
    name = name or resolve_recipe_name(recipe, method, kind)
    return parse_recipe(deep_merge(load_recipe(name), overrides))


def resolve_run_config(
    method: str,
    student_arch: str,
    recipe: str,
    overrides: dict[str, Any] | None,
    ds: Any,
    family: str | None = None,
) -> Recipe:
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


def _dataset(data: Any, limit: int | None) -> Any:
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


def _options(cfg: Recipe, out_dir: Path, engine: dict[str, Any]) -> TrainOptions:
    t = cfg.train
    return TrainOptions(
        out_dir=out_dir,
        epochs=t.epochs,
        batch_size=t.batch_size,
        precision=t.precision,
        channels_last=t.channels_last,
        compile=t.compile,
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
    task = build_pretrain_task(method, net, cfg, channels_last=cfg.train.channels_last)
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
    teacher_obj: Teacher | None = None,
    teacher_cache: str | Path | None = None,
    init: str | Path | None = None,
    teacher_file: str | Path | None = None,
    **engine: Any,
) -> tuple[dict[str, Any], Path]:
    """RoB distillation from a frozen teacher (zoo name, teacher file, robkit checkpoint, or
    ``timm:ARCH`` / ``torchvision:ARCH`` with ``teacher_file``; a headless teacher is feature-distilled).

    ``teacher_cache``: a folder built by ``robkit teachers cache`` for the same teacher, recipe,
    data and seed; its global views are replayed and only the teacher's head runs. ``init``: a robkit
    checkpoint whose student backbone weights start this new run.
    """
    from robkit import teachers as zoo

    loaded = teacher_obj if teacher_obj is not None else zoo.load(teacher, file=teacher_file)
    family = teacher_head_family(loaded)  # "features" for a teacher without a head
    tch = cast(Teacher, loaded)
    ds = _dataset(data, data_limit)
    cfg = resolve_run_config("rob", student, recipe, overrides, ds, family)
    if cfg.teacher_family and cfg.teacher_family != family:
        log.warning(
            "recipe %s was written for %s teachers; the teacher is a %s teacher",
            cfg.name,
            cfg.teacher_family,
            family,
        )
    out_dir = _run_dir(out, f"rob-{family}-{student}", resume)
    net, init_rec = _initial_student(student, cfg, engine.get("seed", 0), init)
    task = build_rob_task(tch, family, net, cfg, channels_last=cfg.train.channels_last)
    teacher_rec = {
        "name": getattr(tch, "name", str(teacher)),
        "sha256": getattr(tch, "sha256", None),
        "family": family,
    }
    source = None
    if teacher_cache is not None:
        from robkit.engine.teacher_cache import open_cache

        source = open_cache(
            teacher_cache, tch, cfg, ds, engine.get("seed", 0), needs_patches=task.needs_patch_targets
        )
    return _fit(task, cfg, ds, data, out_dir, "distill", teacher_rec, resume, engine, source, init_rec)


def _fingerprint(ds: Any) -> dict[str, Any] | None:
    try:
        return data_fingerprint(ds)
    except DataError:  # a data set type that cannot be fingerprinted: resume checks the rest
        return None


def _initial_student(
    arch: str, cfg: Recipe, seed: int, init: str | Path | None
) -> tuple[Student, dict | None]:
    """The run's seeded initial student (the same seed gives the same weights), or ``--init``'s weights."""
    torch.manual_seed(seed)
    vit_drop = STUDENTS[arch].kind == "vit" and cfg.train.drop_path
    net = build_student(arch, **({"drop_path_rate": cfg.train.drop_path} if vit_drop else {}))
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
    cast(nn.Module, student.backbone).load_state_dict(src.backbone.state_dict())
    return {"path": str(path), "sha256": sha256_file(path), "method": meta.get("method")}


def _spec(data: Any) -> str:
    return str(data) if isinstance(data, (str, Path)) else getattr(data, "name", type(data).__name__)


def _fit(
    task: Task,
    cfg: Recipe,
    ds: Any,
    data: str,
    out_dir: Path,
    kind: str,
    teacher_rec: dict[str, Any] | None,
    resume: bool,
    engine: dict[str, Any],
    target_source: CachedTargets | None = None,
    init_rec: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Path]:
    views = build_views(cfg.views)
    student = task.student
    record = cfg.to_dict()
    identity: dict[str, Any] = {"data": _fingerprint(ds)}
    if teacher_rec is not None:
        identity["teacher_sha256"] = teacher_rec.get("sha256")
    if target_source is not None:
        identity["target_cache"] = getattr(target_source, "key", None)
    meta = CheckpointMeta(
        kind=kind,
        method=task.method,
        student={"arch": student.arch, "kwargs": student.build_kwargs},
        config=record,
        normalization={"mean": list(views.mean), "std": list(views.std)},
        resolution=cfg.views.global_size_px,
        teacher=teacher_rec,
        data={"spec": _spec(data), "images": len(ds), "name": getattr(ds, "name", _spec(data))},
        identity=identity,
        init=init_rec,
    )
    trainer = Trainer(
        task, views, ds, cfg.optim, cfg.ema, _options(cfg, out_dir, engine), meta, target_source
    )
    if resume:
        trainer.check_resume()  # before anything in the run folder changes
    atomic_write_text(
        out_dir / "config.yaml",
        yaml.safe_dump(
            {**record, "data": {"spec": _spec(data), "images": len(ds)}, "teacher": teacher_rec},
            sort_keys=False,
        ),
    )
    metrics = trainer.fit(resume=resume)
    return metrics, out_dir
