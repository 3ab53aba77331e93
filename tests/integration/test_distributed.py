"""Ray Train + DeepSpeed on 2 CPU workers, against the single-process run (one Ray cluster per session)."""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.integration.services import ROOT, TINY
from ttt.config import resolve
from ttt.data.corpus import prepare
from ttt.data.tokenizer import ByteTokenizer
from ttt.distributed.launcher import launch
from ttt.errors import UserError
from ttt.storage import open_storage
from ttt.train.checkpoint import Checkpointer, load_checkpoint
from ttt.train.trainer import Trainer

STEPS = [
    "train.total_steps=3",
    "train.global_batch_size=4",
    "train.eval_batch_size=2",
    "train.checkpoint_every=1",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_dataset):
    root = tmp_path_factory.mktemp("dist")
    common = [*TINY, *STEPS, f"data.path={text_dataset}", f"storage.root={root}"]
    Trainer(resolve("tiny", common), "single", progress=False).fit()
    return root, common


def relative_distance(a: dict, b: dict) -> float:
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    norm = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (diff / norm) ** 0.5


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_workers_matches_one_process(ray_cluster, runs, stage):
    root, common = runs
    # ZeRO-3 needs per-mini-batch checkpointing; gradients are the same with or without it.
    job = resolve(
        "tiny", [*common, "scale.workers=2", f"scale.zero_stage={stage}", f"ttt.checkpoint={stage == 3}"]
    )
    result = launch(job, f"zero{stage}", progress=False)
    assert result.steps == 3 and result.last_checkpoint.endswith("step-00000003")
    single, distributed = load_checkpoint(f"{root}/single"), load_checkpoint(f"{root}/zero{stage}")
    assert distributed["state"]["step"] == 3 and distributed["state"]["data_position"] == 3
    assert relative_distance(distributed["model"], single["model"]) <= 1e-5
    # and training moved the weights far more than that
    torch.manual_seed(0)
    assert relative_distance(single["model"], _initial_weights(job)) > 1e-3


def _initial_weights(job) -> dict:
    from ttt.model.transformer import Transformer

    torch.manual_seed(job.train.seed)
    return Transformer(job.model).state_dict()


def test_init_from_under_zero3_loads_the_full_weights(ray_cluster, runs):
    root, common = runs
    frozen = [f"train.init_from={root}/single", "optim.lr=0", "optim.end_lr=0", "ttt.checkpoint=true"]
    job = resolve("tiny", [*common, *frozen, "scale.workers=2", "scale.zero_stage=3"])
    launch(job, "zero3-init", progress=False)
    single, started = load_checkpoint(f"{root}/single"), load_checkpoint(f"{root}/zero3-init")
    assert relative_distance(started["model"], single["model"]) == 0.0


def test_worker_failure_restarts_and_resumes_exactly(ray_cluster, runs):
    root, common = runs
    job = resolve(
        "tiny",
        [
            *common,
            "scale.workers=2",
            "scale.zero_stage=2",
            "scale.max_failures=1",
            "train.fail_at_step=2",
            "tracking.experiment=restart",
        ],
    )
    result = launch(job, "restarted", progress=False)
    assert result.steps == 3
    assert (root / "restarted" / "injected-failure-2").exists()  # the failure did happen
    single, restarted = load_checkpoint(f"{root}/single"), load_checkpoint(f"{root}/restarted")
    assert relative_distance(restarted["model"], single["model"]) <= 1e-5
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("restart").experiment_id])
    assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [0, 1, 2]


def test_more_workers_than_the_cluster_holds_fail_fast(ray_cluster, runs):
    _, common = runs
    job = resolve(
        "tiny", [*common, "scale.workers=8", "scale.cpus_per_worker=1", "train.global_batch_size=8"]
    )
    with pytest.raises(UserError, match=r"8 workers cannot be placed \(8 CPU needed, 4 in the cluster\)"):
        launch(job, "too-many", progress=False)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--workers", "2", "--zero-stage", "5"], "scale.zero_stage"),
        (["--workers", "2", "--set", "storage.root=gs://bucket/runs"], "storage.root"),
    ],
)
def test_bad_scale_input_fails_before_any_worker(args, words):
    proc = subprocess.run(
        [sys.executable, "-m", "ttt", "train", "tiny-cpu", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert words in proc.stderr and "ray" not in proc.stderr.lower()


def test_s3_data_and_sharded_checkpoints_survive_a_restart(ray_cluster, runs, s3_bucket):
    root, common = runs
    data, runs_uri = f"s3://{s3_bucket}/data/code", f"s3://{s3_bucket}/runs"
    prepare([str(ROOT / "platform" / "ttt")], data, ByteTokenizer(), val_every=5)  # as text_dataset
    local_only = [c for c in common if not c.startswith(("data.path=", "storage.root="))]
    job = resolve(
        "tiny",
        [
            *local_only,
            f"data.path={data}",
            f"storage.root={runs_uri}",
            f"tracking.uri=sqlite:///{root / 's3-mlflow.db'}",
            "scale.workers=2",
            "scale.max_failures=1",
            "train.fail_at_step=2",
        ],
    )
    result = launch(job, "on-s3", progress=False)
    assert result.last_checkpoint == f"{runs_uri}/on-s3/checkpoints/step-00000003"
    single, on_s3 = load_checkpoint(f"{root}/single"), load_checkpoint(f"{runs_uri}/on-s3")
    assert relative_distance(on_s3["model"], single["model"]) <= 1e-5

    # An upload cut off before its marker: the files are there, the checkpoint is not.
    s3 = boto3.client("s3")
    for name in ("mp_rank_00_model_states.pt", "ttt.pt"):
        s3.put_object(Bucket=s3_bucket, Key=f"runs/on-s3/checkpoints/step-00000004/{name}", Body=b"partial")
    checkpointer = Checkpointer(open_storage(f"{runs_uri}/on-s3"), keep=3)
    assert checkpointer.latest() == 3
    assert load_checkpoint(f"{runs_uri}/on-s3")["state"]["step"] == 3


def test_bf16_keeps_parameters_and_fast_weights_fp32():
    stage = 3  # partitioned parameters, gathered inside the forward: the stage where casts could hide
    # A fresh process: DeepSpeed sets up a process group, which must not leak into the other tests.
    probe = str(ROOT / "tests" / "integration" / "ds_precision_probe.py")

    def run(precision: str) -> dict:
        command = [sys.executable, probe, str(stage), precision]
        out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        return json.loads(out.strip().splitlines()[-1])

    bf16, fp32 = run("bf16"), run("fp32")
    assert bf16["params"] == ["torch.float32"] and bf16["inner"] == ["torch.float32"]
    # bf16 compute did run: the loss moved, but only by rounding
    assert bf16["loss"] != fp32["loss"] and abs(bf16["loss"] - fp32["loss"]) < 0.05
