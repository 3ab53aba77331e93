"""The run's own account of itself: `<run dir>/progress.json`, rewritten atomically by rank 0.

Whoever watches a run without talking to its processes reads it: the Kubernetes operator copies it into the
TTTJob's status (step, loss, tokens/s, last checkpoint, MLflow run), and a restarted attempt that found no
checkpoint takes the MLflow run id from it, so that every attempt of a run logs to the same MLflow run.
Writes are throttled (a storage round trip per step would cost on S3), except at checkpoints and the end.
A write that storage refuses is reported once and tried again with the next report: it never stops a run.
Under the operator, `attempt` says which attempt (`$TTT_ATTEMPT`) wrote the report, so that a `preempted`
end is matched to its RayJob.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Any

from ttt.errors import reason, warn
from ttt.storage import Storage, StorageError, failures

PROGRESS_FILE = "progress.json"
ATTEMPT_ENV = "TTT_ATTEMPT"


def read_progress(storage: Storage) -> dict[str, Any] | None:
    """The run's last report, or None when it has written none (or it cannot be parsed yet)."""
    try:
        if not storage.exists(PROGRESS_FILE):
            return None
        data = json.loads(storage.read_bytes(PROGRESS_FILE))
    except (StorageError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class ProgressReport:
    def __init__(self, storage: Storage, total_steps: int, every_s: float = 30.0, enabled: bool = True):
        self.storage = storage
        self.every_s = every_s
        self.enabled = enabled
        self.data: dict[str, Any] = {"state": "starting", "step": 0, "total_steps": total_steps}
        if os.environ.get(ATTEMPT_ENV, "").isdigit():
            self.data["attempt"] = int(os.environ[ATTEMPT_ENV])
        self._written = float("-inf")
        self._failing = False

    def start(self, step: int, mlflow_run_id: str | None, tracking_uri: str, checkpoint: dict | None) -> None:
        self.data.update(state="running", step=step, mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri)
        if checkpoint:
            self.data["last_checkpoint"] = checkpoint
        self._write()

    def step(self, step: int, loss: float, tokens_per_second: float) -> None:
        self.data.update(step=step, loss=loss, tokens_per_second=tokens_per_second)
        if time.monotonic() - self._written >= self.every_s:
            self._write()

    def checkpoint(self, step: int, uri: str) -> None:
        self.data["last_checkpoint"] = {"step": step, "uri": uri}
        self._write()

    def final_metrics(self, metrics: dict[str, float]) -> None:
        """The final evaluation's metrics (what sweeps judge a trial by); written with the end state."""
        self.data["metrics"] = {name: float(value) for name, value in metrics.items()}

    def finish(self, state: str, message: str | None = None) -> None:
        self.data["state"] = state
        if message:
            self.data["message"] = message
        self._write()

    def _write(self) -> None:
        if not self.enabled:
            return
        self.data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._written = time.monotonic()
        try:
            self.storage.write_bytes(PROGRESS_FILE, json.dumps(self.data, indent=1).encode())
        except failures() as exc:
            if not self._failing:
                where = self.storage.describe(PROGRESS_FILE)
                warn(f"ttt: cannot write {where} ({reason(exc)}); training goes on")
            self._failing = True
        else:
            if self._failing:
                warn(f"ttt: {self.storage.describe(PROGRESS_FILE)} is written again")
            self._failing = False
