"""Plots of a JSON written by bench/ensemble_throughput.py: throughput (images/s) against the number of members N,
one panel per batch size, or (``--speedups``) each method's speedup over the member loop, one group of bars per
point (the figure of the README):

    python bench/plot_throughput.py bench/results/h100/ensemble-nchw-reference-2026-11-27.json \
        bench/results/h100/ensemble-nchw-reference-2026-11-27.png
    python bench/plot_throughput.py --speedups bench/results/h100/ensemble-activations-freed-2026-11-27.json \
        bench/results/h100/ensemble-activations-freed-2026-11-27.png
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


SPEEDUP_METHODS = {"loop_graph": "member loop + CUDA graph", "vmap": "torch.func vmap", "fused": "FusedEnsemble",
                   "optimized": "FusedEnsemble.optimize(x)"}


def plot_speedups(results: dict, path: str) -> None:
    points = [p for p in results["points"] if "ms" in p]
    fig, ax = plt.subplots(figsize=(1.9 * len(points) + 2.5, 3.4))
    methods = [m for m in SPEEDUP_METHODS if any(m in p["ms"] for p in points)]
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        xs = [i + (index - (len(methods) - 1) / 2) * width for i in range(len(points))]
        speedups = [p["ms"]["loop"] / p["ms"][method] if method in p["ms"] else 0.0 for p in points]
        bars = ax.bar(xs, speedups, width, label=SPEEDUP_METHODS[method])
        ax.bar_label(bars, labels=[f"{v:.1f}x" if v else "" for v in speedups], fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(points)),
                  [f"{p['model']} {p['dtype']}\nN={p['members']}, B={p['batch']}" for p in points], fontsize=8)
    ax.set_ylabel("speedup over the member loop")
    environment = results["environment"]
    ax.set_title(f"{environment.get('card', '')}, {environment.get('date', '')}: N members' forward and "
                 f"mean_probs, ms ratios in one process", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    speedups = "--speedups" in arguments
    arguments = [a for a in arguments if a != "--speedups"]
    if len(arguments) != 2:
        sys.exit(__doc__)
    with open(arguments[0]) as f:
        (plot_speedups if speedups else plot)(json.load(f), arguments[1])
