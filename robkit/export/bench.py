"""Latency of exported files (and PyTorch eager) on this machine, measured fairly.

Method (the one that gave p90/median ≤ 1.13 on a shared 2-core VM): build every runner first,
warm each up, then run rounds in which every runner is called once in a freshly shuffled order
with a short sleep before each call (so worker threads of the previous runtime stop spinning),
and report median and p90 per runner.  Interleaving makes machine noise hit all runners alike;
numbers from separate runs should not be compared.  Throughput is put against the machine's
measured sgemm peak (cached), using MACs counted by ``torch.utils.flop_counter`` (which, unlike
module hooks, sees the attention matmuls).  Phones and Apple devices cannot be reached from
here: their numbers come from the official on-device tools and are merged with ``--merge``.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from robkit.export import card as cards
from robkit.export.filemodel import ExportError
from robkit.utils.constants import imagenet_normalization
from robkit.utils.files import atomic_write_json
from robkit.utils.machine import best_seconds, cpu_name


@dataclass
class BenchRow:
    """One row of the latency table: a file or model at one thread count, with its figures."""

    name: str
    runtime: str
    precision: str
    threads: int | None
    median_ms: float | None
    p90_ms: float | None
    size_mb: float | None = None
    macs_g: float | None = None
    gflops: float | None = None
    peak_fraction: float | None = None
    parity_cosine: float | None = None
    source: str = "this machine"
    note: str = ""


@dataclass
class Runner:
    """A timed callable (one forward) with what the table reports about it; ``times`` in seconds."""

    name: str
    runtime: str
    precision: str
    threads: int | None
    call: Callable[[], Any]
    size_mb: float | None = None
    macs_g: float | None = None
    parity_cosine: float | None = None
    times: list[float] = field(default_factory=list)


def _sgemm_seconds_onnxruntime(n: int, threads: int, repeats: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    spec = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {k: np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) for k in "ab"}
    return best_seconds(lambda: sess.run(None, feed), repeats)


def _sgemm_seconds_torch(n: int, threads: int, repeats: int) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        return best_seconds(lambda: torch.mm(a, b), repeats)
    finally:
        torch.set_num_threads(old)


def measure_peak(threads: int, cache: Path | None = None, refresh: bool = False) -> float:
    """Measured fp32 sgemm GFLOP/s at ``threads`` (best of 10, n=2048), cached per CPU and count.

    The probe is onnxruntime's MLAS MatMul, the GEMM the mobile/ONNX runtimes' own kernels are
    comparable with; PyTorch's ``torch.mm`` is the fallback.  (PyTorch's MKL is not used when
    onnxruntime is there: on AMD CPUs it takes a slower code path and reads about half the
    peak, so runtimes appeared to run above 100 % of it.)  ``refresh`` re-measures (a value
    cached while other work loaded the machine is too low).
    """
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "robkit" / "peak.json"
    try:
        import onnxruntime  # noqa: F401

        probe, seconds = "mlas", _sgemm_seconds_onnxruntime
    except ImportError:
        probe, seconds = "torch", _sgemm_seconds_torch
    key = f"{cpu_name()}|{os.cpu_count()}|{threads}|{probe}"
    data = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in data and not refresh:
        return float(data[key])
    n = 2048
    data[key] = round(2 * n**3 / seconds(n, threads, 10) / 1e9, 1)
    atomic_write_json(cache, data, indent=1)
    return float(data[key])


def count_macs(module: torch.nn.Module, x: torch.Tensor) -> float:
    """GMACs of one forward (FLOPs / 2 from aten-level counting)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(x)
    return fc.get_total_flops() / 2 / 1e9


def sample_input(card: dict[str, Any]) -> np.ndarray:
    """One real Fashion-MNIST test image in the file's input format (shape, layout, dtype)."""
    from robkit.export.images import load_images
    from robkit.export.targets import ExportTarget
    from robkit.export.wrappers import make_inputs

    spec = card["input"]
    t = ExportTarget(
        name="bench",
        format=card.get("format", "onnx"),
        layout=spec["layout"],
        input_dtype="uint8" if spec["dtype"] == "uint8" else "float32",
        input="image" if spec["dtype"].startswith("image") or spec.get("range") == "0-1" else "tensor",
    )
    u8, _ = load_images("fashion-mnist", "test", 1, int(spec["resolution"]))
    norm = card.get("normalization") or imagenet_normalization()
    return make_inputs(u8, t, norm["mean"], norm["std"]).numpy()


def file_runner(path: Path, threads: int) -> Runner:
    """A runner for an exported file at ``threads`` threads (card next to it required)."""
    card = cards.read_card(path)
    if card is None:
        raise ExportError(f"{path} has no card {cards.card_path(path).name}; export it with `robkit export`")
    x = sample_input(card)
    size = cards.file_bytes(path) / 1e6
    from robkit.export.filemodel import open_runner

    r, runtime = open_runner(path, card, threads)
    parity = (card.get("parity") or {}).get("cosine")
    return Runner(
        f"{path.name}",
        runtime,
        card.get("precision", "?"),
        threads,
        lambda: r(x),
        size_mb=size,
        parity_cosine=parity,
    )


