"""The tracking journal and its delivery: records on disk first, a cursor of what MLflow took, batches
within MLflow's limits, and redelivery that MLflow's store keeps once (against a real sqlite store)."""

from __future__ import annotations

import errno
import json

import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from ttt.storage import LocalStorage
from ttt.tracking import journal as journal_mod
from ttt.tracking.delivery import MAX_METRICS, calls, deliver_all, perform, transient
from ttt.tracking.journal import (
    FOLDER,
    Journal,
    JournalError,
    RunJournal,
    end_record,
    metrics_record,
    params_record,
    tags_record,
)


def open_journal(folder, run_id="run-a", uri="sqlite:///x.db", echo=None) -> Journal:
    return Journal(folder, run_id, uri, echo=echo)


def test_records_survive_a_restart_and_reading_resumes_after_the_cursor(tmp_path):
    journal = open_journal(tmp_path)
    for step in range(5):
        journal.append(metrics_record({"train/loss": 1.0 / (step + 1)}, step))
    first = journal.read(3)
    assert [r["seq"] for r in first] == [1, 2, 3]
    journal.acknowledge(3)
    assert journal.pending == 2
    journal.close()

    again = open_journal(tmp_path)  # a new process (the next attempt)
    assert (again.acked, again.last_seq, again.pending) == (3, 5, 2)
    assert [r["step"] for r in again.read(10)] == [3, 4]
    assert again.max_steps() == {"train/loss": 4}  # what an attempt must not log again
    assert again.ends_before == 5
    again.append(tags_record({"a": "b"}))
    assert [r["seq"] for r in again.read(10)] == [6]


def test_a_line_torn_by_a_crash_is_cut_off(tmp_path):
    journal = open_journal(tmp_path)
    journal.append(metrics_record({"x": 1.0}, 0))
    journal.append(metrics_record({"x": 2.0}, 1))
    journal.close()
    path = tmp_path / "journal.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"seq": 3, "kind": "metr')  # the process died mid-write
    again = open_journal(tmp_path)
    assert again.last_seq == 2 and path.read_bytes() == whole
    again.append(metrics_record({"x": 3.0}, 2))
    assert [r["values"]["x"] for r in again.read(10)] == [1.0, 2.0, 3.0]


def test_a_journal_of_another_run_with_undelivered_records_is_not_taken_over(tmp_path):
    journal = open_journal(tmp_path, run_id="run-a")
    journal.append(metrics_record({"x": 1.0}, 0))
    journal.close()
    with pytest.raises(JournalError, match=r"holds MLflow records of run run-a .* `ttt sync`"):
        open_journal(tmp_path, run_id="run-b")
    delivered = open_journal(tmp_path, run_id="run-a")
    delivered.acknowledge(1)
    delivered.close()
    fresh = open_journal(tmp_path, run_id="run-b")  # nothing undelivered: the folder starts over
    assert (fresh.last_seq, fresh.pending) == (0, 0)


def test_a_delivered_journal_is_compacted_and_numbering_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_mod, "COMPACT_BYTES", 200)
    journal = open_journal(tmp_path)
    for step in range(10):
        journal.append(metrics_record({"x": float(step)}, step))
    journal.read(10)
    journal.acknowledge(10)
    assert (tmp_path / "journal.jsonl").stat().st_size == 0
    journal.append(metrics_record({"x": 10.0}, 10))
    assert [r["seq"] for r in journal.read(10)] == [11]


def test_when_the_journal_cannot_be_written_records_wait_in_memory_in_order(tmp_path, monkeypatch):
    said = []
    journal = open_journal(tmp_path, echo=said.append)
    journal.append(metrics_record({"x": 0.0}, 0))

    def full(_data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal._fh, "write", full)
    for step in (1, 2):
        journal.append(metrics_record({"x": float(step)}, step))
    record = journal.add_file("plot.png", b"\x89PNG\x00\xff", "eval")
    journal.append(record)
    assert len(said) == 1 and "No space left on device" in said[0] and "kept in memory" in said[0]
    read = journal.read(10)
    assert [r["seq"] for r in read] == [1, 2, 3, 4]
    assert read[-1]["kind"] == "artifact" and "file" in read[-1]  # the folder for files was still writable
    journal.acknowledge(4)
    assert journal.pending == 0


