"""Delivering tracking records to MLflow: batched, off the training thread, and through outages.

`Sender` runs beside the trainer. About once a second it reads what the journal holds, turns consecutive
metrics, params and tags into one `log_batch` call (within MLflow's per-call limits), uploads artifacts
one by one and ends the run last, moving the journal's cursor after each call. A call that fails for a
reason that passes (refused connection, timeout, 5xx, 429) means the server is away: one warning line,
then a probe of its /health at growing intervals (up to 10 s), and the backlog goes out once it answers,
with one line saying so. A call MLflow refuses for good (another 4xx: a deleted run, a bad value) is
reported and skipped, since retrying it would hold back everything behind it.

MLflow's own asynchronous logging (`synchronous=False`) does not carry an outage: after its HTTP retries it
drops the failed batch and logs an error for each one.
"""

from __future__ import annotations

import base64
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttt.errors import reason, warn
from ttt.tracking.journal import Journal

READ_RECORDS = 500
INTERVAL_S = 1.0
MAX_PROBE_S = 10.0
# MLflow's limits for one log_batch call.
MAX_METRICS, MAX_PARAMS_TAGS, MAX_ENTITIES = 1000, 100, 1000


@dataclass
class Call:
    """One MLflow call made of consecutive records; `last` is the seq it acknowledges."""

    kind: str  # "batch", "artifact" or "end"
    last: int
    metrics: list[Any] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    record: dict[str, Any] | None = None

    def fits(self, kind: str, count: int) -> bool:
        """Whether `count` more values of `kind` still make one log_batch call."""
        limit = MAX_METRICS if kind == "metrics" else MAX_PARAMS_TAGS
        entities = len(self.metrics) + len(self.params) + len(self.tags)
        return len(getattr(self, kind)) + count <= limit and entities + count <= MAX_ENTITIES


def calls(records: list[dict[str, Any]], skip_end_through: int = 0) -> Iterator[Call]:
    """The MLflow calls for `records`, in order. Tags and params in one batch are merged by key (the
    newest value wins, as if they had been set one after the other)."""
    from mlflow.entities import Metric

    batch: Call | None = None
    for record in records:
        kind, seq = record["kind"], record["seq"]
        if kind in ("metrics", "params", "tags"):
            values = record["values"]
            if batch is not None and not batch.fits(kind, len(values)):
                yield batch
                batch = None
            batch = batch or Call("batch", seq)
            batch.last = seq
            if kind == "metrics":
                step, ts = record["step"], record["ts"]
                batch.metrics += [Metric(k, float(v), ts, step) for k, v in values.items()]
            else:
                getattr(batch, kind).update(values)
            continue
        if batch is not None:
            yield batch
            batch = None
        if kind == "end" and seq <= skip_end_through:
            yield Call("skip", seq)  # an earlier attempt's end: this attempt ends the run itself
        else:
            yield Call(kind, seq, record=record)
    if batch is not None:
        yield batch


def transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed later (the server is away, busy or restarting)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status in (408, 429)
    return True  # connection errors, timeouts, a half-written answer


def why_unreachable(exc: BaseException) -> str:
    """A short reason for a failed call: MLflow's own message repeats the URL and urllib3's retry story."""
    text = str(exc)
    for needle, short in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("timed out", "timed out"),
        ("RemoteDisconnected", "connection closed by the server"),
        ("Connection reset", "connection reset"),
        ("too many 5", "the server answers with errors"),
    ):
        if needle in text:
            return short
    if hasattr(exc, "get_http_status_code"):
        return f"HTTP {exc.get_http_status_code()}: {reason(exc, 120)}"
    return reason(exc, 120)


def perform(client, run_id: str, journal: Journal | None, call: Call) -> None:
    if call.kind == "batch":
        from mlflow.entities import Param, RunTag

        params = [Param(k, v) for k, v in call.params.items()]
        tags = [RunTag(k, v) for k, v in call.tags.items()]
        # One record with more params or tags than a call takes (calls() makes no bigger batches) is sent
        # in slices.
        for i in range(0, max(len(params), len(tags), 1), MAX_PARAMS_TAGS):
            metrics = call.metrics if i == 0 else []
            client.log_batch(
                run_id,
                metrics=metrics,
                params=params[i : i + MAX_PARAMS_TAGS],
                tags=tags[i : i + MAX_PARAMS_TAGS],
            )
    elif call.kind == "artifact":
        record = call.record
        if "file" in record:
            path = journal.file_path(record) if journal is not None else record["file"]
            client.log_artifact(run_id, str(path), record.get("path"))
        else:  # kept in memory (the journal could not be written)
            with tempfile.TemporaryDirectory(prefix="ttt-artifact-") as tmp:
                path = Path(tmp) / record["name"]
                path.write_bytes(base64.b64decode(record["data"]))
                client.log_artifact(run_id, str(path), record.get("path"))
    elif call.kind == "end":
        client.set_terminated(run_id, call.record["status"], end_time=call.record["ts"])