def torch_runner(
    module: torch.nn.Module, x: torch.Tensor, threads: int, name: str = "pytorch eager"
) -> Runner:
    """A runner for ``module(x)`` in PyTorch eager at ``threads`` threads (parity 1 by definition)."""

    def call() -> None:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            module(x)

    return Runner(name, "torch eager", "fp32", threads, call, parity_cosine=1.0)


def run_interleaved(
    runners: list[Runner], rounds: int = 50, warmup: int = 5, sleep_s: float = 0.004, seed: int = 0
) -> None:
    """Fill ``runner.times`` (seconds): warm-up, then shuffled rounds with a pause before each call."""
    for r in runners:
        for _ in range(warmup):
            r.call()
    rng = random.Random(seed)
    order = list(runners)
    for _ in range(rounds):
        rng.shuffle(order)
        for r in order:
            time.sleep(sleep_s)
            t = time.perf_counter()
            r.call()
            r.times.append(time.perf_counter() - t)


def rows_from(runners: list[Runner], peaks: dict[int, float]) -> list[BenchRow]:
    """Table rows from timed runners: median and p90 in ms, GFLOP/s and the fraction of ``peaks``."""
    rows = []
    for r in runners:
        med = statistics.median(r.times) * 1e3
        p90 = float(np.percentile(r.times, 90)) * 1e3
        gflops = 2 * r.macs_g / (med / 1e3) if r.macs_g else None
        peak = peaks.get(r.threads or 1)
        rows.append(
            BenchRow(
                r.name,
                r.runtime,
                r.precision,
                r.threads,
                round(med, 3),
                round(p90, 3),
                round(r.size_mb, 2) if r.size_mb else None,
                round(r.macs_g, 3) if r.macs_g else None,
                round(gflops, 1) if gflops else None,
                round(gflops / peak, 3) if gflops and peak else None,
                r.parity_cosine,
            )
        )
    return rows


_TFLITE_AVG = re.compile(r"Inference \(avg\):\s*([\d.e+]+)")
_TFLITE_GRAPH = re.compile(r"Graph:\s*\[([^\]]+)\]")
_TFLITE_THREADS = re.compile(r"#?\s*threads?[^:]*:\s*\[?(\d+)")


def parse_merge(path: str | os.PathLike) -> list[BenchRow]:
    """Rows from an on-device benchmark: TFLite ``benchmark_model`` text output, or JSON rows
    (a list of objects with ``name`` and ``median_ms``, or robkit's own bench JSON).
    """
    path = Path(path)
    text = path.read_text()
    if text.lstrip().startswith(("{", "[")):
        doc = json.loads(text)
        items = doc.get("rows", doc) if isinstance(doc, dict) else doc
        out = []
        for it in items:
            fields = {k: it.get(k) for k in BenchRow.__dataclass_fields__ if k in it}
            fields.setdefault("runtime", it.get("runtime", "device"))
            fields.setdefault("precision", it.get("precision", "?"))
            fields.setdefault("threads", it.get("threads"))
            fields.setdefault("median_ms", it.get("median_ms", it.get("avg_ms")))
            fields.setdefault("p90_ms", it.get("p90_ms"))
            fields["source"] = it.get("source") or f"merged: {path.name}"
            out.append(BenchRow(**fields))
        return out
    avg = _TFLITE_AVG.findall(text)
    if not avg:
        raise ValueError(
            f"{path}: no 'Inference (avg): <us>' line; expected TFLite benchmark_model output or JSON"
        )
    graph = _TFLITE_GRAPH.search(text)
    threads = _TFLITE_THREADS.search(text)
    return [
        BenchRow(
            Path(graph.group(1)).name if graph else path.stem,
            "tflite benchmark_model",
            "?",
            int(threads.group(1)) if threads else None,
            round(float(avg[-1]) / 1e3, 3),
            None,
            source=f"on-device: {path.name}",
            note="mean (benchmark_model reports avg, not median)",
        )
    ]


