"""Plot the demo teacher's kNN against its training steps (held-out split), beside its untrained network.

Reads the rows ``benchmarks/tune_short_budget.py`` appended to ``results.jsonl`` (ResNet-18,
``dino-sslight-short``, batch 64) and writes ``teacher-steps.png`` next to it:

    python benchmarks/tune_short_budget.py --recipe dino-sslight-short --bs 64 --steps 160 --tag A_base \
        --out benchmarks/results/teacher-steps      # and --steps 320 --tag E_s320, ...
    python benchmarks/tune_short_budget.py --recipe dino-sslight-short --untrained --tag U \
        --out benchmarks/results/teacher-steps      # the untrained row (75.6 % on this split)
    python benchmarks/plot_teacher_steps.py benchmarks/results/teacher-steps --untrained 75.6
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("folder", type=Path)
ap.add_argument("--untrained", type=float, required=True, help="kNN %% of the untrained network (same split)")
ap.add_argument(
    "--seconds-per-step", type=float, default=0.41, help="idle 2-core cost of one step, for the top axis"
)
ap.add_argument("--demo-steps", type=int, default=160, help="teacher steps of `robkit demo --budget small`")
a = ap.parse_args()
rows = [json.loads(line) for line in (a.folder / "results.jsonl").read_text().splitlines() if line.strip()]


def _is_recipe(r: dict) -> bool:
    return not r.get("set") and r.get("method", "dino") == "dino"


plain = sorted((r for r in rows if _is_recipe(r)), key=lambda r: r["steps"])  # the recipe as it is
other = [r for r in rows if not _is_recipe(r)]
fig, ax = plt.subplots(figsize=(6.4, 4))
for key, style in (("student", "o-"), ("ema", "s--")):
    steps = [0] + [r["steps"] for r in plain]  # step 0 is the untrained network itself
    ax.plot(steps, [a.untrained] + [100 * r[key] for r in plain], style, label=f"{key} (recipe as is)")
for r in other:
    ax.plot(r["steps"], 100 * r["student"], "x", color="grey")
    # another method is named by the method (its dynamics are in results.jsonl), a DINO variant by its overrides
    label = r["method"] if r.get("method", "dino") != "dino" else " ".join(r["set"])
    ax.annotate(label, (r["steps"], 100 * r["student"]), fontsize=6)
ax.axhline(a.untrained, color="k", lw=1, label="untrained ResNet-18")
ax.axhline(a.untrained + 3, color="tab:red", lw=1, ls=":", label="target: untrained + 3")
ax.axvline(a.demo_steps, color="tab:green", lw=1, ls="-.", label=f"the demo's teacher ({a.demo_steps} steps)")
ax.set_xlabel("training steps (batch 64)")
ax.set_ylabel("kNN top-1 % (held-out train images)")
sec = ax.secondary_xaxis(
    "top", functions=(lambda s: s * a.seconds_per_step / 60, lambda m: m * 60 / a.seconds_per_step)
)
sec.set_xlabel("minutes on 2 cores (idle)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
out = a.folder / "teacher-steps.png"
fig.savefig(out, dpi=120)
print(out)
