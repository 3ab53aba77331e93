"""Drills: the MLflow server goes away while runs train. Training goes on; what MLflow could not take is
kept in the run's journal and delivered, each step once, when the server is back, by the same run, by
its next attempt, or by `ttt sync`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.drills import at_step, finish, progress, start_training, wait_until
from tests.integration.faults import MlflowServer
from tests.integration.services import ROOT
from ttt.tracking.journal import FOLDER


@pytest.fixture()
def server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    yield server
    server.stop()


def history(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def run_id_of(run_dir) -> str:
    return progress(run_dir)["mlflow_run_id"]


def test_server_restarted_during_a_run_loses_nothing_and_holds_nothing_up(tmp_path, server, text_dataset):
    """Stopped 5 s into a 60-step run, back 20 s later on the same store."""
    run_dir = tmp_path / "runs" / "outage"
    proc = start_training(
        "outage",
        f"data.path={text_dataset}",
        f"storage.root={tmp_path / 'runs'}",
        f"tracking.uri={server.uri}",
        "train.seq_len=256",
        "model.window_size=64",
        "ttt.mini_batch_size=32",
        "train.global_batch_size=8",
        "train.total_steps=60",
        "train.checkpoint_every=20",
        "train.eval_sequences=16",
        "train.report_every_s=0",
        "tracking.flush_timeout_s=120",
    )
    wait_until(at_step(run_dir, 1), "the first step", proc=proc)
    time.sleep(5)
    stopped_at = progress(run_dir)["step"]
    server.stop()
    time.sleep(20)
    restart_s = server.start()
    back_at = progress(run_dir).get("step")
    code, out, err = finish(proc)

    assert code == 0, err
    assert "Traceback" not in err and "MlflowException" not in err
    assert len(re.findall(r"MLflow at \S+ is unreachable", err)) == 1, err
    assert len(re.findall(r"MLflow at \S+ is back after \d+ s", err)) == 1, err
    client = MlflowClient(server.uri)
    run = client.get_run(run_id_of(run_dir))
    assert run.info.status == "FINISHED"
    assert history(client, run.info.run_id) == list(range(60))  # every step, once
    assert history(client, run.info.run_id, "val/loss") == [59]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints.json", "eval"} <= artifacts
    assert run.data.tags["ttt.checkpoint"].endswith("step-00000060.pt")
    assert not (run_dir / FOLDER).exists()  # all delivered: no journal left behind

    # Training did not wait for the server: the loop's wall time is its steps' compute time.
    compute = sum(m.value for m in client.get_metric_history(run.info.run_id, "train/step_seconds"))
    wall = float(re.search(r"60 steps in (\d+) s", out).group(1))
    print(
        f"\nMLflow outage drill: server stopped at step {stopped_at}, back after 20 s + {restart_s:.1f} s "
        f"start-up (run at step {back_at}); loop {wall:.0f} s for {compute:.1f} s of steps"
    )
    assert wall <= compute + 5.0


def test_records_left_when_the_server_stays_away_are_delivered_by_sync_or_the_next_attempt(
    tmp_path, server, text_dataset
):
    common = [f"data.path={text_dataset}", f"storage.root={tmp_path / 'runs'}", f"tracking.uri={server.uri}"]
    common += ["train.report_every_s=0", "train.total_steps=40", "train.checkpoint_every=100"]
    ends = start_training("ends-away", *common, "tracking.flush_timeout_s=2")
    stopped = start_training("stopped-away", *common, "train.stop_grace_s=4")
    runs = tmp_path / "runs"
    wait_until(at_step(runs / "ends-away", 2), "ends-away training", proc=ends)
    wait_until(at_step(runs / "stopped-away", 2), "stopped-away training", proc=stopped)
    server.stop()

    # One run ends while the server is away; the other is preempted (SIGTERM) while it is away.
    step = wait_until(at_step(runs / "stopped-away", 8), "stopped-away at step 8", proc=stopped)["step"]
    stopped.send_signal(signal.SIGTERM)
    code, _, err = finish(stopped)
    assert code == 75, err
    assert progress(runs / "stopped-away")["state"] == "preempted"
    assert (runs / "stopped-away" / FOLDER / "journal.jsonl").exists()
    code, out, err = finish(ends)
    assert code == 0 and "Traceback" not in err, err
    assert f"ttt sync {runs / 'ends-away'}" in err  # the one line says what to do
    assert (runs / "ends-away" / FOLDER / "journal.jsonl").exists()
    assert "40 steps" in out

    away = ttt_sync(runs / "ends-away")  # still away: one line, and the journal stays
    assert away.returncode == 2 and away.stderr.count("\n") == 1 and "cannot reach" in away.stderr
    assert (runs / "ends-away" / FOLDER / "journal.jsonl").exists()

    server.start()
    sync = ttt_sync(runs / "ends-away")
    assert sync.returncode == 0, sync.stderr
    assert '"delivered"' in sync.stdout and not (runs / "ends-away" / FOLDER).exists()
    client = MlflowClient(server.uri)
    ended = client.get_run(run_id_of(runs / "ends-away"))
    assert ended.info.status == "FINISHED" and history(client, ended.info.run_id) == list(range(40))
    assert history(client, ended.info.run_id, "val/loss_no_ttt") == [39]
    plots = {a.path for a in client.list_artifacts(ended.info.run_id, "eval")}
    assert "eval/loss_by_position.png" in plots

    # The preempted run's next attempt delivers what the first kept, then goes on in the same MLflow run.
    resumed = start_training("stopped-away", *common)
    code, _, err = finish(resumed)
    assert code == 0, err
    run = client.get_run(run_id_of(runs / "stopped-away"))
    assert run.info.status == "FINISHED" and history(client, run.info.run_id) == list(range(40)), step
    assert not (runs / "stopped-away" / FOLDER).exists()
    again = ttt_sync(runs / "ends-away")
    assert again.returncode == 0 and "nothing to deliver" in again.stdout


def ttt_sync(run_dir) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ttt", "sync", str(run_dir)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_the_journal_of_an_s3_run_directory_travels_with_it(tmp_path, s3_bucket, monkeypatch):
    """An attempt on one pod leaves undelivered records; the next attempt, on another pod (another local
    spool), takes them from the run directory on S3 and delivers them; then nothing is left there."""
    from ttt.storage import open_storage
    from ttt.tracking.delivery import deliver_all
    from ttt.tracking.journal import RunJournal, end_record, metrics_record

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("s3-journal", str(tmp_path / "art"))).info.run_id
    run_dir = open_storage(f"s3://{s3_bucket}/runs/r")
    monkeypatch.setenv("TTT_CACHE_DIR", str(tmp_path / "pod-1"))
    first = RunJournal(run_dir, run_id, uri)
    for step in range(5):
        first.append(metrics_record({"train/loss": 3.0 - step / 10}, step))
    first.append(first.add_file("config.yaml", b"train: {}\n", None))
    first.append(end_record("KILLED"))
    assert not first.finish()  # MLflow never took them: they stay in the run directory
    assert not list((tmp_path / "pod-1").rglob("journal.jsonl"))  # the local spool is gone
    names = set(run_dir.list_recursive(FOLDER))
    assert {"journal.jsonl", "meta.json", "cursor"} <= names and any(n.startswith("files/") for n in names)

    monkeypatch.setenv("TTT_CACHE_DIR", str(tmp_path / "pod-2"))
    second = RunJournal(run_dir, run_id, uri)
    assert second.pending == 7 and second.max_steps() == {"train/loss": 4}
    delivered, _ = deliver_all(second, client)
    assert delivered == 7 and second.finish()
    assert run_dir.list_recursive(FOLDER) == []
    assert history(client, run_id) == [0, 1, 2, 3, 4]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
