"""The sweep's pictures: readable PNGs whose axes are labelled and whose cells carry their values."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from ttt.sweep.plots import Curve, Point, curves_figure, figure_texts, objective_figure, save_png

W, B = "model.window_size", "ttt.mini_batch_size"
METRIC = "val/loss_past_window"


def grid_points() -> list[Point]:
    return [
        Point({W: 32, B: 16}, 1.9123),
        Point({W: 32, B: 32}, 1.8456, best=True),
        Point({W: 64, B: 16}, None, "stopped\nat step 50"),
        Point({W: 64, B: 32}, 2.0789),
    ]


def read_png(path) -> np.ndarray:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas
    return image


def test_heatmap_over_window_and_mini_batch(tmp_path):
    # Given in the other order, window still goes on the rows and mini-batch on the columns.
    fig = objective_figure(grid_points(), [B, W], METRIC, "minimize", "sweep wb")
    texts = figure_texts(fig)
    for expected in ("1.9123", "1.8456", "2.0789", "stopped\nat step 50", W, B, "sweep wb"):
        assert expected in texts
    assert f"{METRIC}\n(lower is better)" in texts  # the colorbar's label
    ax = fig.axes[0]
    assert (ax.get_ylabel(), ax.get_xlabel()) == (W, B)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["32", "64"]
    # the best cell is outlined in red
    outlines = [p for p in ax.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    assert len(outlines) == 1 and outlines[0].get_xy() == (0.5, -0.5)
    read_png(save_png(fig, tmp_path / "heatmap.png"))


def test_heatmap_marks_missing_cells_and_keeps_the_best_of_several_trials():
    points = [
        Point({W: 32, B: 16, "optim.lr": 0.1}, 2.5),
        Point({W: 32, B: 16, "optim.lr": 0.2}, 2.25, best=True),
        Point({W: 64, B: 32, "optim.lr": 0.1}, None, "failed"),
        Point({W: 32, B: 32, "optim.lr": 0.1}, None, "invalid"),
    ]
    texts = figure_texts(objective_figure(points, ["optim.lr", W, B], METRIC, "minimize", "t"))
    assert "2.2500\n(best of 2)" in texts and "2.5000" not in texts
    assert "failed" in texts and "invalid" in texts and "not run" in texts  # (64, 16) was never tried


def test_maximize_labels_the_colorbar_so():
    texts = figure_texts(objective_figure(grid_points(), [W, B], METRIC, "maximize", "t"))
    assert f"{METRIC}\n(higher is better)" in texts


def test_one_swept_field_gives_annotated_bars(tmp_path):
    points = [Point({B: 16}, 1.95), Point({B: 32}, 1.85, best=True), Point({B: 64}, None, "failed")]
    fig = objective_figure(points, [B], METRIC, "minimize", "bars")
    texts = figure_texts(fig)
    assert {"1.9500", "1.8500", "failed", B, f"{METRIC}\n(lower is better)"} <= set(texts)
    read_png(save_png(fig, tmp_path / "bars.png"))


def test_many_random_values_give_a_scatter(tmp_path):
    rng = np.random.default_rng(0)
    points = [Point({"optim.lr": float(lr), W: int(w)}, float(v)) for lr, w, v in rng.random((20, 3)) * 100]
    fig = objective_figure(points, ["optim.lr", W], METRIC, "minimize", "random")
    assert fig.axes[0].get_xlabel() == W and len([t for t in figure_texts(fig) if "." in t]) >= 20
    read_png(save_png(fig, tmp_path / "scatter.png"))


def test_overlay_has_a_curve_per_trial_and_a_line_per_window(tmp_path):
    rng = np.random.default_rng(0)
    curves = [
        Curve("window_size=32, mini_batch_size=16", list(2 + rng.random(256)), 32),
        Curve("window_size=64, mini_batch_size=32", list(1.8 + rng.random(256)), 64, best=True),
        Curve("window_size=64, mini_batch_size=16", list(1.9 + rng.random(256)), 64),
    ]
    fig = curves_figure(curves, "overlay")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "position in context (tokens)" and "loss" in ax.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "window_size=32, mini_batch_size=16",
        "window_size=64, mini_batch_size=32  (best)",
        "window_size=64, mini_batch_size=16",
    ]
    texts = figure_texts(fig)
    assert " W=32" in texts and " W=64" in texts
    assert len(ax.get_lines()) == 3 + 2  # the curves and one dashed line per distinct window
    read_png(save_png(fig, tmp_path / "overlay.png"))


@pytest.mark.parametrize("goal", ["minimize", "maximize"])
def test_an_empty_sweep_still_draws(tmp_path, goal):
    fig = objective_figure([Point({W: 32, B: 16}, None, "failed")], [W, B], METRIC, goal, "t")
    read_png(save_png(fig, tmp_path / "h.png"))
    save_png(curves_figure([], "nothing"), tmp_path / "c.png")
