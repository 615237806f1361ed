"""A resolved recipe as frozen, typed sections: what the engine runs.

:func:`parse_recipe` turns a merged recipe record (``robkit.engine.config.load_recipe`` plus ``--set``
overrides) into a :class:`Recipe`. Every section is closed: an unknown key anywhere is a
:class:`~robkit.utils.errors.RecipeError` naming the field, the closest known one and the fields that
section takes; a value of the wrong kind (``optim.base_lr=fast``) is refused the same way. The loss
section is typed by the method (:class:`DINOLossSpec`, :class:`SwAVLossSpec`, :class:`MoCoLossSpec`,
:class:`RoBLossSpec`); its defaults are those of the objective it configures, which a test checks
against the objectives' signatures. The views section is :class:`~robkit.data.views.MultiCropViews`
itself. :meth:`Recipe.to_dict` gives the plain record stored in checkpoints and ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from robkit.data.views import MultiCropViews
from robkit.utils.errors import RecipeError
from robkit.utils.suggest import did_you_mean

# MultiCropViews fields a recipe does not set: the normalisation comes from the data, not the recipe.
_VIEW_INTERNAL = ("mean", "std", "_tries")


@dataclass(frozen=True)
class HeadSpec:
    """The projection head. ``type`` names the head class (pre-training: fixed by the method; RoB:
    ``teacher`` for the teacher's kind or ``mlp`` for Table 6's MLP head); unset fields keep the
    head's own defaults.
    """

    type: str | None = None
    out_dim: int | None = None
    hidden_dim: int | None = None
    bottleneck_dim: int | None = None
    nlayers: int | None = None
    use_bn: bool | None = None
    norm_last_layer: bool | None = None
    n_prototypes: int | None = None
    act: str | None = None

    def options(self) -> dict[str, Any]:
        """The fields the recipe sets, ``type`` excluded, as keyword arguments of the head."""
        return {k: v for k, v in _items(self) if v is not None and k != "type"}


@dataclass(frozen=True)
class DINOLossSpec:
    """Keywords of :class:`robkit.objectives.dino.DINOLoss` (its defaults)."""

    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    center_momentum: float = 0.9
    alpha: float | None = None
    global_only: bool = False


@dataclass(frozen=True)
class SwAVLossSpec:
    """Keywords of :class:`robkit.objectives.swav.SwAVLoss` (its defaults)."""

    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    crops_for_assign: tuple[int, ...] = (0, 1)
    alpha: float | None = None
    queue_length: int = 0
    queue_start_epoch: int = 15


@dataclass(frozen=True)
class MoCoLossSpec:
    """Keywords of :class:`robkit.objectives.mocov2.MoCoV2Loss` (its defaults)."""

    queue_size: int = 65536
    temperature: float = 0.2
    alpha: float | None = None
    global_only: bool = False


@dataclass(frozen=True)
class RoBLossSpec:
    """Keywords of the RoB loss of the teacher's family (``robkit.objectives.rob.build_rob_loss``).

    The four families, and feature distillation for a headless teacher, take different keywords; unset
    fields keep that loss's defaults, and a field the family's loss does not take is refused when the
    task is built.
    """

    student_temp: float | None = None
    teacher_temp: float | None = None
    teacher_patch_temp: float | None = None
    lambda1: float | None = None
    lambda2: float | None = None
    epsilon: float | None = None
    sinkhorn_iterations: int | None = None
    cross_view: bool | None = None
    normalization: str | None = None
    patch_normalization: str | None = None
    distance: str | None = None  # feature distillation (headless teachers): cosine | mse | smooth_l1
    patch_weight: float | None = None
    beta: float | None = None
    center_momentum: float | None = None  # feature distillation: EMA centering of the teacher's CLS

    def options(self) -> dict[str, Any]:
        """The fields the recipe sets, as keyword arguments of the family's loss."""
        return {k: v for k, v in _items(self) if v is not None}


