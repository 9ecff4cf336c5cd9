"""The default model's loss curve (model/train.py's loss.csv) as a PNG: main and MTP loss, and the main loss per
task family.

    python loadtest/plot_training.py loss.csv docs/default_model_loss.png
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

FAMILIES = ("capitals", "reasoning", "arithmetic", "tools", "chat", "text")


def plot(csv_path: Path, png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    steps = [int(r["step"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.plot(steps, [float(r["loss"]) for r in rows], label="next token (main model)")
    a.plot(steps, [float(r["mtp_loss"]) for r in rows], label="next-next token (MTP layer)")
    for fam in FAMILIES:
        pts = [(s, float(r[f"loss_{fam}"])) for s, r in zip(steps, rows) if float(r[f"loss_{fam}"]) > 0]
        b.plot([p[0] for p in pts], [p[1] for p in pts], label=fam)
    for ax, name in ((a, "training loss"), (b, "main loss per family (trained tokens)")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