class Sender:
    """Delivers a journal's records to its MLflow run from a background thread."""

    def __init__(self, journal: Journal, echo: Callable[[str], None] | None = None, client=None):
        from mlflow.tracking import MlflowClient

        self.journal = journal
        self.uri = journal.uri
        self.echo = echo or warn
        self.client = client or MlflowClient(journal.uri)
        self._held: list[dict[str, Any]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self.outage_since: float | None = None
        self._attempt = time.monotonic()
        self.skipped = 0

    # -- the trainer's side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ttt-mlflow-sender", daemon=True)
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until every record appended so far is delivered."""
        target = self.journal.last_seq
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._idle:
            while self.journal.acked < target and self._thread and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
        return self.journal.acked >= target

    def close(self, timeout: float) -> bool:
        """Flush for up to `timeout` s, then stop; True if nothing is left undelivered."""
        done = self.flush(timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)  # a call in flight may take longer: the thread is a daemon
        return done and not self.journal.pending

    # -- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        # Records are sent once a second, not one call per step: a remote server's latency is paid per
        # batch, in this thread. While the server is away, /health is probed at growing intervals.
        pause = INTERVAL_S
        while not self._stop.is_set():
            self._wake.wait(pause)
            self._wake.clear()
            if self.outage_since is not None and not self._healthy():
                pause = min(pause * 2, MAX_PROBE_S)
                continue
            failure = self.drain()
            if failure is None:
                pause = INTERVAL_S
            else:
                self._went_away(failure)
                pause = min(max(pause * 2, 1.0), MAX_PROBE_S)

    def drain(self) -> BaseException | None:
        """Deliver everything there is; on a transient failure return it (what was not taken is held)."""
        while True:
            records = self._held or self.journal.read(READ_RECORDS)
            if not records:
                self._notify_idle()
                return None
            self._held = records
            for call in calls(records, self.journal.ends_before):
                self._attempt = time.monotonic()
                try:
                    if call.kind != "skip":
                        perform(self.client, self.journal.run_id, self.journal, call)
                except Exception as exc:
                    if transient(exc):
                        return exc
                    self.skipped += sum(1 for r in self._held if r["seq"] <= call.last)
                    why = reason(exc, 300)
                    self.echo(f"ttt: MLflow at {self.uri} refused a {call.kind} call, skipped: {why}")
                self._taken(call)

    def _taken(self, call: Call) -> None:
        if self.outage_since is not None:
            self._came_back()
        if call.record is not None:
            self.journal.discard_file(call.record)
        self.journal.acknowledge(call.last)
        self._held = [r for r in self._held if r["seq"] > call.last]
        self._notify_idle()

    def _notify_idle(self) -> None:
        with self._idle:
            self._idle.notify_all()

    def _healthy(self) -> bool:
        if not self.uri.startswith(("http://", "https://")):
            return True  # a database or folder: only a call tells
        import requests

        try:
            return requests.get(self.uri.rstrip("/") + "/health", timeout=2).ok
        except requests.RequestException:
            return False

    def _went_away(self, exc: BaseException) -> None:
        if self.outage_since is None:
            self.outage_since = self._attempt  # the failed call began then (MLflow retried it meanwhile)
            self.echo(
                f"ttt: MLflow at {self.uri} is unreachable ({why_unreachable(exc)}); training goes on and "
                f"its records wait in {self.journal.folder} until the server is back"
            )

    def _came_back(self) -> None:
        away = time.monotonic() - self.outage_since
        self.outage_since = None
        self.echo(
            f"ttt: MLflow at {self.uri} is back after {away:.0f} s; delivering the {self.journal.pending} "
            "records kept meanwhile"
        )


def deliver_all(journal: Journal, client=None) -> tuple[int, int]:
    """Deliver a whole journal in the foreground (`ttt sync`): (records delivered, records skipped).
    Raises the first transient failure: the caller says the server cannot be reached."""
    sender = Sender(journal, client=client)
    journal.ends_before = 0  # synced after the run's last attempt: its end is delivered too
    before = journal.pending
    failure = sender.drain()
    if failure is not None:
        raise failure
    return before - journal.pending, sender.skipped


def sync_run(run_dir: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """`ttt sync RUN_DIR`: deliver what a run's journal still holds into its MLflow run (at the URI it
    was logged to, or `tracking_uri`: the same server seen from elsewhere, e.g. through a port-forward)."""
    from mlflow.tracking import MlflowClient

    from ttt.storage import open_storage
    from ttt.tracking.journal import RunJournal, journal_meta
    from ttt.tracking.logger import TrackingError, check_reachable, quiet_mlflow

    quiet_mlflow()
    storage = open_storage(run_dir)
    local = storage.local_path()
    if local is not None and not local.is_dir():
        raise TrackingError(f"RUN_DIR: there is no run directory at {run_dir}")
    meta = journal_meta(storage)
    if meta is None:
        return {"run_dir": storage.uri, "delivered": 0, "message": "nothing to deliver"}
    uri = tracking_uri or meta["tracking_uri"]
    check_reachable(uri)
    journal = RunJournal(storage, meta["run_id"], meta["tracking_uri"])
    try:
        delivered, skipped = deliver_all(journal, MlflowClient(uri))
    except Exception as exc:
        journal.close()
        raise TrackingError(
            f"MLflow at {uri} did not take the journal of {storage.uri} ({reason(exc)}); "
            f"{journal.pending} records are still kept there"
        ) from None
    journal.finish()
    return {
        "run_dir": storage.uri,
        "mlflow_run_id": meta["run_id"],
        "tracking_uri": uri,
        "delivered": delivered,
        "skipped": skipped,
    }
