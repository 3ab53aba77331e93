"""The sweep's two pictures: the objective over two swept fields, and every trial's loss by position.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas (no pyplot state, no display), returned
so that their texts can be read before `save_png` writes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ttt.tracking.plots import save_png  # noqa: F401  (part of this module's plotting API)

WINDOW, MINI_BATCH = "model.window_size", "ttt.mini_batch_size"
# More distinct values than this on an axis (a random search over a range) and cells would be mostly
# empty: such sweeps are drawn as a scatter instead.
MAX_CATEGORIES = 12


@dataclass(frozen=True)
class Point:
    """One trial, or one combination left out: its swept values, objective and why it has none."""

    params: dict[str, Any]
    value: float | None
    note: str | None = None
    """'stopped', 'failed', 'invalid': shown in place of (or under) the value."""
    best: bool = False


@dataclass(frozen=True)
class Curve:
    label: str
    loss_by_position: Sequence[float]
    window: int
    best: bool = False


def heatmap_axes(names: Sequence[str]) -> tuple[str, str | None]:
    """(rows, columns): window × mini-batch when both are swept, else the first two swept fields."""
    if WINDOW in names and MINI_BATCH in names:
        return WINDOW, MINI_BATCH
    return names[0], (names[1] if len(names) > 1 else None)


def objective_figure(
    points: Sequence[Point], names: Sequence[str], metric: str, goal: str, title: str
) -> Figure:
    """A heatmap over two swept fields (a bar chart over one); several trials in a cell: the best."""
    rows, cols = heatmap_axes(names)
    if cols is None:
        return _bars(points, rows, metric, goal, title)
    row_values = _distinct(p.params.get(rows) for p in points)
    col_values = _distinct(p.params.get(cols) for p in points)
    if max(len(row_values), len(col_values)) > MAX_CATEGORIES:
        return _scatter(points, rows, cols, metric, goal, title)
    return _heatmap(points, rows, cols, row_values, col_values, metric, goal, title)


def _heatmap(points, rows, cols, row_values, col_values, metric, goal, title) -> Figure:
    better = min if goal == "minimize" else max
    grid = np.full((len(row_values), len(col_values)), np.nan)
    notes: dict[tuple[int, int], str] = {}
    counts: dict[tuple[int, int], int] = {}
    best_cell = None
    for p in points:
        cell = (row_values.index(p.params.get(rows)), col_values.index(p.params.get(cols)))
        if p.value is not None and math.isfinite(p.value) and p.note is None:
            counts[cell] = counts.get(cell, 0) + 1
            grid[cell] = p.value if np.isnan(grid[cell]) else better(grid[cell], p.value)
        elif p.note:
            notes.setdefault(cell, p.note)
        if p.best:
            best_cell = cell

    fig = Figure(figsize=(max(6.0, 2.6 + 1.5 * len(col_values)), max(4.0, 1.8 + 1.0 * len(row_values))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Better is darker whichever way the goal points.
    cmap = "viridis" if goal == "minimize" else "viridis_r"
    colors = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colors, aspect="auto")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (r, c), value in np.ndenumerate(grid):
        if np.isfinite(value):
            dark = (value < middle) == (goal == "minimize")
            text = f"{value:.4f}"
            if counts.get((r, c), 0) > 1:
                text += f"\n(best of {counts[(r, c)]})"
            ax.text(c, r, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
        else:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="//", edgecolor="#bbbbbb"))
            ax.text(c, r, notes.get((r, c), "not run"), ha="center", va="center", fontsize=9, color="#555555")
    if best_cell is not None:
        r, c = best_cell
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
    ax.set_xticks(range(len(col_values)), [_fmt(v) for v in col_values])
    ax.set_yticks(range(len(row_values)), [_fmt(v) for v in row_values])
    return _finish(fig, ax, image, rows, cols, title, _metric_label(metric, goal))


def _metric_label(metric: str, goal: str) -> str:
    return f"{metric}\n({'lower' if goal == 'minimize' else 'higher'} is better)"


def _bars(points, name, metric, goal, title) -> Figure:
    values = _distinct(p.params.get(name) for p in points)
    better = min if goal == "minimize" else max
    heights: dict[Any, float] = {}
    notes: dict[Any, str] = {}
    best_value = None
    for p in points:
        key = p.params.get(name)
        if p.value is not None and math.isfinite(p.value) and p.note is None:
            heights[key] = p.value if key not in heights else better(heights[key], p.value)
        elif p.note:
            notes.setdefault(key, p.note)
        if p.best:
            best_value = key
    fig = Figure(figsize=(1.8 + 1.0 * len(values), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(values))
    tops = [heights.get(v, 0.0) for v in values]
    bars = ax.bar(xs, tops, color="#4c72b0")
    finite = [h for h in heights.values()]
    low = min(finite) if finite else 0.0
    high = max(finite) if finite else 1.0
    pad = (high - low) * 0.3 or abs(high) * 0.05 or 1.0
    ax.set_ylim(max(0.0, low - pad) if low >= 0 else low - pad, high + pad)
    for x, v, patch in zip(xs, values, bars, strict=True):
        if v in heights:
            ax.text(x, heights[v], f"{heights[v]:.4f}", ha="center", va="bottom", fontsize=9)
        else:
            ax.text(x, ax.get_ylim()[0], notes.get(v, "not run"), ha="center", va="bottom", fontsize=9)
        if v == best_value:
            patch.set_edgecolor("red")
            patch.set_linewidth(3)
    ax.set_xticks(list(xs), [_fmt(v) for v in values])
    ax.set_xlabel(name)
    ax.set_ylabel(_metric_label(metric, goal))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _scatter(points, rows, cols, metric, goal, title) -> Figure:
    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [p for p in points if p.value is not None and math.isfinite(p.value) and p.note is None]
    cmap = "viridis" if goal == "minimize" else "viridis_r"
    dots = ax.scatter(
        [p.params[cols] for p in done], [p.params[rows] for p in done], c=[p.value for p in done], cmap=cmap
    )
    for p in done:
        ax.annotate(
            f"{p.value:.4f}",
            (p.params[cols], p.params[rows]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
        if p.best:
            ax.scatter([p.params[cols]], [p.params[rows]], s=200, facecolors="none", edgecolors="red")
    for p in points:
        if p not in done:
            ax.scatter([p.params.get(cols)], [p.params.get(rows)], marker="x", color="grey")
            ax.annotate(
                p.note or "not run",
                (p.params.get(cols), p.params.get(rows)),
                fontsize=8,
                xytext=(4, -10),
                textcoords="offset points",
                color="grey",
            )
    for name, setter in ((cols, ax.set_xscale), (rows, ax.set_yscale)):  # log ranges look linear in log
        values = [p.params.get(name) for p in points if isinstance(p.params.get(name), (int, float))]
        if values and min(values) > 0 and max(values) / min(values) > 100:
            setter("log")
    return _finish(fig, ax, dots, rows, cols, title, _metric_label(metric, goal))


def _finish(fig: Figure, ax, mappable, rows: str, cols: str, title: str, colour_label: str) -> Figure:
    """Axis names, title and a labelled colour bar: what every objective plot carries."""
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    ax.set_title(title, fontsize=10)
    fig.colorbar(mappable, ax=ax).set_label(colour_label)
    fig.tight_layout()
    return fig


def curves_figure(curves: Sequence[Curve], title: str, bins: int = 32) -> Figure:
    """Every trial's validation loss by position (averaged over `bins` groups of positions: per-position
    NLL is noisy), with a dashed line at each window size: past it only the prime MLPs remember."""
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    longest = 0
    for curve in curves:
        values = np.asarray(curve.loss_by_position, dtype=float)
        longest = max(longest, len(values))
        width = max(1, len(values) // bins)
        usable = len(values) // width * width
        centers = np.arange(usable).reshape(-1, width).mean(1)
        label = curve.label + ("  (best)" if curve.best else "")
        ax.plot(
            centers,
            values[:usable].reshape(-1, width).mean(1),
            label=label,
            linewidth=2.6 if curve.best else 1.4,
        )
    ymax = ax.get_ylim()[1]
    for window in sorted({c.window for c in curves}):
        if window < longest:
            ax.axvline(window, color="grey", linestyle="--", linewidth=1)
            ax.text(window, ymax, f" W={window}", va="top", color="grey", fontsize=8)
    ax.set_xlabel("position in context (tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if curves:  # below the axes: the curves fill the whole plot
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def figure_texts(fig: Figure) -> list[str]:
    """Every string drawn on the figure: titles, axis labels, tick labels, annotations, legend entries."""
    texts = [
        t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_position"))
    ]
    return [t for t in texts if t]


def _distinct(values) -> list[Any]:
    out = list(dict.fromkeys(values))
    try:
        return sorted(out)
    except TypeError:  # mixed kinds (a list of values of different types): keep the sweep's order
        return out


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
