"""`ttt demo` / `make demo`: tiny TTT-E2E against its no-TTT ablation, on CPU, in a few minutes.

Both runs read the bundled byte-level corpus with context T=256 and window W=64, so three quarters of each
window's positions lie beyond what attention can see. There the ablation can only use the last 64 bytes;
TTT-E2E also uses what its prime MLP learned from the earlier part of the window at test time.
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

from ttt.config import resolve
from ttt.tracking.logger import quiet_mlflow
from ttt.train.trainer import RunResult, Trainer


def run_demo(root: str, tracking_uri: str | None = None) -> int:
    quiet_mlflow()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [f"storage.root={root}"] + ([f"tracking.uri={tracking_uri}"] if tracking_uri else [])
    print("Training the no-TTT ablation (tiny-cpu-nottt), then TTT-E2E (tiny-cpu), on 2 CPU threads.\n")
    ablation = Trainer(resolve("tiny-cpu-nottt", common), f"demo-nottt-{stamp}").fit()
    e2e_job = resolve("tiny-cpu", [*common, f"tracking.baseline_run_id={ablation.mlflow_run_id}"])
    e2e = Trainer(e2e_job, f"demo-e2e-{stamp}").fit()
    print(summary(e2e, ablation, e2e_job.model.window_size))
    return 0


def summary(e2e: RunResult, ablation: RunResult, window: int) -> str:
    rows = [("TTT-E2E", e2e), ("no-TTT ablation", ablation)]
    lines = [
        "",
        f"{'model':18s} {'steps':>5s} {'train s':>8s} {'val loss':>9s} {'loss past W=' + str(window):>16s}",
    ]
    for label, r in rows:
        lines.append(
            f"{label:18s} {r.steps:5d} {r.train_seconds:8.0f} {r.final_eval.loss:9.4f} "
            f"{r.final_eval.loss_past_window:16.4f}"
        )
    if e2e.final_eval_no_ttt:
        lines.append(
            f"{'TTT-E2E, TTT off':18s} {'':5s} {'':8s} {e2e.final_eval_no_ttt.loss:9.4f} "
            f"{e2e.final_eval_no_ttt.loss_past_window:16.4f}"
        )
    gap = ablation.final_eval.loss_past_window - e2e.final_eval.loss_past_window
    verdict = "lower" if gap > 0 else "NOT lower"
    lines += [
        "",
        f"Past the window, TTT-E2E's loss is {verdict} than the ablation's by {abs(gap):.4f} nats/byte "
        f"(training time {e2e.train_seconds + ablation.train_seconds:.0f} s for both).",
        "",
        "Browse both runs and the loss-by-position plot in MLflow:",
        f"  .venv/bin/mlflow ui --backend-store-uri {e2e.tracking_uri}"
        if e2e.tracking_uri.startswith("sqlite")
        else f"  {e2e.tracking_uri}",
        f"  runs {e2e.run_name} and {ablation.run_name} (experiment ttt-e2e); plot: artifact {e2e.plot}",
    ]
    if (path := _local_plot(e2e)) is not None:
        lines.append(f"  plot file: {path}")
    return "\n".join(lines)


def _local_plot(result: RunResult) -> str | None:
    import mlflow

    if not result.plot or not result.mlflow_run_id:
        return None
    uri = mlflow.get_run(result.mlflow_run_id).info.artifact_uri
    return f"{urlparse(uri).path}/{result.plot}" if uri.startswith("file:") else None
