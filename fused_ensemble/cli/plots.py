"""Plots of the commands: the reliability diagram of the train command."""

from __future__ import annotations

import torch

from fused_ensemble import metrics


def _reliability_panel(top, bottom, probs: torch.Tensor, targets: torch.Tensor, n_bins: int, title: str) -> None:
    diagram = metrics.reliability_diagram(probs, targets, n_bins)
    edges = diagram.edges.numpy()
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    filled = diagram.count.numpy() > 0
    top.bar(centers[filled], diagram.accuracy.numpy()[filled], width=width, edgecolor="black", label="accuracy")
    top.plot(centers[filled], diagram.confidence.numpy()[filled], "o", color="tab:red", label="mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    top.title.set_fontsize(9)
    top.legend(loc="upper left")
    bottom.bar(centers, diagram.count.numpy(), width=width, color="gray", edgecolor="black")
    bottom.set(xlabel="confidence", ylabel="examples", yscale="log")


def plot_reliability(probs: torch.Tensor, targets: torch.Tensor, path: str, n_bins: int = 15,
                     title: str = "reliability diagram", calibrated_probs: torch.Tensor | None = None,
                     calibrated_title: str | None = "calibrated") -> None:
    """Writes a reliability diagram of ``probs`` as a PNG: per confidence bin, the accuracy (bars) against the
    mean confidence (dots; on the diagonal when calibrated), and below it how many examples each bin holds. With
    ``calibrated_probs``, a second panel beside it shows them (the same examples after calibration)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works without a display

    panels = [(probs, title)] + ([] if calibrated_probs is None else [(calibrated_probs, calibrated_title)])
    fig = Figure(figsize=(5 * len(panels), 6))
    axes = fig.subplots(2, len(panels), sharex=True, squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
    for column, (panel_probs, panel_title) in enumerate(panels):
        _reliability_panel(axes[0, column], axes[1, column], panel_probs, targets, n_bins, panel_title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
