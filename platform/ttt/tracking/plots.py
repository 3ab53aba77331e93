"""The loss-by-position plot that lets a user compare TTT-E2E with its baseline at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
