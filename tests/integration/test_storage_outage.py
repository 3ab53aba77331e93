"""Drills: storage fails while a checkpoint is written. S3 cut off mid-upload (through a proxy in front of
moto, which keeps its objects) and a local disk that fills up. Short outages are carried by botocore's
retries; longer ones cost that checkpoint only: training goes on, the next checkpoint step writes again,
and no checkpoint that is listed is incomplete."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch

from tests.integration.faults import TcpProxy
from tests.integration.services import TINY
from tests.integration.test_training import assert_same_tensors
from ttt.config import resolve
from ttt.storage import open_storage
from ttt.train.checkpoint import Checkpointer, CheckpointError, load_checkpoint
from ttt.train.trainer import Trainer


@pytest.fixture()
def s3_through_proxy(s3_server, monkeypatch):
    proxy = TcpProxy(int(s3_server.rsplit(":", 1)[1]))
    proxy.up()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    yield proxy
    proxy.down()


def job(*extra: str):
    return resolve("tiny", [*TINY, "train.total_steps=12", "train.checkpoint_every=4", *extra])


def every_listed_checkpoint_loads(root: str) -> list[int]:
    checkpointer = Checkpointer(open_storage(root), keep=10)
    steps = sorted(checkpointer.index())
    for step in steps:
        payload = load_checkpoint(f"{root}/checkpoints/step-{step:08d}.pt")
        assert payload["state"]["step"] == step and all(
            torch.isfinite(t).all() for t in payload["model"].values()
        )
    return steps


def test_s3_cut_off_during_a_checkpoint_write(tmp_path, text_dataset, s3_bucket, s3_through_proxy, capfd):
    proxy = s3_through_proxy
    common = [
        f"data.path={text_dataset}",
        f"storage.root=s3://{s3_bucket}/runs",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.keep_checkpoints=10",
    ]
    began = time.monotonic()
    Trainer(job(*common), "reference", progress=False).fit()
    reference_s = time.monotonic() - began

    # 1. Away for 3 s from the moment the step-4 upload starts: botocore's retries carry the write.
    proxy.cut_when(b"PUT /" + s3_bucket.encode() + b"/runs/carried/checkpoints/step-00000004.pt", 3.0)
    began = time.monotonic()
    carried = Trainer(job(*common), "carried", progress=False).fit()
    assert proxy.cuts, "the drill did not cut the upload"
    assert carried.steps == 12 and "not written" not in capfd.readouterr().err
    assert every_listed_checkpoint_loads(f"s3://{s3_bucket}/runs/carried") == [4, 8, 12]
    carried_s = time.monotonic() - began

    # 2. Away for longer than the retries (2 attempts here): that checkpoint is lost, the run is not.
    os.environ["AWS_MAX_ATTEMPTS"] = "2"
    try:
        proxy.cut_when(b"PUT /" + s3_bucket.encode() + b"/runs/lost/checkpoints/step-00000004.pt", None)

        def back_after_step_6(metrics, step):
            if step == 6:
                proxy.up()

        reports = "train.report_every_s=0"  # progress.json every step: its writes fail while S3 is away
        lost = Trainer(job(*common, reports), "lost", progress=False, on_metrics=back_after_step_6).fit()
    finally:
        del os.environ["AWS_MAX_ATTEMPTS"]
    err = capfd.readouterr().err
    assert lost.steps == 12 and lost.last_checkpoint.endswith("step-00000012.pt")
    assert "checkpoint at step 4 not written" in err and "step 8 tries again" in err, err
    assert err.count("progress.json (") == 1 and "progress.json is written again" in err, err
    assert "Traceback" not in err
    assert every_listed_checkpoint_loads(f"s3://{s3_bucket}/runs/lost") == [8, 12]
    a, b = (load_checkpoint(f"s3://{s3_bucket}/runs/{name}") for name in ("reference", "lost"))
    assert_same_tensors(a["model"], b["model"])  # the failed write changed nothing else

    # A resume from the newest checkpoint works: four more steps on top of it.
    more = Trainer(job(*common, "train.total_steps=16"), "lost", progress=False).fit()
    assert more.steps == 16 and load_checkpoint(f"s3://{s3_bucket}/runs/lost")["state"]["data_position"] == 16
    print(f"\nS3 drill: a 3 s cut carried by retries: run {carried_s:.1f} s, uncut {reference_s:.1f} s")


@pytest.fixture()
def small_disk(tmp_path):
    """A 48 MiB file system of its own (tmpfs; CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode:
        pytest.fail(f"the full-disk drill mounts a tmpfs and needs root: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path) -> None:
    """Write `path` until the file system has no room left (as another tenant's logs would)."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
                fh.flush()
        except OSError:
            pass
    assert os.statvfs(path.parent).f_bavail == 0


def test_a_full_disk_costs_a_checkpoint_not_the_run(tmp_path, text_dataset, small_disk, capfd, monkeypatch):
    filler = small_disk / "filler"
    # System metrics every 50 ms, and slow steps while the disk is full: more journal records than the
    # last page of its file holds, so that its writes fail too.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")

    def disk_events(metrics, step):
        if step == 3:  # before the step-4 checkpoint: the disk is full
            fill(filler)
        if 3 <= step < 6:
            time.sleep(0.5)
        if step == 6:  # space comes back before the step-8 checkpoint
            filler.unlink()

    common = [
        f"data.path={text_dataset}",
        f"storage.root={small_disk}",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
        "train.report_every_s=0",
        "tracking.system_metrics=true",
    ]
    result = Trainer(job(*common), "full", progress=False, on_metrics=disk_events).fit()
    err = capfd.readouterr().err
    assert result.steps == 12, err
    assert "checkpoint at step 4 not written (No space left on device)" in err, err
    assert "cannot write the MLflow journal" in err and "progress.json (No space left" in err, err
    assert "Traceback" not in err
    assert every_listed_checkpoint_loads(str(small_disk / "full")) == [8, 12]
    assert not list((small_disk / "full" / "checkpoints").glob(".*partial"))  # the cut-off write is gone
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    steps = sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "train/loss"))
    assert steps == list(range(12))  # the journal (on the full disk) kept its records in memory meanwhile


def test_a_final_checkpoint_that_cannot_be_written_ends_the_run_naming_the_newest(
    tmp_path, text_dataset, small_disk
):
    def fill_before_the_end(metrics, step):
        if step == 10:
            fill(small_disk / "filler")

    common = [
        f"data.path={text_dataset}",
        f"storage.root={small_disk}",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
    ]
    with pytest.raises(CheckpointError, match=r"final checkpoint \(step 12\).*step-00000008\.pt"):
        Trainer(job(*common), "end-full", progress=False, on_metrics=fill_before_the_end).fit()
    (small_disk / "filler").unlink()
    assert every_listed_checkpoint_loads(str(small_disk / "end-full")) == [4, 8]
    resumed = Trainer(job(*common), "end-full", progress=False).fit()  # a retry resumes from step 8
    assert resumed.steps == 12 and every_listed_checkpoint_loads(str(small_disk / "end-full")) == [4, 8, 12]
