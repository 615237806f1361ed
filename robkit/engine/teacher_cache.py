"""Cached teacher targets for RoB: pay for the frozen teacher once, not every epoch.

The teacher's output depends only on the image and on the global view's parameters, and the
engine draws both deterministically: the epoch's batches from ``(seed, epoch)``
(:func:`~robkit.engine.trainer.epoch_order`) and each step's view parameters from
``(seed, global step)`` (:func:`~robkit.engine.trainer.step_generator`, global crops first).
So :func:`build_cache` can replay every step the trainer will run and store, per step:

* ``image_index`` ``int32 [B]``: the batch (checked against the data order when replayed);
* the global crops' parameters (box, flip, colour-jitter factors/switch/order, grey-scale,
  blur sigma, solarisation): the augmentation itself, not only its seed, so the views that
  produced a target are re-rendered exactly even if the sampler's random stream changes;
* the teacher's output in compact form, crop-major ``[n_global·B, ...]`` (a headless teacher's
  "embedding" is its CLS token, with its patch tokens when the feature loss has a patch term):
  ``embedding`` (default): the backbone's output (what ``Teacher.head_forward`` consumes) in
  fp16, and the small frozen head runs live during distillation, so targets stay exact up to
  fp16 rounding while the expensive backbone is paid once (an idea written down in the
  project's design notes, not in a paper); ``topk``: the ``k`` largest head logits with their
  prototype indices, as FKD (Shen & Xing, ECCV 2022) and TinyViT (Wu et al., ECCV 2022) store
  soft labels; the loss's softmax then renormalises over those ``k`` prototypes.  iBOT patch
  targets (all tokens, or top-k per patch) are stored when a ViT student needs them.

Local crops need no teacher: in cached mode the trainer still draws every crop's parameters
from the step's generator (so the local views are exactly those of the online run) and only
swaps in the stored global-crop parameters.

Layout of a cache folder: ``manifest.json`` (the key and what it was built from) and one shard
per ``(epoch, run of shard_steps steps)``, ``eEEEEE-sSSSSSS.pt`` written atomically, with a
``.json`` side file holding its sha256.  The key is the sha256 of the teacher file's sha256,
the recipe's global-view settings, a data-set fingerprint, the seed and the batch size.  A
build skips finished shards (resume / extend to more epochs) and splits shards over
``torchrun`` processes (``RANK`` / ``WORLD_SIZE``; shards are independent, no process group).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from robkit.data.datasets import DataError, data_fingerprint
from robkit.data.views import CropParams, ViewParams
from robkit.engine.recipe import Recipe, RoBSpec
from robkit.engine.trainer import epoch_order
from robkit.teachers.teacher import Teacher, TeacherOutput
from robkit.utils.errors import RecipeError, RobkitError
from robkit.utils.files import atomic_save, atomic_write_json, safe_load, sha256_file, sha256_json

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: colour-jitter order stored per image (jitter_order [B, 4])
FORMS = ("embedding", "topk")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Sampler settings of the local crops: drawn live, so a cache is valid whatever they are.
LOCAL_VIEW_KEYS = ("n_local", "local_size_px", "local_scale", "local_blur_p", "local_solarize_p")
PARAM_FIELDS = ("boxes", "flip", "jitter", "jitter_on", "jitter_order", "gray", "blur_sigma", "solarize")


class CacheMismatch(RobkitError, ValueError):
    """A teacher-target cache does not belong to this teacher, recipe, data set or run."""


@dataclass(frozen=True)
class CacheForm:
    """What a cache stores: ``embedding`` or ``topk`` (``k`` logits), iBOT ``patches``, storage ``dtype``."""

    form: str = "embedding"
    k: int = 10
    patches: bool | None = None  # None: on for an iBOT teacher with a ViT student
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise RecipeError(f"cache form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.dtype not in DTYPES:
            raise RecipeError(f"cache dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.form == "topk" and self.k < 1:
            raise RecipeError(f"top-k needs k >= 1, got {self.k}")


# ------------------------------------------------------------------------------ identity


def recipe_fingerprint(cfg: Recipe) -> dict[str, Any]:
    """Everything of a resolved RoB recipe that the teacher's input depends on (plain JSON types)."""
    record = cfg.to_dict()
    views = {k: v for k, v in record["views"].items() if k not in LOCAL_VIEW_KEYS}
    return {"views": views, "teacher_resolution": (cfg.rob or RoBSpec()).teacher_resolution}


