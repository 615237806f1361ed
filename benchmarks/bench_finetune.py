"""Fine-tuned classifier vs the linear probe, with the from-scratch network beside it.

For one student checkpoint (e.g. the demo's RoB student), on one labelled split, every row is
measured in the same run on the same test images:

* ``robkit eval linear`` (frozen features, the probe the demo exports);
* ``robkit finetune --mode linear`` (the same probe on the labelled subset only);
* ``robkit finetune --mode full`` (SSLight appendix B) from the checkpoint;
* the same full fine-tuning from the architecture's untrained weights (``--untrained``): what the
  labels alone give, the baseline a pre-training claim needs.

at each labelled fraction (``--fractions 1,0.1,0.01``: 100 %, 10 %, 1 %, class-balanced).

    python benchmarks/bench_finetune.py demo/rob/checkpoint.pt --train-limit 10000 --test-limit 2000 \
        --out benchmarks/results/finetune
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from robkit.evaluation import evaluate
from robkit.evaluation.finetune import finetune
from robkit.utils.machine import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--fractions", default="1,0.1,0.01")
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (full mode)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-untrained", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/finetune")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    limits = {"train_limit": a.train_limit, "test_limit": a.test_limit}
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "results.json").write_text(
            json.dumps(
                {"checkpoint": a.checkpoint, "cpu": cpu_name(), "threads": a.threads, "rows": rows}, indent=2
            )
        )

    t = time.time()
    lin = evaluate(a.checkpoint, data=a.data, which=("linear",), **limits)
    record(
        {
            "run": "eval linear (all labels)",
            "fraction": 1.0,
            "accuracy": lin["linear"]["accuracy"],
            "seconds": round(time.time() - t, 1),
        }
    )
    fractions = [float(f) for f in a.fractions.split(",")]
    with tempfile.TemporaryDirectory() as d:
        for frac in fractions:
            variants = [("finetune linear", "linear", False), ("finetune full", "full", False)]
            if not a.skip_untrained:
                variants.append(("finetune full, untrained start", "full", True))
            for name, mode, untrained in variants:
                t = time.time()
                res, _ = finetune(
                    a.checkpoint,
                    data=a.data,
                    out=Path(d) / f"{mode}-{untrained}-{frac}",
                    mode=mode,
                    labels_fraction=frac,
                    epochs=a.epochs if mode == "full" else None,
                    batch_size=a.batch_size,
                    untrained=untrained,
                    progress=False,
                    tensorboard=False,
                    **limits,
                )
                record(
                    {
                        "run": name,
                        "fraction": frac,
                        "labelled": res["num_train"],
                        "epochs": res["epochs"],
                        "accuracy": res["accuracy"],
                        "img_per_s": res["train"].get("img_per_s"),
                        "precision": res["train"].get("precision"),
                        "seconds": round(time.time() - t, 1),
                    }
                )
    _plot(rows, out / "finetune.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["run"] for r in rows):
        pts = sorted((r["fraction"] * 100, r["accuracy"] * 100) for r in rows if r["run"] == name)
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images (%)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
