"""One MLflow run per training run, continued across restarts.

Only rank 0 creates a `Tracker` that talks to MLflow; other ranks get a disabled one whose calls do nothing.
On resume the run id stored in the checkpoint is reopened, parameters are not logged again, and metrics at
steps already in the run's history are dropped, so the history has neither gaps nor duplicates.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ttt.config import TrackingConfig
from ttt.errors import UserError

CURVE_ARTIFACT = "eval/loss_by_position.json"


class TrackingError(UserError):
    pass


def default_tracking_uri(storage_root: str) -> str:
    """sqlite under the (local) runs root; for an S3 root, under ./runs."""
    root = Path("runs" if storage_root.startswith("s3://") else storage_root).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def sqlite_artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite-backed store go beside the database (MLflow would use ./mlruns)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


class Tracker:
    def __init__(self, cfg: TrackingConfig, storage_root: str, enabled: bool = True):
        self.cfg = cfg
        self.enabled = enabled
        self.uri = cfg.uri or default_tracking_uri(storage_root)
        self.artifact_location = sqlite_artifact_location(self.uri)
        self.run_id: str | None = None
        self._last_step: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(
        self, run_id: str | None, run_name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> str | None:
        if not self.enabled:
            return None
        import mlflow
        from mlflow.tracking import MlflowClient

        quiet_mlflow()  # mlflow sets its own log level when first imported
        self._check_reachable()
        if self.artifact_location:
            Path(self.artifact_location.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        client = MlflowClient()
        try:
            experiment = client.get_experiment_by_name(self.cfg.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else client.create_experiment(self.cfg.experiment, artifact_location=self.artifact_location)
            )
            if run_id is not None:
                run = client.get_run(run_id)  # raises if it is gone
                self._last_step = {
                    key: max(m.step for m in client.get_metric_history(run_id, key))
                    for key in run.data.metrics
                }
            active = mlflow.start_run(
                run_id=run_id,
                experiment_id=None if run_id else experiment_id,
                run_name=None if run_id else run_name,
                log_system_metrics=self.cfg.system_metrics,
                # Also set on a resumed run: a sweep run again adopts its trials' runs as children.
                tags={**tags, **self.run_tags()},
            )
            if run_id is None:
                mlflow.log_params(params)
        except UserError:
            raise
        except Exception as exc:
            raise TrackingError(f"MLflow at {self.uri} refused the run: {exc}") from None
        self.run_id = active.info.run_id
        return self.run_id

    def run_tags(self) -> dict[str, str]:
        """The config's tags, and the parent link MLflow's UI nests child runs by."""
        parent = {"mlflow.parentRunId": self.cfg.parent_run_id} if self.cfg.parent_run_id else {}
        return {**self.cfg.tags, **parent}

    def _check_reachable(self) -> None:
        if not self.uri.startswith(("http://", "https://")):
            return
        import requests

        try:
            requests.get(self.uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as exc:
            reason = type(exc).__name__ if not str(exc) else str(exc).split("(")[0].strip()
            raise TrackingError(f"cannot reach the MLflow tracking server at {self.uri} ({reason})") from None

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.end_run(status=status)
            self.run_id = None

    # -- logging -----------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id:
            return
        import mlflow

        fresh = {
            k: float(v) for k, v in metrics.items() if v is not None and step > self._last_step.get(k, -1)
        }
        if fresh:
            mlflow.log_metrics(fresh, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            import mlflow

            mlflow.set_tags(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.run_id:
            import mlflow

            mlflow.log_text(text, artifact_file)

    def curve_of(self, run_id: str) -> tuple[str, list[float]] | None:
        """Name and loss-by-position curve of another run (for the comparison plot), if it logged one."""
        if not self.enabled:
            return None
        import mlflow
        from mlflow.tracking import MlflowClient

        try:
            run = MlflowClient().get_run(run_id)
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=CURVE_ARTIFACT, dst_path=tmp
                )
                curve = json.loads(Path(local).read_text())["loss_by_position"]
        except Exception as exc:
            raise TrackingError(
                f"tracking.baseline_run_id: cannot read run {run_id}'s curve ({exc})"
            ) from None
        return run.info.run_name or run_id, curve


def quiet_mlflow() -> None:
    """Fewer retries against a dead server (the default backs off for minutes), no git lookups, no
    INFO chatter or download bars between our own progress lines."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