def _teacher_temperature(cfg: Recipe) -> float:
    """The temperature of the stored targets: the loss's teacher temperature (or SwAV's epsilon)."""
    loss = cfg.loss
    for name in ("teacher_temp", "epsilon"):
        value = getattr(loss, name, None)
        if value is not None:
            return float(value)
    return 0.07


def cache_key(teacher_sha256: str, recipe_fp: dict, data_fp: dict, seed: int, batch_size: int) -> str:
    """The cache key: sha256 of format, teacher sha256, recipe fingerprint, data sha256, seed, batch."""
    return sha256_json(
        {
            "format": CACHE_FORMAT,
            "teacher": teacher_sha256,
            "recipe": recipe_fp,
            "data": data_fp["sha256"],
            "seed": int(seed),
            "batch_size": int(batch_size),
        }
    )


# ------------------------------------------------------------------------------ views


def _load_batch(ds: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 [B, 3, S, S], valid_hw long [B, 2])`` as the trainer reads them."""
    if hasattr(ds, "images") and isinstance(ds.images, torch.Tensor):
        x = ds.images[idx]
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return x, torch.tensor([x.shape[-2], x.shape[-1]]).expand(len(idx), 2).long()
    imgs, hws = [], []
    for i in idx.tolist():
        if hasattr(ds, "get_with_hw"):
            img, _, hw = ds.get_with_hw(i)
        else:
            img, _ = ds[i]
            hw = img.shape[-2:]
        imgs.append(img)
        hws.append(list(hw))
    return torch.stack(imgs), torch.tensor(hws, dtype=torch.long)


def pack_params(crops: list[CropParams]) -> dict[str, torch.Tensor]:
    """Global crops' parameters stacked crop-major: ``boxes [n_g, B, 4]``, ``jitter_order [n_g, B, 4]``..."""
    return {f: torch.stack([getattr(c, f) for c in crops]) for f in PARAM_FIELDS}


def unpack_params(p: dict[str, torch.Tensor]) -> list[CropParams]:
    """Inverse of :func:`pack_params`: one ``CropParams`` per global crop."""
    n = p["boxes"].shape[0]
    return [CropParams(**{f: p[f][c] for f in PARAM_FIELDS}) for c in range(n)]


def _same(a: CropParams, b: CropParams) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in PARAM_FIELDS)


# ------------------------------------------------------------------------------ compact outputs


def compress(teacher: nn.Module, emb: torch.Tensor, form: CacheForm) -> dict[str, torch.Tensor]:
    """The stored form of a batch of teacher embeddings (``Teacher.embed`` output)."""
    dtype = DTYPES[form.dtype]
    if form.form == "embedding":
        kept = emb if (form.patches or emb.dim() == 2) else emb[:, 0]
        return {"embedding": kept.to(dtype)}
    out = cast(Teacher, teacher).head_forward(emb if form.patches else (emb[:, 0] if emb.dim() == 3 else emb))
    k = min(form.k, out.logits.shape[-1])
    v, i = out.logits.float().topk(k, dim=-1)
    res = {"topk_values": v.to(dtype), "topk_index": i.int()}
    if form.patches and out.patch_logits is not None:
        pv, pi = out.patch_logits.float().topk(min(form.k, out.patch_logits.shape[-1]), dim=-1)
        res |= {"patch_topk_values": pv.to(dtype), "patch_topk_index": pi.int()}
    return res


def _dense(values: torch.Tensor, index: torch.Tensor, k_total: int) -> torch.Tensor:
    # -inf outside the top-k: the loss's softmax renormalises over the stored prototypes.
    out = torch.full((*values.shape[:-1], k_total), float("-inf"), dtype=torch.float32, device=values.device)
    return out.scatter_(-1, index.long(), values.float())


