"""Plots throughput (images/s) against the number of members N, one panel per batch size, from a JSON written by
bench/ensemble_throughput.py:

    python bench/plot_throughput.py bench/results/h100/ensemble-nchw-reference-2026-11-27.json \
        bench/results/h100/ensemble-nchw-reference-2026-11-27.png
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("loop", "loop_graph", "vmap", "fused", "optimized")


def plot(results: dict, path: str) -> None:
    panels = defaultdict(list)  # (model, dtype, batch) -> points
    for point in results["points"]:
        if "ms" in point:
            panels[(point["model"], point["dtype"], point["batch"])].append(point)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, ((model, dtype, batch), points) in zip(axes[0], sorted(panels.items())):
        points.sort(key=lambda p: p["members"])
        members = [p["members"] for p in points]
        for method in METHODS:
            if all(method in p["ms"] for p in points):
                ax.plot(members, [batch * 1e3 / p["ms"][method] for p in points], marker="o", label=method)
        ax.set_title(f"{model} {dtype} B={batch}", fontsize=9)
        ax.set_xlabel("members N")
        ax.set_ylabel("images/s (each through all N members)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(results["environment"].get("card", ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])
