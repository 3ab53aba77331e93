"""Plots shared by training, evaluation and sweeps: the loss-by-position plot (TTT-E2E against its
baseline at a glance) and the PNG writer every figure goes through."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def loss_by_position_plot(
    curves: dict[str, list[float]], window: int | None, path: Path, title: str, bins: int = 64
) -> Path:
    """Each curve averaged over `bins` equal groups of positions (per-position NLL is noisy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in curves.items():
        values = np.asarray(values, dtype=float)
        width = max(1, len(values) // bins)
        usable = len(values) // width * width
        centers = np.arange(usable).reshape(-1, width).mean(1)
        ax.plot(centers, values[:usable].reshape(-1, width).mean(1), label=label, linewidth=1.6)
    if window is not None and curves and window < max(len(v) for v in curves.values()):
        ax.axvline(window, color="grey", linestyle="--", linewidth=1)
        ax.text(window, ax.get_ylim()[1], " window W", va="top", color="grey", fontsize=8)
    ax.set_xlabel("position in context (tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_png(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG (the one resolution every plot of the platform uses), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