def test_calls_batch_within_mlflows_limits_and_skip_an_earlier_attempts_end():
    records = [{"seq": 1, **params_record({f"p{i}": i for i in range(60)})}]
    records += [{"seq": 2 + i, **metrics_record({f"m{j}": 1.0 for j in range(30)}, i)} for i in range(60)]
    records += [
        {"seq": 100, **tags_record({"ttt.checkpoint": "a"})},
        {"seq": 101, **tags_record({"ttt.checkpoint": "b"})},
        {"seq": 102, **end_record("KILLED")},
        {"seq": 103, **metrics_record({"m0": 2.0}, 60)},
        {"seq": 104, **end_record("FINISHED")},
    ]
    out = list(calls(records, skip_end_through=102))
    batches = [c for c in out if c.kind == "batch"]
    assert all(len(c.metrics) <= MAX_METRICS and len(c.params) <= 100 for c in batches)
    assert sum(len(c.metrics) for c in batches) == 60 * 30 + 1
    assert [c.kind for c in out[-3:]] == ["skip", "batch", "end"]  # the old end is acknowledged, not sent
    assert any(c.tags == {"ttt.checkpoint": "b"} for c in batches)  # the newest value of a tag wins
    assert [c.last for c in out] == sorted(c.last for c in out)


def test_transient_failures_are_told_from_refusals():
    assert transient(MlflowException("API request failed: Connection refused"))  # INTERNAL_ERROR, 500
    assert transient(ConnectionError("reset"))
    assert transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}))
    assert not transient(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    assert not transient(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}))


def test_a_batch_delivered_twice_is_kept_once_by_mlflows_store(tmp_path):
    """An answer lost after the server committed the batch: the sender sends it again; the records carry
    their timestamps, so the SQL store sees the same rows and keeps them once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("j")).info.run_id
    records = [{"seq": i + 1, **metrics_record({"train/loss": 1.0 + i}, i)} for i in range(3)]
    for _ in range(2):
        for call in calls(records):
            perform(client, run_id, None, call)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [0, 1, 2]


def test_deliver_all_sends_metrics_params_tags_artifacts_and_the_end(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sync", str(tmp_path / "art"))).info.run_id
    run_dir = LocalStorage(tmp_path / "run")
    journal = RunJournal(run_dir, run_id, uri)
    journal.append(params_record({"model.window_size": 64}))
    for step in range(4):
        journal.append(metrics_record({"train/loss": 2.0 - step / 10}, step))
    journal.append(journal.add_file("config.yaml", b"model: {}\n", None))
    journal.append(tags_record({"ttt.checkpoint": "step-4"}))
    journal.append(end_record("FINISHED"))
    journal.close()

    again = RunJournal(run_dir, run_id, uri)  # as `ttt sync` opens it
    delivered, skipped = deliver_all(again, client)
    assert (delivered, skipped) == (8, 0)
    assert again.finish() and not (tmp_path / "run" / FOLDER).exists()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"model.window_size": "64"}
    assert run.data.tags["ttt.checkpoint"] == "step-4"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    assert json.loads(json.dumps(run.data.metrics)) == {"train/loss": pytest.approx(1.7)}


def test_runs_that_race_to_create_their_experiment_both_start(tmp_path, monkeypatch):
    """Two runs start together on a new experiment: both look it up, find nothing, and create it; the
    second create is refused (RESOURCE_ALREADY_EXISTS) and must take the first one's experiment."""
    from ttt.config import TrackingConfig
    from ttt.tracking.logger import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    winner = MlflowClient(uri).create_experiment("raced")
    lookups = iter([None])  # the loser's lookup came before the winner's create was committed
    real = MlflowClient.get_experiment_by_name
    monkeypatch.setattr(
        MlflowClient, "get_experiment_by_name", lambda self, name: next(lookups, real(self, name))
    )
    tracker = Tracker(TrackingConfig(uri=uri, experiment="raced", system_metrics=False), str(tmp_path))
    run_id = tracker.start(None, "loser", {}, {})
    assert MlflowClient(uri).get_run(run_id).info.experiment_id == winner
    tracker.end()
