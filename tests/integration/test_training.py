"""The training run against real services: an `mlflow server` process and moto's S3 API."""

from __future__ import annotations

import math
from datetime import datetime

import boto3
import pytest
import torch
from mlflow.tracking import MlflowClient

import ttt.model.ttt as ttt_loop
from tests.integration.services import ROOT, TINY
from ttt.config import ConfigError, resolve
from ttt.data.corpus import prepare
from ttt.data.tokenizer import ByteTokenizer
from ttt.storage import open_storage
from ttt.train.checkpoint import CheckpointError, load_checkpoint
from ttt.train.report import ATTEMPT_ENV, read_progress
from ttt.train.trainer import DivergedError, InjectedFailure, Trainer
from ttt_operator.run_report import from_mlflow
from ttt_operator.status import progress_status


def tiny_job(*extra: str):
    return resolve("tiny", [*TINY, *extra])


def assert_same_tensors(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_tensors(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_resume_continues_exactly_in_the_same_mlflow_run(tmp_path, text_dataset, mlflow_server):
    common = [
        f"data.path={text_dataset}",
        f"storage.root={tmp_path}",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=resume",
    ]
    straight = Trainer(tiny_job(*common), "straight", progress=False).fit()

    # Fail after four updates; the newest checkpoint holds three, so the resumed run redoes one step.
    with pytest.raises(InjectedFailure):
        Trainer(tiny_job(*common, "train.fail_at_step=4"), "resumed", progress=False).fit()
    client = MlflowClient(mlflow_server)
    [first] = client.search_runs(
        [client.get_experiment_by_name("resume").experiment_id], "run_name = 'resumed'"
    )
    assert first.info.status == "FAILED"
    resumed = Trainer(tiny_job(*common), "resumed", progress=False).fit()

    assert resumed.mlflow_run_id == first.info.run_id
    assert client.get_run(resumed.mlflow_run_id).info.status == "FINISHED"
    a, b = load_checkpoint(f"{tmp_path}/straight"), load_checkpoint(f"{tmp_path}/resumed")
    assert a["state"]["step"] == b["state"]["step"] == 6
    assert a["state"]["data_position"] == b["state"]["data_position"] == 6
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["optimizer"], b["optimizer"])
    assert a["scheduler"] == b["scheduler"]

    history = {
        run: client.get_metric_history(run, "train/loss")
        for run in (straight.mlflow_run_id, resumed.mlflow_run_id)
    }
    for metrics in history.values():
        assert sorted(m.step for m in metrics) == list(range(6))  # no gaps, no duplicates
    by_step = [{m.step: m.value for m in metrics} for metrics in history.values()]
    assert by_step[0] == by_step[1]


def test_progress_report_and_an_attempt_without_checkpoint_keeps_the_mlflow_run(
    tmp_path, text_dataset, mlflow_server, monkeypatch
):
    common = [
        f"data.path={text_dataset}",
        f"storage.root={tmp_path}",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=progress",
        "tracking.run_name=attempts",
        "train.report_every_s=0",
    ]
    # Fails before its first checkpoint (every 3 steps): only progress.json knows the MLflow run.
    with pytest.raises(InjectedFailure):
        Trainer(tiny_job(*common, "train.fail_at_step=1"), "attempts", progress=False).fit()
    run_dir = open_storage(str(tmp_path / "attempts"))
    failed = read_progress(run_dir)
    assert failed["state"] == "failed" and failed["step"] == 1 and "InjectedFailure" in failed["message"]
    assert "last_checkpoint" not in failed
    # What the operator reads from MLflow when the run directory is out of its reach says the same.
    assert from_mlflow(tiny_job(*common))["state"] == "failed"

    monkeypatch.setenv(ATTEMPT_ENV, "2")
    result = Trainer(tiny_job(*common), "attempts", progress=False).fit()
    assert result.mlflow_run_id == failed["mlflow_run_id"]
    done = read_progress(run_dir)
    assert (done["state"], done["step"], done["total_steps"]) == ("succeeded", 6, 6)
    assert done["last_checkpoint"] == {"step": 6, "uri": result.last_checkpoint}
    assert done["metrics"]["val/loss"] == pytest.approx(result.final_eval.loss)
    assert (
        done["tracking_uri"] == mlflow_server
        and math.isfinite(done["loss"])
        and done["tokens_per_second"] > 0
    )
    seen = from_mlflow(tiny_job(*common))
    status_seen, status_done = progress_status(seen), progress_status(done)
    updated = status_seen["progress"].pop("updated"), status_done["progress"].pop("updated")
    assert status_seen == status_done and seen["attempt"] == done["attempt"] == 2
    assert abs((datetime.fromisoformat(updated[0]) - datetime.fromisoformat(updated[1])).total_seconds()) < 60
    assert {k: seen[k] for k in ("state", "step", "mlflow_run_id", "last_checkpoint")} == {
        k: done[k] for k in ("state", "step", "mlflow_run_id", "last_checkpoint")
    }


def test_mlflow_run_holds_params_metrics_and_artifacts(tmp_path, text_dataset, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    job = tiny_job(
        f"data.path={text_dataset}",
        f"storage.root={tmp_path}",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=artifacts",
        "tracking.system_metrics=true",
        "train.total_steps=12",
        "train.eval_every=6",
        "train.peak_tflops=1",
    )
    result = Trainer(job, "full", progress=False).fit()
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["ttt.mini_batch_size"] == "16" and run.data.params["model.window_size"] == "16"
    assert run.data.tags["ttt.variant"] == "TTT-E2E"
    assert run.data.tags["ttt.kernels"] == "prefix=sdpa chunk=materialized"  # what 'auto' is on a CPU
    assert run.data.tags["ttt.checkpoint"].endswith("checkpoints/step-00000012.pt")
    metrics = set(run.data.metrics)
    assert {
        "train/loss",
        "train/lr",
        "train/inner_lr",
        "train/grad_norm",
        "train/tokens_per_second",
        "val/loss",
        "val/loss_past_window",
        "val/loss_no_ttt",
    } <= metrics
    assert any(m.startswith("system/") for m in metrics)
    assert "train/mfu" in metrics  # logged whenever the accelerator's peak is known
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [5, 11]
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert lr[0] == 0.0 and lr[1] == pytest.approx(job.optim.lr)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {
        "config.yaml",
        "checkpoints.json",
        "eval/loss_by_position.png",
        "eval/loss_by_position.json",
    } <= artifacts
    assert "eval/step-00000005" in artifacts  # the curve of the periodic evaluation after 6 steps


def test_a_kernel_this_machine_cannot_run_fails_before_training(tmp_path, text_dataset, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU without the interpreter: no Triton kernels
    job = tiny_job(f"data.path={text_dataset}", f"storage.root={tmp_path}", "model.chunk_kernel=triton")
    with pytest.raises(ConfigError, match=r"model\.chunk_kernel.*CUDA"):
        Trainer(job, "pinned", progress=False).fit()
    assert not list(tmp_path.glob("pinned/checkpoints/*"))


def test_gradient_accumulation_keeps_the_update(tmp_path, text_dataset):
    common = [
        f"data.path={text_dataset}",
        f"storage.root={tmp_path}",
        "train.total_steps=2",
        "train.global_batch_size=4",
        "train.checkpoint_every=2",
    ]
    Trainer(tiny_job(*common), "whole", progress=False).fit()
    Trainer(tiny_job(*common, "train.grad_accum_steps=2"), "accumulated", progress=False).fit()
    a, b = (load_checkpoint(f"{tmp_path}/{name}")["model"] for name in ("whole", "accumulated"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, text_dataset, monkeypatch):
    real = ttt_loop.sequence_loss

    def poisoned(model, inputs, targets, ttt, step=None, **kwargs):
        out = real(model, inputs, targets, ttt, step=step, **kwargs)
        if step == 4:
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(ttt_loop, "sequence_loss", poisoned)
    common = [f"data.path={text_dataset}", f"storage.root={tmp_path}"]
    with pytest.raises(
        DivergedError,
        match=r"loss nan at step 4: training stopped; last good checkpoint: .*step-00000004\.pt",
    ):
        Trainer(tiny_job(*common), "diverges", progress=False).fit()
    good = load_checkpoint(f"{tmp_path}/diverges")
    assert good["state"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in good["model"].values())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("ttt-e2e").experiment_id])
    assert run.info.status == "FAILED"

    monkeypatch.setattr(ttt_loop, "sequence_loss", real)
    assert Trainer(tiny_job(*common), "diverges", progress=False).fit().steps == 6


def test_s3_dataset_and_checkpoints(tmp_path, s3_bucket):
    data = f"s3://{s3_bucket}/data/code"
    prepare([str(ROOT / "platform" / "ttt")], data, ByteTokenizer(), val_every=5)
    common = [
        f"data.path={data}",
        f"storage.root=s3://{s3_bucket}/runs",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    with pytest.raises(InjectedFailure):
        Trainer(tiny_job(*common, "train.fail_at_step=4"), "on-s3", progress=False).fit()
    result = Trainer(tiny_job(*common), "on-s3", progress=False).fit()
    assert result.last_checkpoint == f"s3://{s3_bucket}/runs/on-s3/checkpoints/step-00000006.pt"
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="runs/on-s3/")
    )
    keys = {obj["Key"] for page in pages for obj in page.get("Contents", [])}
    assert keys == {
        "runs/on-s3/config.yaml",
        "runs/on-s3/progress.json",
        "runs/on-s3/injected-failure-4",  # the drill's marker: it fails once per run
        "runs/on-s3/checkpoints/step-00000003.pt",
        "runs/on-s3/checkpoints/step-00000006.pt",
    }
    payload = load_checkpoint(f"s3://{s3_bucket}/runs/on-s3")
    assert payload["state"]["step"] == 6 and payload["state"]["mlflow_run_id"] == result.mlflow_run_id


def test_zarr_dataset_on_s3(tmp_path, s3_bucket):
    import numpy as np
    import zarr

    from ttt.data import open_dataset

    tokens = (np.arange(5000) % 257).astype(np.uint16)
    for split in ("train", "val"):
        array = zarr.open(
            str(tmp_path / "z" / split), mode="w", shape=tokens.shape, dtype=tokens.dtype, chunks=(512,)
        )
        array[:] = tokens
    s3 = boto3.client("s3")
    for path in (tmp_path / "z").rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"zarr-data/{path.relative_to(tmp_path / 'z')}")
    dataset = open_dataset(f"s3://{s3_bucket}/zarr-data")
    assert np.array_equal(dataset.split("train")[1000:1100], tokens[1000:1100].astype(np.int64))
    assert len(dataset.split("val")) == 5000


def test_init_from_starts_from_another_runs_weights(tmp_path, text_dataset):
    common = [f"data.path={text_dataset}", f"storage.root={tmp_path}"]
    Trainer(tiny_job(*common), "pretrain", progress=False).fit()
    # lr 0 leaves the weights where they start (AdamW's decay is scaled by lr too)
    frozen = tiny_job(*common, f"train.init_from={tmp_path}/pretrain", "optim.lr=0", "optim.end_lr=0")
    Trainer(frozen, "extend", progress=False).fit()
    before, after = load_checkpoint(f"{tmp_path}/pretrain"), load_checkpoint(f"{tmp_path}/extend")
    assert_same_tensors(after["model"], before["model"])
    assert after["state"]["step"] == 6 and after["state"]["data_position"] == 6  # a fresh run, not a resume
    wider = tiny_job(*common, f"train.init_from={tmp_path}/pretrain", "model.intermediate_size=64")
    with pytest.raises(CheckpointError, match=r"train\.init_from: .*pretrain does not fit this model"):
        Trainer(wider, "mismatch", progress=False).fit()
