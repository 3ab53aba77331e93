"""The tracking journal: what a run sends to MLflow goes to disk first, then to the server.

The trainer never waits for MLflow. It appends records (a step's metrics, params, tags, an artifact, the
run's end) to an append-only file, and a sender thread (`ttt.tracking.delivery`) delivers them in
batches, moving a cursor past what the server has taken. While the server is away the file holds the
backlog on disk, not in memory; if the run ends before the server is back the folder stays in the run
directory, where the next attempt of the run or `ttt sync RUN_DIR` delivers it into the same MLflow run.

A journal folder (`<run dir>/mlflow-journal/`):

    meta.json       the MLflow run id and tracking URI the records belong to
    journal.jsonl   one JSON record per line, numbered by `seq`
    cursor          the `seq` of the last record MLflow has taken
    files/<seq>/    an artifact's file, until it is uploaded

For a run directory on S3 the folder is a local spool, and its undelivered part is uploaded to the run
directory at every checkpoint and at the end (`persist`); a new attempt downloads it (`open_run_journal`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from ttt.errors import UserError, reason, warn
from ttt.storage import LocalStorage, Storage, cache_dir

FOLDER = "mlflow-journal"
RECORDS, CURSOR, META = "journal.jsonl", "cursor", "meta.json"
MEMORY_LIMIT = 100_000
"""Records held in memory while the journal file cannot be written (a full disk); beyond, the oldest go."""
COMPACT_BYTES = 1 << 20
"""Once everything is delivered, a journal file larger than this is emptied."""


class JournalError(UserError):
    pass


def now_ms() -> int:
    return int(time.time() * 1000)


def metrics_record(values: dict[str, float], step: int) -> dict[str, Any]:
    # The timestamp travels with the record: a batch delivered twice (the answer to the first delivery was
    # lost) is then the same rows, which MLflow's SQL store keeps once.
    return {"kind": "metrics", "step": step, "ts": now_ms(), "values": values}


def params_record(values: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "params", "values": {k: str(v) for k, v in values.items()}}


def tags_record(values: dict[str, str]) -> dict[str, Any]:
    return {"kind": "tags", "values": {k: str(v) for k, v in values.items()}}


def end_record(status: str) -> dict[str, Any]:
    return {"kind": "end", "status": status, "ts": now_ms()}


class Journal:
    """Append-only records with a delivery cursor, in one folder. Thread-safe: the trainer (and the
    system-metrics sampler) append, the sender reads and acknowledges."""

    def __init__(self, folder: Path, run_id: str, uri: str, echo=None):
        self.folder = Path(folder)
        self.run_id, self.uri = run_id, uri
        self.echo = echo or warn
        self._lock = threading.Lock()
        self._memory: deque[dict[str, Any]] = deque()
        self._dropping = False
        self._disk_failed = False
        self._disk_retry_at = 0.0
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files = LocalStorage(self.folder)  # atomic writes of the cursor, meta and artifact files
        self._check_meta()
        self.acked = self._read_cursor()
        self.last_seq = self.acked
        self._read_offset = 0
        self._read_seq = self.acked
        self._max_steps: dict[str, int] = {}
        self._size = self._scan()
        self.ends_before = self.last_seq
        """Records up to this seq were written by an earlier attempt; their `end` is not delivered (the
        attempt that adopts them ends the run itself)."""
        self._fh = open(self.folder / RECORDS, "ab")  # noqa: SIM115 (open for the journal's life)

    # -- opening -----------------------------------------------------------------------------------

    def _check_meta(self) -> None:
        path = self.folder / META
        if path.exists():
            try:
                meta = json.loads(path.read_text())
            except ValueError:
                meta = {}
            same = meta.get("run_id") == self.run_id and meta.get("tracking_uri") == self.uri
            if not same and self._has_undelivered():
                raise JournalError(
                    f"{self.folder} holds MLflow records of run {meta.get('run_id')} at "
                    f"{meta.get('tracking_uri')} not yet delivered: deliver them with `ttt sync` first"
                )
            if not same:
                self._wipe()
        self._files.write_bytes(META, json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}).encode())

    def _has_undelivered(self) -> bool:
        cursor = self._read_cursor()
        return any(r["seq"] > cursor for r, _, _ in _lines(self.folder / RECORDS))

    def _wipe(self) -> None:
        for name in (RECORDS, CURSOR):
            (self.folder / name).unlink(missing_ok=True)
        shutil.rmtree(self.folder / "files", ignore_errors=True)

    def _read_cursor(self) -> int:
        try:
            return int((self.folder / CURSOR).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _scan(self) -> int:
        """Find the undelivered records and where reading starts; cut off a line torn by a crash.
        Returns the file's size."""
        path = self.folder / RECORDS
        end = 0
        first_pending = None
        for record, start, stop in _lines(path):
            end = stop
            self.last_seq = max(self.last_seq, record["seq"])
            if record["seq"] > self.acked:
                first_pending = start if first_pending is None else first_pending
                if record["kind"] == "metrics":
                    for key in record["values"]:
                        self._max_steps[key] = max(self._max_steps.get(key, -1), record["step"])
        if path.exists() and path.stat().st_size != end:
            with open(path, "r+b") as fh:
                fh.truncate(end)
        self._read_offset = end if first_pending is None else first_pending
        return end

    # -- writing -----------------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> int:
        with self._lock:
            self.last_seq += 1
            record = {"seq": self.last_seq, **record}
            # Records go to memory only after the file failed, and stay there until delivered: order holds.
            if not self._memory and time.monotonic() >= self._disk_retry_at and self._write_line(record):
                return record["seq"]
            if len(self._memory) >= MEMORY_LIMIT:
                self._memory.popleft()
                if not self._dropping:
                    self._dropping = True
                    self.echo(f"ttt: more than {MEMORY_LIMIT:,} MLflow records wait in memory: the oldest go")
            self._memory.append(record)
            return record["seq"]

    def _write_line(self, record: dict[str, Any]) -> bool:
        line = _encode(record)
        try:
            self._fh.write(line)
            self._fh.flush()
        except OSError as exc:
            if not self._disk_failed:
                self._disk_failed = True
                self.echo(
                    f"ttt: cannot write the MLflow journal {self.folder / RECORDS} ({reason(exc)}): "
                    f"records are kept in memory (up to {MEMORY_LIMIT:,}) until they are delivered"
                )
            self._disk_retry_at = time.monotonic() + 30.0
            self._reopen()
            return False
        self._size += len(line)
        return True

    def _reopen(self) -> None:
        """After a failed write the file may end in part of a line: cut it back to the last whole one."""
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError), open(self.folder / RECORDS, "r+b") as fh:
            fh.truncate(self._size)
        self._fh = open(self.folder / RECORDS, "ab")  # noqa: SIM115

    def add_file(self, name: str, data: bytes, artifact_path: str | None) -> dict[str, Any]:
        """An artifact record whose content is kept beside the journal until it is uploaded."""
        folder = self.folder / "files" / uuid.uuid4().hex[:16]
        try:
            self._files.write_bytes(str((folder / name).relative_to(self.folder)), data)
            record = {"kind": "artifact", "file": str((folder / name).relative_to(self.folder))}
        except OSError:  # no room on disk: the content travels in the (memory) record
            record = {"kind": "artifact", "name": name, "data": base64.b64encode(data).decode()}
        if artifact_path:
            record["path"] = artifact_path
        return record

    def sync(self) -> None:
        """Make what is written durable (at checkpoints: the journal is as safe as the checkpoint)."""
        with self._lock, contextlib.suppress(OSError):
            self._fh.flush()
            os.fsync(self._fh.fileno())

    # -- reading and acknowledging -------------------------------------------------------------------

    def read(self, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` records after those already read, oldest first (file, then memory)."""
        with self._lock:
            out: list[dict[str, Any]] = []
            path = self.folder / RECORDS
            if path.exists():
                with open(path, "rb") as fh:
                    fh.seek(self._read_offset)
                    while len(out) < limit:
                        line = fh.readline()
                        if not line.endswith(b"\n"):
                            break
                        self._read_offset += len(line)
                        record = _decode(line)
                        if record is not None and record["seq"] > self._read_seq:
                            out.append(record)
                            self._read_seq = record["seq"]
            for record in self._memory:
                if len(out) >= limit:
                    break
                if record["seq"] > self._read_seq:
                    out.append(record)
                    self._read_seq = record["seq"]
            return out

    def acknowledge(self, seq: int) -> None:
        """MLflow has taken every record up to `seq`."""
        with self._lock:
            if seq <= self.acked:
                return
            self.acked = seq
            while self._memory and self._memory[0]["seq"] <= seq:
                self._memory.popleft()
            with contextlib.suppress(OSError):
                self._files.write_bytes(CURSOR, str(seq).encode())
                if self.acked == self.last_seq and self._size > COMPACT_BYTES:
                    self._fh.truncate(0)
                    self._read_offset = self._size = 0

    def discard_file(self, record: dict[str, Any]) -> None:
        if "file" in record:
            shutil.rmtree((self.folder / record["file"]).parent, ignore_errors=True)

    def file_path(self, record: dict[str, Any]) -> Path:
        return self.folder / record["file"]

    @property
    def pending(self) -> int:
        return self.last_seq - self.acked

    def max_steps(self) -> dict[str, int]:
        """The newest step of each metric still undelivered from earlier attempts."""
        return dict(self._max_steps)

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._fh.close()

    def undelivered_bytes(self) -> bytes:
        """The records MLflow has not taken, as journal lines (what a copy of the journal must hold)."""
        with self._lock:
            records = [r for r, _, _ in _lines(self.folder / RECORDS) if r["seq"] > self.acked]
            records += [r for r in self._memory if r["seq"] > self.acked]
            return b"".join(_encode(r) for r in records)


# -- a journal for a run directory, local or on S3 -----------------------------------------------------


class RunJournal(Journal):
    """The journal of one run directory. On local disk it lives in the run directory itself; for an S3
    run directory it is spooled locally and copied to `<run dir>/mlflow-journal/` by `persist`."""

    def __init__(self, storage: Storage, run_id: str, uri: str, echo=None):
        self.storage = storage
        self.remote = storage.local_path() is None
        local = storage.local_path()
        folder = local / FOLDER if local is not None else _spool(storage.uri)
        if self.remote:
            shutil.rmtree(folder, ignore_errors=True)
            self._uploaded = _download(storage, folder)
        super().__init__(folder, run_id, uri, echo)

    @property
    def where(self) -> str:
        return self.storage.describe(FOLDER)

    def persist(self) -> None:
        """S3 run directories: replace the run directory's copy with what is still undelivered."""
        if not self.remote:
            self.sync()
            return
        if not self.pending and not self._uploaded:
            return
        try:
            names = set()
            if self.pending:
                self.storage.write_bytes(f"{FOLDER}/{RECORDS}", self.undelivered_bytes())
                self.storage.write_bytes(f"{FOLDER}/{META}", (self.folder / META).read_bytes())
                self.storage.write_bytes(f"{FOLDER}/{CURSOR}", str(self.acked).encode())
                names = {f"{FOLDER}/{RECORDS}", f"{FOLDER}/{META}", f"{FOLDER}/{CURSOR}"}
                files = self.folder / "files"
                for path in sorted(files.rglob("*")) if files.is_dir() else ():
                    if path.is_file():
                        name = f"{FOLDER}/{path.relative_to(self.folder)}"
                        if name not in self._uploaded:
                            self.storage.upload(path, name)
                        names.add(name)
            for stale in self._uploaded - names:
                self.storage.delete(stale)
            self._uploaded = names
        except Exception as exc:  # a storage outage must not stop training: the next persist tries again
            self.echo(f"ttt: could not copy the MLflow journal to {self.where} ({reason(exc)})")

    def finish(self) -> bool:
        """At the end of an attempt: keep what is undelivered in the run directory (a finished run leaves
        no journal behind, and an S3 run's local spool always goes); True if nothing is left."""
        self.persist()
        self.close()
        if self.remote or not self.pending:
            shutil.rmtree(self.folder, ignore_errors=True)
        return not self.pending


def _spool(uri: str) -> Path:
    return cache_dir() / "journals" / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{os.getpid()}"


def _download(storage: Storage, folder: Path) -> set[str]:
    names = {f"{FOLDER}/{n}" for n in storage.list_recursive(FOLDER)}
    for name in names:
        storage.download(name, folder / name[len(FOLDER) + 1 :])
    return names


def journal_meta(storage: Storage) -> dict[str, Any] | None:
    """The run id and tracking URI of a run directory's journal, or None when it has none."""
    if not storage.exists(f"{FOLDER}/{META}"):
        return None
    try:
        meta = json.loads(storage.read_bytes(f"{FOLDER}/{META}"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not {"run_id", "tracking_uri"} <= set(meta):
        raise JournalError(f"{storage.describe(FOLDER)}/{META} is not a journal's meta.json")
    return meta


# -- the file format ---------------------------------------------------------------------------------


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


def _decode(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("seq"), int) else None


def _lines(path: Path):
    """(record, start, end byte offsets) of every whole, valid line; stops at the first torn one."""
    if not path.exists():
        return
    offset = 0
    with open(path, "rb") as fh:
        for line in fh:
            record = _decode(line) if line.endswith(b"\n") else None
            if record is None:
                return
            yield record, offset, offset + len(line)
            offset += len(line)