LossSpec = DINOLossSpec | SwAVLossSpec | MoCoLossSpec | RoBLossSpec
LOSS_SPECS: dict[str, type] = {
    "dino": DINOLossSpec,
    "swav": SwAVLossSpec,
    "mocov2": MoCoLossSpec,
    "rob": RoBLossSpec,
}


@dataclass(frozen=True)
class OptimSpec:
    """Optimiser and learning-rate schedule. ``base_lr``, ``min_lr`` and ``start_warmup_lr`` are per 256
    images (``min_lr`` unscaled unless ``min_lr_batch`` is set); warm-ups and freezes are in epochs.
    """

    name: str
    base_lr: float
    min_lr: float = 0.0
    min_lr_batch: int | None = None
    warmup_epochs: float = 0.0
    start_warmup_lr: float = 0.0
    weight_decay: float = 0.0
    weight_decay_end: float | None = None
    momentum: float = 0.9
    nesterov: bool | None = None  # SGD only; unset is plain heavy-ball momentum
    trust_coefficient: float | None = None
    exclude_depthwise_from_lars: bool = True
    clip_grad: float = 0.0
    freeze_last_layer_epochs: float = 1
    freeze_prototypes_epochs: float = 1

    @property
    def final_weight_decay(self) -> float:
        """The weight decay the cosine schedule ends at (``weight_decay`` when unset)."""
        return self.weight_decay if self.weight_decay_end is None else self.weight_decay_end


@dataclass(frozen=True)
class EMASpec:
    """Momentum of the EMA teacher (DINO: cosine ``momentum`` → ``momentum_end``) and of MoCo's key
    encoder (``key_momentum``).
    """

    momentum: float = 0.0
    momentum_end: float | None = None
    key_momentum: float = 0.999

    @property
    def final_momentum(self) -> float:
        """The momentum the cosine schedule ends at (``momentum`` when unset)."""
        return self.momentum if self.momentum_end is None else self.momentum_end


@dataclass(frozen=True)
class TrainSpec:
    """Length and batch of the run, and the engine settings a recipe need not state."""

    epochs: int
    batch_size: int
    drop_path: float = 0.0
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False


@dataclass(frozen=True)
class RoBSpec:
    """Distillation settings: the teacher's input resolution (``native``, ``student`` or pixels), its
    precision (``auto``: bf16 on CUDA, else the engine's; ``fp32``, ``bf16``, ``fp16``), whether it
    runs through ``torch.compile``, iBOT masking and MSN patch drop.
    """

    teacher_resolution: str | int = "native"
    teacher_precision: str = "auto"
    teacher_compile: bool = False
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)
    mask_p_zero: float = 0.5
    patch_drop: float = 0.0


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe: the papers' settings (or ours), with every section typed and closed."""

    name: str
    method: str
    views: MultiCropViews
    loss: LossSpec
    head: HeadSpec
    optim: OptimSpec
    train: TrainSpec
    ema: EMASpec = field(default_factory=EMASpec)
    rob: RoBSpec | None = None
    family: str | None = None  # the catalog file the record comes from (dino, swav, mocov2, rob)
    student_kind: str | None = None
    teacher_family: str | None = None
    description: str = ""
    source: str = ""

    @property
    def is_distillation(self) -> bool:
        """Whether this is a RoB recipe (a frozen teacher replaces one branch)."""
        return self.method == "rob"

    def to_dict(self) -> dict[str, Any]:
        """The plain record (YAML/JSON types): what checkpoints and ``config.yaml`` store."""
        out: dict[str, Any] = {}
        for k, v in _items(self):
            if v is None:
                continue
            if isinstance(v, MultiCropViews):
                out[k] = {n: _plain(x) for n, x in _items(v) if n not in _VIEW_INTERNAL}
            elif dataclasses.is_dataclass(v):
                out[k] = {n: _plain(x) for n, x in _items(v) if x is not None}
            else:
                out[k] = v
        return out