def expand(teacher: nn.Module, stored: dict[str, torch.Tensor]) -> TeacherOutput:
    """Stored targets → the ``TeacherOutput`` the RoB task consumes (running the frozen head if needed)."""
    if "embedding" in stored:
        return cast(Teacher, teacher).head_forward(stored["embedding"].float())
    k_total = int(cast(Teacher, teacher).num_prototypes)
    logits = _dense(stored["topk_values"], stored["topk_index"], k_total)
    patch = None
    if "patch_topk_values" in stored:
        patch = _dense(stored["patch_topk_values"], stored["patch_topk_index"], k_total)
    return TeacherOutput(features=logits.new_zeros(logits.shape[0], 0), logits=logits, patch_logits=patch)


# ------------------------------------------------------------------------------ files


def _shard_name(epoch: int, first_step: int) -> str:
    return f"e{epoch:06d}-s{first_step:06d}.pt"


def shard_done(root: Path, key: str, epoch: int, first_step: int) -> bool:
    """A finished shard: its side file names this key and the file's sha256 matches."""
    shard = root / _shard_name(epoch, first_step)
    side = shard.with_suffix(".json")
    if not (shard.is_file() and side.is_file()):
        return False
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError:
        return False
    return meta.get("key") == key and meta.get("sha256") == sha256_file(shard)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The cache's ``manifest.json``; :class:`CacheMismatch` if ``root`` holds none."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise CacheMismatch(
            f"{root} is not a teacher-target cache (no manifest.json); build one with "
            "`robkit teachers cache --teacher NAME --data PATH --epochs E --out DIR`"
        )
    return json.loads(path.read_text())


def save_shard(root: Path, key: str, epoch: int, first_step: int, shard: dict[str, Any]) -> None:
    """Write ``shard`` atomically, then its ``.json`` side file (key, sha256, steps) that marks it done."""
    path = atomic_save(shard, root / _shard_name(epoch, first_step))
    atomic_write_json(
        path.with_suffix(".json"), {"key": key, "sha256": sha256_file(path), "steps": shard["steps"]}
    )


def load_shard(root: Path, key: str, epoch: int, first_step: int) -> dict[str, Any]:
    """A shard, verified (side-file sha256 and key) before it is unpickled weights-only."""
    path = root / _shard_name(epoch, first_step)
    if not shard_done(root, key, epoch, first_step):
        raise CacheMismatch(
            f"cache shard {path} is missing, incomplete or corrupt (sha256 or key differs from its .json); "
            f"rerun the same `robkit teachers cache` command to rebuild it"
        )
    return safe_load(path)


Echo = Callable[[str], None]


# ------------------------------------------------------------------------------ build


