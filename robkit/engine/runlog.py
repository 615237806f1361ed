"""Run logs: a CSV of per-step metrics, optional TensorBoard, and a loss / learning-rate plot."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunLog:
    """Append-only per-step metrics in ``metrics.csv``; on resume, rows past the checkpoint are dropped."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(out_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.fields: list[str] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            for r in self.rows:
                self.fields += [k for k in r if k not in self.fields]
        elif self.path.exists():
            self.path.unlink()
        self._field_set = set(self.fields)
        self._rewrite()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception:  # tensorboard is optional  # noqa: BLE001
                self.tb = None

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.fields or ["step"])
            w.writeheader()
            w.writerows(self.rows)

    def add(self, row: dict[str, Any]) -> None:
        """Append one step's row: O(1) per step (the file is rewritten only when a new column appears)."""
        new = [k for k in row if k not in self._field_set]
        self.rows.append(row)
        if new:
            self.fields += new
            self._field_set.update(new)
            self._rewrite()
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        """Close the TensorBoard writer (idempotent)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def plot(self, path: Path | None = None, title: str = "") -> Path | None:
        """Plot the rows so far (default: ``curves.png`` beside the CSV); the PNG's path, or ``None``."""
        return plot_curves(self.rows, path or self.path.with_name("curves.png"), title)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Loss (and its parts) and learning rate against step, as a PNG."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in [k for k in rows[0] if k.startswith("loss")]:
        vals = [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]
        ax1.plot(steps, vals, label=key, lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    if "lr" in rows[0]:
        ax2.plot(steps, [float(r["lr"]) for r in rows], color="tab:orange", lw=1)
        ax2.set_xlabel("step")
        ax2.set_ylabel("learning rate")
        ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
