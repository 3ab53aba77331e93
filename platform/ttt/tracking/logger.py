"""One MLflow run per training run, continued across restarts and outages.

Only rank 0 creates a `Tracker` that talks to MLflow; other ranks get a disabled one whose calls do nothing.
On resume the run id stored in the checkpoint is reopened, parameters are not logged again, and metrics at
steps already in the run's history (or still in its journal) are dropped, so the history has neither gaps
nor duplicates. Opening the run is synchronous; a trainer's records then go through the run's journal and
a sender thread (`ttt.tracking.journal`, `ttt.tracking.delivery`), so that MLflow's latency and outages
never hold training up. Sweeps' parent runs and `ttt eval` log synchronously.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from ttt.config import TrackingConfig
from ttt.errors import UserError, warn
from ttt.storage import Storage
from ttt.tracking.delivery import Sender, calls, perform
from ttt.tracking.journal import RunJournal, end_record, metrics_record, params_record, tags_record

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
        self.client: Any = None
        self.journal: RunJournal | None = None
        self.sender: Sender | None = None
        self._monitor: Any = None
        self._last_step: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(
        self,
        run_id: str | None,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        run_dir: Storage | None = None,
    ) -> str | None:
        """Open the run (or reopen `run_id`) synchronously: an unreachable server is an error here. With
        `run_dir`, everything after goes through the run's journal and a sender thread, and an earlier
        attempt's undelivered records are delivered first; without, every call is synchronous."""
        if not self.enabled:
            return None
        from mlflow.tracking import MlflowClient
        from mlflow.tracking.context import registry

        quiet_mlflow()  # mlflow sets its own log level when first imported
        self._check_reachable()
        if self.artifact_location:
            Path(self.artifact_location.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = client = MlflowClient(self.uri)
        # Also set on a resumed run: a sweep run again adopts its trials' runs as children.
        tags = {**tags, **self.run_tags()}
        try:
            experiment_id = experiment_id_of(client, self.cfg.experiment, self.artifact_location)
            resumed = None
            if run_id is not None:
                resumed = client.get_run(run_id)  # raises if it is gone
                self._last_step = {
                    key: max(m.step for m in client.get_metric_history(run_id, key))
                    for key in resumed.data.metrics
                }
                client.update_run(run_id, status="RUNNING")
            else:
                run_id = client.create_run(
                    experiment_id, run_name=run_name, tags=registry.resolve_tags(tags)
                ).info.run_id
        except UserError:
            raise
        except Exception as exc:
            raise TrackingError(f"MLflow at {self.uri} refused the run: {exc}") from None
        self.run_id = run_id
        if run_dir is not None:
            self.journal = RunJournal(run_dir, run_id, self.uri)
            for key, step in self.journal.max_steps().items():  # an earlier attempt's, still undelivered
                self._last_step[key] = max(self._last_step.get(key, -1), step)
            self.sender = Sender(self.journal)
            self.sender.start()
        if resumed is not None:  # a new run got its tags when it was created
            self._emit(tags_record(tags))
        if resumed is None or not resumed.data.params:  # (params an earlier attempt journaled: the same)
            self._emit(params_record(params))
        if self.cfg.system_metrics:
            self._monitor = _SystemMetrics(self)
            self._monitor.start()
        return self.run_id

    def run_tags(self) -> dict[str, str]:
        """The config's tags, and the parent link MLflow's UI nests child runs by."""
        parent = {"mlflow.parentRunId": self.cfg.parent_run_id} if self.cfg.parent_run_id else {}
        return {**self.cfg.tags, **parent}

    def _check_reachable(self) -> None:
        check_reachable(self.uri)

    def checkpoint(self) -> None:
        """At a checkpoint: make the journal as durable as the checkpoint (on S3: copy it there)."""
        if self.journal is not None:
            self.journal.persist()

    def end(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """End the run. With a journal, wait up to `timeout` s (default tracking.flush_timeout_s) for
        MLflow to take everything; what it has not stays in the run directory. True if nothing is left."""
        if not self.enabled or not self.run_id:
            return True
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._emit(end_record(status))
        self.run_id = None
        if self.journal is None:
            return True
        wait = self.cfg.flush_timeout_s if timeout is None else timeout
        delivered = self.sender.close(wait)
        if not self.journal.finish():
            warn(
                f"ttt: MLflow at {self.uri} has not taken {self.journal.pending} records in {wait:.0f} s; "
                f"they are kept in {self.journal.where} and delivered by the next attempt of this run or by "
                f"`ttt sync {self.journal.storage.uri}`"
            )
        return delivered

    # -- logging -----------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id:
            return
        fresh = {
            k: float(v) for k, v in metrics.items() if v is not None and step > self._last_step.get(k, -1)
        }
        if fresh:
            self._emit(metrics_record(fresh, step))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            self._emit(tags_record(tags))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.run_id:
            return
        if self.journal is None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            self._emit(self.journal.add_file(Path(path).name, Path(path).read_bytes(), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.run_id:
            return
        if self.journal is None:
            self.client.log_text(self.run_id, text, artifact_file)
        else:
            folder, _, name = artifact_file.rpartition("/")
            self._emit(self.journal.add_file(name, text.encode(), folder or None))

    def _emit(self, record: dict[str, Any]) -> None:
        if self.journal is not None:
            self.journal.append(record)
            return
        for call in calls([{"seq": 1, **record}]):  # (a seq above any earlier end)
            perform(self.client, self.run_id, None, call)

    def curve_of(self, run_id: str) -> tuple[str, list[float]] | None:
        """Name and loss-by-position curve of another run (for the comparison plot), if it logged one."""
        if not self.enabled:
            return None
        import mlflow
        from mlflow.tracking import MlflowClient

        try:
            run = MlflowClient(self.uri).get_run(run_id)
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=CURVE_ARTIFACT, dst_path=tmp, tracking_uri=self.uri
                )
                curve = json.loads(Path(local).read_text())["loss_by_position"]
        except Exception as exc:
            raise TrackingError(
                f"tracking.baseline_run_id: cannot read run {run_id}'s curve ({exc})"
            ) from None
        return run.info.run_name or run_id, curve


class _SystemMetrics:
    """MLflow's own samplers of CPU, GPU, memory, disk and network, published through the tracker (so
    through the journal). MLflow's monitor thread is not used as is: it stops for good at the first
    failed call, and each of its publications is a synchronous call."""

    def __init__(self, tracker: Tracker):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.tracker = tracker
        self.sampler = SystemMetricsMonitor(tracker.run_id, tracking_uri=tracker.uri)
        steps = [s for k, s in tracker._last_step.items() if k.startswith("system/")]
        self.step = max(steps, default=-1) + 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ttt-system-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        sampler = self.sampler
        prefix = "system/" + (f"{sampler.node_id}/" if sampler.node_id else "")
        while not self._stop.is_set():
            for _ in range(sampler.samples_before_logging):
                sampler.collect_metrics()
                if self._stop.wait(sampler.sampling_interval):
                    return
            metrics = sampler.aggregate_metrics()
            for monitor in sampler.monitors:
                monitor.clear_metrics()
            self.tracker.log_metrics({prefix + k: v for k, v in metrics.items()}, self.step)
            self.step += 1

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def experiment_id_of(client, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it if need be; runs that start together (a sweep's trials, jobs
    applied at once) may race to create it, and the loser takes the winner's."""
    from mlflow.exceptions import MlflowException

    if experiment := client.get_experiment_by_name(name):
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def check_reachable(uri: str) -> None:
    """A tracking server that does not answer is a one-line error (a database or folder is not checked)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        reason = type(exc).__name__ if not str(exc) else str(exc).split("(")[0].strip()
        raise TrackingError(f"cannot reach the MLflow tracking server at {uri} ({reason})") from None


def quiet_mlflow() -> None:
    """Fewer retries against a dead server (the default backs off for minutes), no git lookups, no
    INFO chatter or download bars between our own progress lines."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