def _dist_rank_world() -> tuple[int, int]:
    # torchrun's environment; shards are independent, so no process group is needed.
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_cache(
    teacher: str,
    out: str | os.PathLike,
    epochs: int,
    data: Any = "fashion-mnist",
    student: str = "mobilenet_v3_small",
    recipe: str = "auto",
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    data_limit: int | None = None,
    form: CacheForm | None = None,
    shard_steps: int = 50,
    device: str = "auto",
    progress: bool = True,
    max_shards: int | None = None,
    teacher_obj: nn.Module | None = None,
    teacher_file: str | Path | None = None,
    echo: Echo = log.info,
) -> dict[str, Any]:
    """Compute and store the teacher targets of ``epochs`` epochs of ``robkit distill`` with the same
    teacher, student, recipe, overrides, data, data limit and seed.  Returns a summary.

    ``form.patches=None`` turns patch targets on for an iBOT teacher with a ViT student (RoB-iBOT's masked
    patch term).  ``max_shards`` stops after that many new shards (budgeted or test runs).
    """
    from tqdm import tqdm

    from robkit import teachers as zoo
    from robkit.engine.build import (
        _dataset,
        build_views,
        resolve_run_config,
        teacher_head_family,
        teacher_resolution,
    )
    from robkit.engine.hardware import autocast_dtype, resolve_precision, resolve_teacher_precision
    from robkit.engine.tasks.rob import teacher_input
    from robkit.engine.trainer import step_generator
    from robkit.models.students import STUDENTS

    loaded = teacher_obj if teacher_obj is not None else zoo.load(teacher, file=teacher_file)
    family = teacher_head_family(loaded)  # "features" for a headless teacher
    tch = cast(Teacher, loaded)
    ds = _dataset(data, data_limit)
    cfg = resolve_run_config("rob", student, recipe, overrides, ds, family)
    form = form or CacheForm()
    if form.patches is None:
        if family == "features":  # patch tokens when the feature loss has a patch term
            patches = float(getattr(cfg.loss, "patch_weight", None) or 0.0) > 0
        else:  # iBOT patch logits for a masked ViT student
            patches = family == "ibot" and STUDENTS[student].kind == "vit"
        form = dataclasses.replace(form, patches=patches)
    if form.form == "topk" and family == "features":
        raise RecipeError(
            f"teacher {getattr(tch, 'name', teacher)!r} has no head, so there are no logits to keep the top-k "
            "of; cache its features with --form embedding"
        )
    if form.form == "topk" and getattr(cfg.loss, "sinkhorn_iterations", None):
        raise RecipeError(
            "top-k targets cannot feed Sinkhorn-Knopp (zero columns); cache the embedding "
            "(--form embedding) or use loss.sinkhorn_iterations=0"
        )
    views = build_views(cfg.views)
    n_g, batch = views.n_global, cfg.train.batch_size
    steps = len(ds) // batch
    if steps == 0:
        raise DataError(
            f"the data set has {len(ds)} images, fewer than one batch of {batch}; lower --batch-size"
        )
    res = teacher_resolution((cfg.rob or RoBSpec()).teacher_resolution, cfg.views)
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    # The teacher runs at rob.teacher_precision (auto: bf16 on CUDA, else the run's precision).
    amp = autocast_dtype(
        resolve_teacher_precision(
            (cfg.rob or RoBSpec()).teacher_precision, dev, resolve_precision(cfg.train.precision, dev)
        )
    )
    tch.to(dev)

    recipe_fp, data_fp = recipe_fingerprint(cfg), data_fingerprint(ds)
    key = cache_key(str(tch.sha256), recipe_fp, data_fp, seed, batch)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": CACHE_FORMAT,
        "key": key,
        "teacher": {"name": getattr(tch, "name", str(teacher)), "sha256": tch.sha256, "family": family},
        "recipe": {"name": cfg.name, **recipe_fp},
        "data": data_fp,
        "seed": int(seed),
        "batch_size": batch,
        "steps_per_epoch": steps,
        "shard_steps": int(shard_steps),
        "n_global": n_g,
        "form": form.__dict__,
        "teacher_temperature": _teacher_temperature(cfg),
        "precision": str(amp or "fp32"),
    }
    if (root / "manifest.json").is_file():
        old = read_manifest(root)
        if old.get("key") != key or old.get("form") != manifest["form"] or old["shard_steps"] != shard_steps:
            raise CacheMismatch(
                f"{root} holds another cache (key {str(old.get('key'))[:12]}, form {old.get('form')}, "
                f"shard_steps {old.get('shard_steps')}); this one would be key {key[:12]}, form "
                f"{manifest['form']}, shard_steps {shard_steps}. Choose another --out."
            )
        manifest["epochs"] = max(int(old.get("epochs", 0)), epochs)
    else:
        manifest["epochs"] = epochs
    rank, world = _dist_rank_world()
    if rank == 0:
        atomic_write_json(root / "manifest.json", manifest)

    units = [(e, s) for e in range(epochs) for s in range(0, steps, shard_steps)]
    mine = [u for i, u in enumerate(units) if i % world == rank]
    todo = [u for u in mine if not shard_done(root, key, *u)]
    # The size estimate: one teacher forward on a dummy view gives the stored shape.
    with torch.inference_mode():
        probe = tch.embed(torch.zeros(1, 3, res or tch.resolution, res or tch.resolution, device=dev))
        per_view = compress(tch, probe, form)
    view_bytes = sum(t.numel() * t.element_size() for t in per_view.values()) + 45
    total = view_bytes * n_g * batch * steps * epochs
    echo(
        f"teacher-target cache {key[:12]}: {epochs} epoch(s) x {steps} steps x {batch} images x {n_g} "
        f"global views, {form.form}{f' k={form.k}' if form.form == 'topk' else ''} {form.dtype}"
        f"{' +patches' if form.patches else ''}: ~{total / 2**20:.1f} MiB in {len(units)} shard(s); "
        f"this process: {len(todo)} to build, {len(mine) - len(todo)} already done"
    )
    bar = tqdm(
        total=sum(min(shard_steps, steps - s) for _, s in todo) * batch,
        unit="img",
        unit_scale=True,
        disable=not progress,
        desc=f"cache {tch.name}",
    )
    built = 0
    for epoch, s0 in todo:
        if max_shards is not None and built >= max_shards:
            break
        order = epoch_order(seed, epoch, len(ds), batch)
        rows = range(s0, min(s0 + shard_steps, steps))
        idx_all, params_all, outs = [], [], []
        for step in rows:
            idx = order[step]
            imgs, hw = _load_batch(ds, idx)
            g = step_generator(seed, epoch * steps + step)
            params = views.sample(hw, g, crops=range(n_g))  # the trainer draws globals first
            with torch.inference_mode():
                # rendered on the teacher's device, as the trainer renders the replayed views
                x = teacher_input(views.render(imgs.to(dev), params), views.mean, views.std, tch, res)
                ctx = (
                    torch.autocast(dev.type, dtype=amp)
                    if amp is not None
                    else torch.autocast(dev.type, enabled=False)
                )
                with ctx:
                    emb = tch.embed(x)
                outs.append({k: v.cpu() for k, v in compress(tch, emb.float(), form).items()})
            idx_all.append(idx.int())
            params_all.append(pack_params(params.crops))
            bar.update(batch)
        shard = {
            "key": key,
            "epoch": epoch,
            "first_step": s0,
            "steps": len(rows),
            "image_index": torch.stack(idx_all),
            "params": {f: torch.stack([p[f] for p in params_all]) for f in PARAM_FIELDS},
            "targets": {k: torch.stack([o[k] for o in outs]) for k in outs[0]},
        }
        save_shard(root, key, epoch, s0, shard)
        built += 1
    bar.close()
    complete = all(shard_done(root, key, *u) for u in units)
    return {
        "key": key,
        "out": str(root),
        "built": built,
        "skipped": len(mine) - len(todo),
        "shards": len(units),
        "complete": complete,
        "estimated_bytes": total,
    }


# ------------------------------------------------------------------------------ use


class _DroppedBackbone(nn.Module):
    """Stands in for a teacher backbone in cached mode: its cost was paid when the cache was built."""

    def forward(self, *_: Any) -> torch.Tensor:
        raise RuntimeError(
            "the teacher backbone is not loaded in cached mode (robkit distill --teacher-cache)"
        )


class CachedTargets:
    """Per-step global-view parameters and teacher outputs read from a verified cache (trainer hook)."""

    def __init__(
        self, root: Path, manifest: dict[str, Any], teacher: nn.Module, seed: int, n_images: int
    ) -> None:
        self.root, self.manifest, self.teacher = root, manifest, teacher
        self.key, self.n_global = manifest["key"], int(manifest["n_global"])
        self.batch, self.shard_steps = int(manifest["batch_size"]), int(manifest["shard_steps"])
        self.seed, self.n_images = seed, n_images
        self._loaded: tuple[int, int] | None = None
        self._shard: dict[str, Any] = {}
        self._warned = False

    def _get(self, epoch: int, step: int) -> tuple[dict[str, Any], int]:
        s0 = step - step % self.shard_steps
        if self._loaded != (epoch, s0):
            shard = load_shard(self.root, self.key, epoch, s0)
            order = epoch_order(self.seed, epoch, self.n_images, self.batch)[s0 : s0 + shard["steps"]]
            if not torch.equal(order.int(), shard["image_index"]):
                raise CacheMismatch(
                    f"cache shard epoch {epoch} step {s0} was built for another image order; the data set "
                    "or the seed differs from the build. Rebuild the cache for this run."
                )
            self._shard, self._loaded = shard, (epoch, s0)
        return self._shard, step - s0

    def replay_views(self, epoch: int, step: int, params: ViewParams) -> None:
        """Swap the stored global-crop parameters into the step's freshly drawn ``params`` (all rows)."""
        shard, i = self._get(epoch, step)
        stored = unpack_params({f: v[i] for f, v in shard["params"].items()})
        if not self._warned and not all(_same(a, b) for a, b in zip(stored, params.crops)):
            # Exactness still holds (the stored views are rendered); only the random stream moved.
            log.warning("the view sampler draws other global crops than when the cache was built")
            self._warned = True
        params.crops[: self.n_global] = stored

    def targets(self, epoch: int, step: int, rows: torch.Tensor, device: torch.device) -> TeacherOutput:
        """Teacher outputs of this process's ``rows`` of the global batch, crop-major."""
        shard, i = self._get(epoch, step)
        sel = torch.cat([c * self.batch + rows for c in range(self.n_global)])
        stored = {k: v[i][sel].to(device) for k, v in shard["targets"].items()}
        self.teacher.to(device)  # the head only (the backbone was dropped); a no-op after the first step
        with torch.inference_mode():
            return expand(self.teacher, stored)


def open_cache(
    root: str | os.PathLike,
    teacher: nn.Module,
    cfg: Recipe,
    ds: Any,
    seed: int,
    needs_patches: bool = False,
) -> CachedTargets:
    """Verify that the cache at ``root`` serves this run, drop the teacher's backbone, return the hook.

    Refused (``CacheMismatch``): another teacher file, other global-view settings, another data set,
    seed or batch size, fewer epochs than ``cfg.train.epochs``, missing or corrupt shards.
    """
    root = Path(root)
    m = read_manifest(root)
    batch, epochs = cfg.train.batch_size, cfg.train.epochs
    rebuild = "rebuild it with `robkit teachers cache` and the same --teacher/--data/--recipe/--set/--seed"
    checks = [
        ("cache format", m.get("format"), CACHE_FORMAT),
        ("teacher sha256", m["teacher"]["sha256"], teacher.sha256),
        (
            "recipe global views",
            {"views": m["recipe"]["views"], "teacher_resolution": m["recipe"]["teacher_resolution"]},
            json.loads(json.dumps(recipe_fingerprint(cfg))),
        ),
        ("data set", m["data"], data_fingerprint(ds)),
        ("seed", m["seed"], int(seed)),
        ("batch size", m["batch_size"], batch),
    ]
    for what, cached, now in checks:
        if cached != now:
            raise CacheMismatch(
                f"teacher cache {root} was built for another {what}: cache {cached}, this run {now}; {rebuild}"
            )
    spe = len(ds) // batch
    missing = [
        (e, s)
        for e in range(epochs)
        for s in range(0, spe, int(m["shard_steps"]))
        if not shard_done(root, m["key"], e, s)
    ]
    if missing:
        have = min(e for e, _ in missing)
        raise CacheMismatch(
            f"teacher cache {root} has {have} complete epoch(s) (first missing shard: epoch {missing[0][0]} "
            f"step {missing[0][1]}); the run asks for {epochs}. Extend it: rerun `robkit teachers cache` "
            f"with --epochs {epochs} and --out {root} (finished shards are kept), or distil fewer epochs."
        )
    if needs_patches and not m["form"]["patches"]:
        raise CacheMismatch(
            f"teacher cache {root} holds no patch targets, which this run's loss needs (iBOT's masked-patch term "
            "or the feature loss's patch term); rebuild it with --patches"
        )
    teacher.backbone = _DroppedBackbone()
    return CachedTargets(root, m, teacher, seed, len(ds))