def format_table(rows: list[BenchRow], peaks: dict[int, float]) -> str:
    """The rows as an aligned text table, with the measured peaks on the last line."""
    head = [
        "file / model",
        "runtime",
        "prec",
        "thr",
        "median ms",
        "p90 ms",
        "MB",
        "GMACs",
        "GFLOP/s",
        "% peak",
        "parity cos",
        "source",
    ]
    lines = []
    for r in rows:
        lines.append(
            [
                r.name,
                r.runtime,
                r.precision,
                str(r.threads or "-"),
                _f(r.median_ms),
                _f(r.p90_ms),
                _f(r.size_mb),
                _f(r.macs_g),
                _f(r.gflops, 0),
                _f(100 * r.peak_fraction if r.peak_fraction else None, 0),
                _f(r.parity_cosine, 4),
                r.source,
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines]
    out.append(
        "peak (measured fp32 sgemm): "
        + ", ".join(f"{p:.0f} GFLOP/s at {t} thread(s)" for t, p in sorted(peaks.items()))
    )
    return "\n".join(out)


def _f(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def write_json(path: str | os.PathLike, rows: list[BenchRow], peaks: dict[int, float], meta: dict) -> None:
    """Write the rows, the machine (CPU, cores, peaks) and ``meta`` to ``path`` as JSON."""
    Path(path).write_text(
        json.dumps(
            {
                "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "peak_gflops": peaks},
                **meta,
                "rows": [asdict(r) for r in rows],
            },
            indent=2,
        )
        + "\n"
    )


def plot(path: str | os.PathLike, rows: list[BenchRow]) -> None:
    """Horizontal bar chart of median latency (p90 as error bar), one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.median_ms is not None]
    labels = [f"{r.name} [{r.runtime}, {r.threads or '-'}t]" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.2))
    med = [cast(float, r.median_ms) for r in rows]  # rows without a median were dropped above
    err = [max(0.0, (r.p90_ms or m) - m) for r, m in zip(rows, med)]
    ax.barh(range(len(rows)), med, xerr=[[0] * len(rows), err], color="tab:blue")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("latency, ms (bar: median, whisker: p90)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class BenchReport:
    """What :func:`bench_files` measured: table rows, the sgemm peak per thread count, notes."""

    rows: list[BenchRow]
    peaks: dict[int, float]
    notes: list[str]
    runners: int


def bench_files(
    paths: list[Path],
    checkpoint: str | os.PathLike | None = None,
    threads: list[int] | None = None,
    rounds: int = 50,
    warmup: int = 5,
    merge: list[str] | None = None,
    update_cards: bool = True,
) -> BenchReport:
    """Time exported files (each with its card), and the checkpoint in PyTorch eager, interleaved.

    Core ML files are listed in the notes (they run on Apple devices only: time them in Xcode and
    ``merge`` the numbers); ExecuTorch's thread pool is process-wide, so ``.pte`` files are timed at
    the largest thread count only. ``merge``: on-device results (TFLite ``benchmark_model`` output or
    JSON rows) added to the table. ``update_cards`` stores each file's latency in its card.
    """
    counts = sorted(set(threads or [1, 2]))
    runners: list[Runner] = []
    notes: list[str] = []
    et_threads = None
    macs_by_arch: dict[str, float] = {}
    for p in paths:
        card = cards.read_card(p)
        if card is None:
            raise ExportError(f"{p} has no card ({cards.card_path(p).name}); export it with `robkit export`")
        if card["format"] == "coreml":
            notes.append(
                f"{p.name}: Core ML runs only on Apple devices; time it with Xcode's Performance tab "
                "and pass the numbers with --merge"
            )
            continue
        macs = _card_macs(card, macs_by_arch)
        for t in counts:
            if card["format"] == "executorch":  # one process-wide pool: measure at one count only
                if et_threads is not None and t != et_threads:
                    continue
                et_threads = et_threads or max(counts)
                t = et_threads
            r = file_runner(p, t)
            r.macs_g = macs
            runners.append(r)
        if card["format"] == "executorch" and len(counts) > 1:
            notes.append(
                f"{p.name}: ExecuTorch's thread pool is process-wide; timed at {et_threads} threads only"
            )
    if checkpoint:
        runners += _checkpoint_runners(checkpoint, counts)
    peaks = {t: measure_peak(t) for t in counts}
    run_interleaved(runners, rounds=rounds, warmup=warmup)
    rows = rows_from(runners, peaks)
    for m in merge or []:
        rows += parse_merge(m)
    if update_cards:
        for p in paths:
            mine = [r for r in rows if r.name == p.name]
            if mine:
                latency = {
                    f"{r.threads}t": {"median_ms": r.median_ms, "p90_ms": r.p90_ms, "cpu": cpu_name()}
                    for r in mine
                }
                cards.update_card(p, latency=latency)
    return BenchReport(rows, peaks, notes, len(runners))


def _card_macs(card: dict[str, Any], cache: dict[str, float]) -> float | None:
    """MACs of the card's architecture at its resolution (weights do not matter for the count)."""
    from robkit.export.wrappers import freeze_input_size
    from robkit.models.students import STUDENTS, build_student

    arch, res = card.get("arch"), int(card["input"]["resolution"])
    key = f"{arch}@{res}"
    if key not in cache and arch in STUDENTS:
        net = freeze_input_size(build_student(str(arch)).eval(), res)
        cache[key] = count_macs(net, torch.zeros(1, 3, res, res))
    return cache.get(key)


def _checkpoint_runners(checkpoint: str | os.PathLike, counts: list[int]) -> list[Runner]:
    from robkit.models.checkpoint import load_student

    student, meta = load_student(checkpoint)
    res = int(meta.get("resolution") or 224)
    x = torch.randn(1, 3, res, res)
    macs = count_macs(student, x)
    out = []
    for t in counts:
        r = torch_runner(student, x, t, name=f"{student.arch} (pytorch)")
        r.macs_g = macs
        out.append(r)
    return out
