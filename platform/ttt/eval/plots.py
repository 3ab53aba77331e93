"""The S-NIAH picture: retrieval accuracy per context length × needle depth, one panel per model and task.

Built on `matplotlib.figure.Figure` with the Agg canvas (no pyplot state), like the sweep's plots.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ttt.eval.niah import NiahResult


def niah_heatmap(results: Mapping[str, NiahResult], title: str, scoring: str = "likelihood") -> Figure:
    """Rows of panels: one per model (`results` key); columns: one per task. Cells hold the accuracy over
    their trials by `scoring` ('likelihood' or 'greedy'), on a fixed 0..1 colour scale so that panels
    compare by colour; a cell not scored that way is left grey."""
    panels = [
        (model, task, [c for c in result.cells if c.task == task])
        for model, result in results.items()
        for task in dict.fromkeys(c.task for c in result.cells)
    ]
    tasks_per_model = max((len({c.task for c in r.cells}) for r in results.values()), default=1)
    rows = max(1, len(results))
    cols = max(1, tasks_per_model)
    fig = Figure(figsize=(1.5 + 4.2 * cols, 0.8 + 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    colors = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = None
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    row_of = {model: i for i, model in enumerate(results)}
    next_col: dict[str, int] = {}
    for model, task, cells in panels:
        r = row_of[model]
        c = next_col.get(model, 0)
        next_col[model] = c + 1
        ax = axes[r][c]
        ax.set_visible(True)
        lengths = sorted({cell.length for cell in cells})
        depths = sorted({cell.depth for cell in cells})
        grid = np.full((len(lengths), len(depths)), np.nan)
        trials = np.zeros_like(grid)
        for cell in cells:
            value = cell.score(scoring)
            grid[lengths.index(cell.length), depths.index(cell.depth)] = np.nan if value is None else value
            trials[lengths.index(cell.length), depths.index(cell.depth)] = cell.trials
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=colors, vmin=0.0, vmax=1.0, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                # Light text on the dark (low) end of viridis, dark text on the bright end.
                ax.text(
                    j,
                    i,
                    f"{value:.2f}\n(n={int(trials[i, j])})",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if value < 0.6 else "black",
                )
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth (0 = start of context, 1 = end)")
        ax.set_ylabel("context length (tokens)")
        ax.set_title(f"{model}: {task}", fontsize=9)
    if image is not None:
        label = (
            f"accuracy (chance {next(iter(results.values())).chance:.2f})"
            if scoring == "likelihood"
            else "exact match of greedy decoding"
        )
        fig.colorbar(image, ax=axes.ravel().tolist()).set_label(label)
    fig.suptitle(title, fontsize=10)
    return fig
