"""A run's account of itself when the operator cannot read its run directory: from its MLflow run.

`progress.json` lives in the run directory; on S3 the operator reads it, but a run directory on the runs
volume is out of its reach unless the volume is mounted in its pod (a ReadWriteMany claim; many clusters
have none). The trainer logs the same facts to MLflow: its run is named after the TTTJob's run, its status
says how it ended (KILLED with a `ttt.stopped` tag: stopped on request after a checkpoint), its tags carry
the attempt, and its newest metrics are the final evaluation's. This module rebuilds the parts of
`progress.json` that the operator uses from them, in the same shape.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Any

from ttt.config import JobConfig

log = logging.getLogger(__name__)

ATTEMPT_TAG = "ttt.attempt"
STOPPED_TAG = "ttt.stopped"
_STATES = {"RUNNING": "running", "SCHEDULED": "starting", "FINISHED": "succeeded", "FAILED": "failed"}
# The final evaluation's metrics, the ones progress.json's "metrics" holds (what sweeps rank by).
_FINAL_PREFIXES = ("val/",)


def from_mlflow(cfg: JobConfig) -> dict[str, Any] | None:
    """The newest MLflow run named `cfg.tracking.run_name` as a progress report, or None (no tracking
    server, no such run yet, or the server cannot be reached: the next poll tries again)."""
    uri, name = cfg.tracking.uri, cfg.tracking.run_name
    if not uri or not name or uri.startswith("sqlite:"):  # a sqlite file lies in the run's storage too
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            return None
        quoted = name.replace("'", "\\'")
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"attributes.run_name = '{quoted}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    except Exception as exc:  # an MLflow outage must not stop status updates from the RayJob
        log.warning("cannot read MLflow run %s at %s: %s", name, uri, exc)
        return None
    return as_report(runs[0], uri, cfg.train.total_steps) if runs else None


def as_report(run: Any, tracking_uri: str, total_steps: int) -> dict[str, Any]:
    tags = run.data.tags
    status = run.info.status
    state = ("preempted" if STOPPED_TAG in tags else "killed") if status == "KILLED" else _STATES.get(status)
    report: dict[str, Any] = {
        "state": state or "running",
        "total_steps": total_steps,
        "mlflow_run_id": run.info.run_id,
        "tracking_uri": tracking_uri,
        "source": "mlflow",
    }
    if tags.get(ATTEMPT_TAG, "").isdigit():
        report["attempt"] = int(tags[ATTEMPT_TAG])
    # The entity keeps only values; its protobuf form keeps each metric's step as well.
    latest = {m.key: m for m in run.data.to_proto().metrics}
    if "train/loss" in latest:
        report["step"] = int(latest["train/loss"].step) + 1  # steps are logged from 0
        report["loss"] = float(latest["train/loss"].value)
        stamp = datetime.fromtimestamp(latest["train/loss"].timestamp / 1000, timezone.utc)
        report["updated"] = stamp.isoformat(timespec="seconds")
    if "train/tokens_per_second" in latest:
        report["tokens_per_second"] = float(latest["train/tokens_per_second"].value)
    if tags.get("ttt.checkpoint"):
        report["last_checkpoint"] = {"uri": tags["ttt.checkpoint"], "step": _step_of(tags["ttt.checkpoint"])}
    if report["state"] == "succeeded":
        report["metrics"] = {k: float(m.value) for k, m in latest.items() if k.startswith(_FINAL_PREFIXES)}
    return report


def _step_of(checkpoint_uri: str) -> int:
    """The step in a checkpoint's name (`.../step-00000012`, or `step-00000012.pt` for a single file)."""
    found = re.search(r"step-(\d+)", checkpoint_uri.rstrip("/").rsplit("/", 1)[-1])
    return int(found.group(1)) if found else 0
