"""A TTTSweep's MLflow parent run: opened before the first trial (each trial's run becomes its child
through `tracking.parent_run_id`), closed when the sweep ends with the best trial's metrics and the same
`sweep/` files as `ttt sweep` (results.csv, heatmap.png, loss_by_position.png).

It uses MlflowClient, not MLflow's fluent API: the operator serves many sweeps from several threads, and
the fluent API keeps one active run per process.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ttt.sweep.spec import Expansion, SweepSpec
from ttt.tracking.logger import CURVE_ARTIFACT, experiment_id_of, quiet_mlflow


def reachable_uri(uri: str | None) -> bool:
    """Only a tracking server can hold a sweep's runs: a sqlite file is private to each trial's pods."""
    return bool(uri) and uri.startswith(("http://", "https://"))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    quiet_mlflow()  # a dead server must fail in seconds: the sweep's lock is held meanwhile
    return MlflowClient(tracking_uri=uri)


def open_parent(uri: str, experiment: str, spec: SweepSpec, expansion: Expansion, sweep: str) -> str:
    client = _client(uri)
    experiment_id = experiment_id_of(client, experiment)
    run = client.create_run(
        experiment_id, run_name=sweep, tags={"ttt.sweep": sweep, "ttt.source": "TTTSweep"}
    )
    run_id = run.info.run_id
    for p in spec.parameters:
        values = list(dict.fromkeys(t.params[p.name] for t in expansion.trials))
        client.log_param(run_id, p.name, json.dumps(values))
    client.log_param(run_id, "sweep.objective", f"{spec.objective.metric} ({spec.objective.goal})")
    client.log_param(run_id, "sweep.algorithm", spec.algorithm)
    client.log_param(run_id, "sweep.trials", len(expansion.trials))
    return run_id


def close_parent(
    uri: str,
    run_id: str,
    spec: SweepSpec,
    expansion: Expansion,
    children: dict[int, dict[str, Any]],
    best_index: int | None,
) -> None:
    """Log the best trial and the sweep's files to the parent run, and end it."""
    from ttt.sweep.local import TrialOutcome, sweep_files

    client = _client(uri)
    outcomes = []
    for trial in expansion.trials:
        job = children.get(trial.index) or {}
        status = job.get("status") or {}
        phase = status.get("phase")
        outcome = TrialOutcome(
            trial.index,
            trial.params,
            job.get("metadata", {}).get("name", ""),
            status={"Succeeded": "completed", "Failed": "failed"}.get(phase, "not run"),
            metrics=dict(status.get("metrics") or {}),
            steps=int((status.get("progress") or {}).get("step", 0)),
            mlflow_run_id=status.get("mlflowRunId"),
            window=trial.config.model.window_size,
        )
        outcome.curve = _curve(client, outcome.mlflow_run_id)
        outcomes.append(outcome)
    best = next((o for o in outcomes if o.index == best_index), None)
    if best is not None:
        for name, value in best.metrics.items():
            client.log_metric(run_id, f"best/{name}", value)
        client.set_tag(run_id, "ttt.sweep.best_trial", str(best.index))
        client.set_tag(run_id, "ttt.sweep.best_run_id", best.mlflow_run_id or "")
    with tempfile.TemporaryDirectory(prefix="ttt-sweep-") as tmp:
        for path in sweep_files(spec, expansion, outcomes, best, Path(tmp) / "sweep"):
            client.log_artifact(run_id, str(path), "sweep")
    client.set_terminated(run_id, "FINISHED" if best is not None else "FAILED")


def _curve(client, run_id: str | None) -> list[float] | None:
    """The trial's final loss-by-position curve, as its trainer logged it (None if it has none)."""
    if not run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, CURVE_ARTIFACT, tmp)
            return json.loads(Path(path).read_text())["loss_by_position"]
    except Exception:  # a trial without a curve (failed, or its run is gone) is left out of the overlay
        return None