SECTION_TYPES: dict[str, type] = {
    "head": HeadSpec,
    "optim": OptimSpec,
    "ema": EMASpec,
    "train": TrainSpec,
    "rob": RoBSpec,
}
SECTIONS = ("views", "loss", "head", "optim", "ema", "train", "rob")
_TOP = ("name", "method", "family", "student_kind", "teacher_family", "description", "source")


def method_of(record: dict[str, Any]) -> str:
    """A record's method key: ``dino``, ``swav``, ``mocov2`` or ``rob`` (every ``rob-*`` method)."""
    method = str(record.get("method", ""))
    return "rob" if method.startswith("rob") else method


def parse_recipe(record: dict[str, Any]) -> Recipe:
    """The typed :class:`Recipe` of a merged record; unknown keys and mistyped values are errors."""
    name = str(record.get("name", "?"))
    method = method_of(record)
    if method not in LOSS_SPECS:
        raise RecipeError(
            f"recipe {name!r}: unknown method {record.get('method')!r}; expected one of {', '.join(LOSS_SPECS)}"
        )
    known = _TOP + SECTIONS
    for k in record:
        if k not in known:
            raise RecipeError(
                f"recipe {name!r}: unknown field {k!r}.{did_you_mean(k, known)} Fields: {', '.join(known)}"
            )
    missing = [s for s in ("views", "loss", "head", "optim", "train") if s not in record]
    if missing:
        raise RecipeError(f"recipe {name!r} lacks the section(s) {', '.join(missing)}")
    if "rob" in record and method != "rob":
        raise RecipeError(
            f"section 'rob' applies to distillation recipes only; {name!r} is a pre-training recipe "
            "(use `robkit distill` for RoB)"
        )
    views_fields = [f.name for f in dataclasses.fields(MultiCropViews) if f.name not in _VIEW_INTERNAL]
    views = _section(MultiCropViews, "views", record["views"], views_fields)
    sections = {s: _section(cls, s, record[s]) for s, cls in SECTION_TYPES.items() if s in record}
    if method == "rob":
        sections.setdefault("rob", RoBSpec())
    return Recipe(
        name=name,
        method=method,
        views=views,
        loss=_section(LOSS_SPECS[method], "loss", record["loss"]),
        family=record.get("family"),
        student_kind=record.get("student_kind"),
        teacher_family=record.get("teacher_family"),
        description=str(record.get("description", "")),
        source=str(record.get("source", "")),
        **sections,
    )


# ------------------------------------------------------------------------------ parsing


def _items(obj: Any) -> list[tuple[str, Any]]:
    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _section(cls: type, path: str, values: Any, fields: list[str] | None = None) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"recipe section {path!r} must be a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = fields if fields is not None else [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise RecipeError(
                f"unknown recipe field '{path}.{k}'.{did_you_mean(k, names)} Fields here: {', '.join(sorted(names))}"
            )
        kwargs[k] = _coerce(f"{path}.{k}", v, hints[k])
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if required:
        raise RecipeError(f"recipe section {path!r} lacks {', '.join(required)}")
    return cls(**kwargs)


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """``value`` checked against (and lists turned into tuples for) the field's type ``hint``."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    for opt in options:
        ok, out = _fits(value, opt)
        if ok:
            return out
    kinds = " or ".join(_kind(o) for o in options)
    raise RecipeError(f"recipe field {path!r} must be {kinds}, got {value!r}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _fits(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(hint)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            return False, value
        out = []
        for item, t in zip(value, item_types, strict=True):
            ok, x = _fits(item, t)
            if not ok:
                return False, value
            out.append(x)
        return True, tuple(out)
    return isinstance(value, hint), value


def _kind(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_kind(args[0])}s"
        return f"a list of {len(args)} {' / '.join(sorted({_kind(a) for a in args}))}s"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )
