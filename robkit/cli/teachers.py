"""``robkit teachers``: list, inspect, fetch and verify the teacher zoo."""

from __future__ import annotations

import time
from typing import Any

import click

from robkit.cli import clean_error


def _fmt(v: Any, spec: str = "") -> str:
    return "?" if v is None else format(v, spec)


@click.group("teachers")
def teachers() -> None:
    """The teacher zoo: official DINO, iBOT, MSN and SwAV checkpoints with their heads, DINOv2 and DINOv3
    backbones.
    """


@teachers.command("list")
@click.argument("pattern", default="*")
def list_cmd(pattern: str) -> None:
    """List catalog teachers whose name matches PATTERN (wildcards: dino_vit*, *rn50*)."""
    from robkit.teachers import catalog
    from robkit.teachers.download import cache_status

    reg = catalog()
    names = reg.names(pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")
    if not names:
        raise click.ClickException(
            f"no teacher matches {pattern!r}; `robkit teachers list` shows all {len(reg)}"
        )
    rows = [("name", "family", "arch", "params(M)", "GFLOPs", "prototypes", "cached")]
    for n in names:
        r = reg.get(n)
        rows.append(
            (
                n,
                r.family,
                str((r.get("arch") or {}).get("name", "?")),
                _fmt(r.get("params_m"), ".1f"),
                _fmt(r.get("gflops"), ".1f"),
                _fmt(r.get("num_prototypes")),
                cache_status(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    click.echo(
        f"\n{len(names)} teacher(s). params/GFLOPs: backbone at native resolution (GMACs). "
        "`robkit teachers info NAME` for details."
    )


@teachers.command("info")
@click.argument("name")
def info_cmd(name: str) -> None:
    """Everything the catalog knows about teacher NAME, and where its file is."""
    import yaml

    from robkit.catalog import CatalogError
    from robkit.teachers import catalog
    from robkit.teachers.download import cached_file, expected_sha256, is_file_only, obtain_hint, teachers_dir

    try:
        r = catalog().get(name)
    except CatalogError as e:
        raise clean_error(e) from None
    click.echo(yaml.safe_dump({"name": r.name, **r.fields}, sort_keys=False, width=100).rstrip())
    f = cached_file(r)
    sha, where = expected_sha256(r)
    click.echo(f"catalog file: {r.source}")
    if f is None and is_file_only(r):
        click.echo("cached: no; robkit cannot download this file (released behind a licence form)")
        click.echo(f"to use it: {obtain_hint(r)}")
    else:
        click.echo(
            f"cached: {f if f else 'no (will download to ' + str(teachers_dir() / r['file_name']) + ')'}"
        )
    click.echo(f"expected sha256: {sha or 'unknown'} ({where})")


@teachers.command("fetch")
@click.argument("name")
def fetch_cmd(name: str) -> None:
    """Download teacher NAME into the cache (no-op when cached)."""
    from robkit.catalog import CatalogError
    from robkit.teachers import catalog
    from robkit.teachers.download import DownloadError, resolve, sha256_file

    try:
        r = catalog().get(name)
        path = resolve(r)
    except (CatalogError, DownloadError) as e:
        raise clean_error(e) from None
    click.echo(f"{name}: {path}\nsha256: {sha256_file(path)}")
    click.echo(f"next: robkit teachers verify {name}")


@teachers.command("verify")
@click.argument("name_or_path")
@click.option(
    "--file",
    "file",
    type=click.Path(dir_okay=False),
    default=None,
    help="The weights for a catalog name or for timm:ARCH / torchvision:ARCH.",
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch", default=2, show_default=True, help="images in the test forward pass")
def verify_cmd(name_or_path: str, file: str | None, device: str, batch: int) -> None:
    """Check sha256, load, and run one forward pass on a random normalised image."""
    import torch

    from robkit.catalog import CatalogError
    from robkit.models.checkpoint import CheckpointError
    from robkit.teachers import load, resolve_file
    from robkit.teachers.download import DownloadError, expected_sha256, sha256_file
    from robkit.teachers.layouts import LayoutError
    from robkit.teachers.teacher import TeacherLoadError

    try:
        path, record = resolve_file(name_or_path, file=file)
        digest = sha256_file(path)
        if record is not None:
            expected, where = expected_sha256(record)
            status = (
                "no reference hash (recorded now)"
                if expected is None
                else (f"OK ({where})" if expected == digest else f"MISMATCH, expected {expected} ({where})")
            )
        else:
            status = "not a catalog teacher (nothing to compare)"
        click.echo(f"file:    {path}\nsha256:  {digest}  {status}")
        t0 = time.perf_counter()
        teacher = load(name_or_path, device=device, file=file)
        t_load = time.perf_counter() - t0
    except (
        CatalogError,
        DownloadError,
        CheckpointError,
        LayoutError,
        TeacherLoadError,
        FileNotFoundError,
    ) as e:
        raise clean_error(e) from None
    g = torch.Generator().manual_seed(0)
    img = torch.rand(batch, 3, teacher.resolution, teacher.resolution, generator=g)
    mean = torch.tensor(teacher.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.std).view(1, 3, 1, 1)
    x = ((img - mean) / std).to(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = teacher(x)
    t_fwd = time.perf_counter() - t0
    if getattr(teacher, "headless", False):  # a backbone without a head: features only
        finite = bool(torch.isfinite(out.features).all() and torch.isfinite(out.patch_features).all())
        click.echo(f"family:  {teacher.family} (no head: features, no logits)")
        click.echo(f"arch:    {teacher.arch}")
        click.echo(
            f"params:  {sum(q.numel() for q in teacher.parameters()) / 1e6:.1f} M   input {teacher.resolution}px  "
            f"mean {teacher.mean}  std {teacher.std}"
        )
        click.echo(f"features {tuple(out.features.shape)}  patch_features {tuple(out.patch_features.shape)}")
        click.echo(f"time:    load {t_load:.1f}s  forward {t_fwd * 1000:.0f} ms ({device})")
        if not finite:
            raise click.ClickException("non-finite outputs")
        click.echo("verify: OK")
        return
    p = torch.softmax(out.logits.float() / teacher.default_temperature, dim=-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()
    finite = bool(torch.isfinite(out.logits).all() and torch.isfinite(out.features).all())
    n_params = sum(q.numel() for q in teacher.parameters())
    click.echo(f"layout:  {teacher.layout}  (family {teacher.family})")
    click.echo(f"arch:    {teacher.arch}")
    click.echo(
        f"params:  {n_params / 1e6:.1f} M   input {teacher.resolution}px  mean {teacher.mean}  std {teacher.std}"
    )
    click.echo(
        f"features {tuple(out.features.shape)}  logits {tuple(out.logits.shape)}"
        + (f"  patch_logits {tuple(out.patch_logits.shape)}" if out.patch_logits is not None else "")
    )
    click.echo(
        f"logits:  min {out.logits.min().item():.4f}  max {out.logits.max().item():.4f}  "
        f"entropy@T={teacher.default_temperature} {entropy:.3f} nats (max {torch.log(torch.tensor(float(p.shape[-1]))).item():.3f})"
    )
    click.echo(f"time:    load {t_load:.1f}s  forward {t_fwd * 1000:.0f} ms ({device})")
    if not finite:
        raise click.ClickException("non-finite outputs")
    click.echo("verify: OK")


@teachers.command("cache")
@click.option(
    "--teacher",
    required=True,
    help="Zoo name, official checkpoint file, robkit checkpoint, or timm:ARCH / torchvision:ARCH.",
)
@click.option(
    "--teacher-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="The weights for a catalog name or for timm:ARCH / torchvision:ARCH.",
)
@click.option("--data", default="fashion-mnist", show_default=True, help="Data set, as for robkit distill.")
@click.option("--epochs", type=int, required=True, help="Epochs of targets to store (distill may use fewer).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Cache folder.")
@click.option("--student", default="mobilenet_v3_small", show_default=True, help="Picks the recipe variant.")
@click.option("--recipe", default="auto", show_default=True, help="As for robkit distill.")
@click.option("--batch-size", type=int, default=None, help="Global batch size of the distillation run.")
@click.option(
    "--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Recipe overrides, as for distill."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-limit", type=int, default=None, help="Use only the first N training images.")
@click.option(
    "--form",
    type=click.Choice(["embedding", "topk"]),
    default="embedding",
    show_default=True,
    help="embedding: backbone output, the head runs live (exact); topk: the k largest head logits.",
)
@click.option("--topk", "k", type=int, default=10, show_default=True, help="k for --form topk.")
@click.option(
    "--patches/--no-patches",
    default=None,
    help="Store iBOT patch targets (default: on for an iBOT teacher with a ViT student).",
)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--shard-steps", type=int, default=50, show_default=True, help="Steps per shard file.")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-shards", type=int, default=None, help="Stop after building N shards (resumable).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def cache_cmd(
    teacher: str,
    teacher_file: str | None,
    data: str,
    epochs: int,
    out: str,
    student: str,
    recipe: str,
    batch_size: int | None,
    sets: tuple[str, ...],
    seed: int,
    data_limit: int | None,
    form: str,
    k: int,
    patches: bool | None,
    dtype: str,
    shard_steps: int,
    device: str,
    max_shards: int | None,
    quiet: bool,
) -> None:
    """Pre-compute a teacher's RoB targets for `robkit distill --teacher-cache` (resumable; torchrun
    splits the shards over processes).
    """
    from robkit.catalog import CatalogError
    from robkit.engine.config import parse_overrides
    from robkit.engine.teacher_cache import CacheForm, build_cache

    ov = parse_overrides(list(sets))
    if batch_size is not None:
        ov.setdefault("train", {})["batch_size"] = batch_size
    try:
        summary = build_cache(
            teacher,
            out,
            epochs,
            data=data,
            student=student,
            recipe=recipe,
            overrides=ov,
            seed=seed,
            data_limit=data_limit,
            form=CacheForm(form, k, patches, dtype),
            shard_steps=shard_steps,
            device=device,
            progress=not quiet,
            max_shards=max_shards,
            teacher_file=teacher_file,
            echo=click.echo,
        )
    except (CatalogError, ValueError, FileNotFoundError) as e:
        raise clean_error(e) from None
    click.echo(
        f"cache {summary['key'][:12]} in {out}: built {summary['built']}, kept {summary['skipped']} "
        f"of {summary['shards']} shard(s); {'complete' if summary['complete'] else 'INCOMPLETE: rerun to finish'}"
    )
    same = [
        ("--student", student),
        ("--recipe", recipe if recipe != "auto" else None),
        ("--seed", seed or None),
    ]
    same += [("--batch-size", batch_size), ("--data-limit", data_limit)] + [("--set", s) for s in sets]
    click.echo(
        f"next: robkit distill --teacher {teacher}"
        + (f" --teacher-file {teacher_file}" if teacher_file else "")
        + f" --teacher-cache {out} --data {data} --epochs {epochs}"
        + "".join(f" {o} {v}" for o, v in same if v is not None)
    )
