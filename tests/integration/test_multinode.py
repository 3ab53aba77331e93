"""Multi-node drills: a Ray head on one network host and a second Ray node on another
(tests.integration.hosts), moto S3 and an MLflow server on the first, reachable from both. `ttt train
--workers 2` runs as a RayJob's driver runs it, on the head's host, with one worker on each node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from tests.integration.drills import train_command
from tests.integration.faults import MlflowServer
from tests.integration.hosts import INTERFACE, Host, two_hosts
from tests.integration.services import BIN, TINY
from tests.integration.test_distributed import relative_distance
from ttt.config import resolve
from ttt.storage import open_storage
from ttt.train.checkpoint import Checkpointer, load_checkpoint
from ttt.train.trainer import Trainer

pytestmark = pytest.mark.slow

BUCKET = "drills"
S3_PORT, RAY_PORT = 9000, 6379
TOTAL = 12
COMMON = [
    f"train.total_steps={TOTAL}",
    "train.checkpoint_every=2",
    "train.global_batch_size=4",
    "train.eval_batch_size=2",
    "train.report_every_s=0",
    "tracking.experiment=multinode",
]
RUNS = f"s3://{BUCKET}/runs"


@dataclass
class TwoHosts:
    a: Host
    b: Host
    base: Path
    env: dict[str, str]
    mlflow: MlflowServer
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    temp_dirs: list[str] = field(default_factory=list)

    @property
    def ray_address(self) -> str:
        return f"{self.a.address}:{RAY_PORT}"

    def start_ray_node(self, host: Host, name: str, *args: str) -> None:
        log = self.base / f"{name}.log"
        command = [str(BIN / "ray"), "start", f"--node-ip-address={host.address}", "--num-cpus=2"]
        command += ["--object-store-memory=200000000", "--disable-usage-stats"]
        # A short folder of its own per node: Ray's socket paths must fit in 107 bytes.
        temp = tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp")
        self.temp_dirs.append(temp)
        command += [f"--temp-dir={temp}", "--block", *args]
        self.procs[name] = host.popen(command, log, self.env)
        deadline = time.monotonic() + 90
        began = time.monotonic()
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        print(f"\nRay node {name} started in {time.monotonic() - began:.1f} s")

    def train(self, run_name: str, *overrides: str) -> subprocess.Popen:
        sets = [
            *COMMON,
            f"scale.ray_address={self.ray_address}",
            f"tracking.uri={self.mlflow.uri}",
            *overrides,
        ]
        command = [*train_command(run_name, *sets), "--workers", "2"]
        return self.a.popen(command, self.base / f"{run_name}.log", self.env)

    def finish(self, proc: subprocess.Popen, run_name: str, seconds: float = 300) -> str:
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
        log = (self.base / f"{run_name}.log").read_text(errors="replace")
        assert proc.returncode == 0, f"{run_name} exited with {proc.returncode}:\n{log[-4000:]}"
        return log

    def s3(self):
        env = self.env
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )

    def progress(self, run_name: str) -> dict:
        def read() -> dict:
            try:
                body = self.s3().get_object(Bucket=BUCKET, Key=f"runs/{run_name}/progress.json")["Body"]
                return json.loads(body.read())
            except Exception:  # not written yet, or caught mid-write
                return {}

        return self.a.call(read)

    def on_s3(self, fn, *args):
        """`fn(*args)` on host a, with ttt.storage pointed at this S3 (it reads the AWS variables)."""
        keys = {k: v for k, v in self.env.items() if k.startswith("AWS_")}

        def call():
            saved = {k: os.environ.get(k) for k in keys}
            os.environ.update(keys)
            try:
                return fn(*args)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

        return self.a.call(call)

    def load(self, run_name: str) -> dict:
        return self.on_s3(load_checkpoint, f"{RUNS}/{run_name}")

    def complete_checkpoints(self, run_name: str) -> list[int]:
        def index() -> dict[int, str]:
            return Checkpointer(open_storage(f"{RUNS}/{run_name}"), 3).index()

        return sorted(step for step, kind in self.on_s3(index).items() if kind == "complete")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, text_dataset):
    base = tmp_path_factory.mktemp("two-hosts")
    with two_hosts() as (a, b):
        s3_endpoint = f"http://{a.address}:{S3_PORT}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
        env.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
            AWS_ENDPOINT_URL=s3_endpoint,
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            # A lost node is declared dead after 4 missed checks 0.5 s apart (Ray's default: 5 x 3 s).
            RAY_health_check_period_ms="500",
            RAY_health_check_failure_threshold="4",
            # Gloo binds the address of this interface (in a pod the hostname resolves to the pod's IP).
            GLOO_SOCKET_IFNAME=INTERFACE,
            MLFLOW_LOGGING_LEVEL="WARNING",
        )
        mlflow = MlflowServer(base / "mlflow", host=a)
        cluster = TwoHosts(a, b, base, env, mlflow)
        moto = a.popen(
            [str(BIN / "moto_server"), "-H", a.address, "-p", str(S3_PORT)], base / "moto.log", env
        )
        cluster.procs["moto"] = moto
        # The MLflow server takes most of 20 s to answer: start the Ray nodes meanwhile.
        try:
            with ThreadPoolExecutor(1) as background:
                mlflow_started = background.submit(mlflow.start)
                cluster.start_ray_node(
                    a, "ray-a", "--head", f"--port={RAY_PORT}", "--include-dashboard=false"
                )
                cluster.start_ray_node(b, "ray-b", f"--address={cluster.ray_address}")
                mlflow_started.result(timeout=120)
            _upload_dataset(cluster, Path(text_dataset))
            yield cluster
        finally:
            mlflow.stop()
            # Everything else goes with its host (two_hosts kills what runs there): no slow Ray shutdown.
            for temp in cluster.temp_dirs:
                shutil.rmtree(temp, ignore_errors=True)


def _upload_dataset(cluster: TwoHosts, folder: Path) -> None:
    """The session's text dataset, byte for byte, as the S3 dataset both hosts read."""

    def upload() -> None:
        s3 = cluster.s3()
        deadline = time.monotonic() + 30
        while True:  # moto starts in about a second
            try:
                s3.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for path in folder.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, f"data/{path.relative_to(folder)}")

    cluster.a.call(upload)


def spread(*overrides: str) -> list[str]:
    return [
        f"data.path=s3://{BUCKET}/data",
        f"storage.root={RUNS}",
        "scale.placement_strategy=STRICT_SPREAD",
        *overrides,
    ]


def zero(stage: int) -> list[str]:
    # ZeRO-3 needs the inner loop checkpointed per mini-batch; gradients are the same either way.
    return [f"scale.zero_stage={stage}", f"ttt.checkpoint={stage == 3}"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, text_dataset) -> dict:
    """The same training in one process, on local storage: what every two-host run must match."""
    root = tmp_path_factory.mktemp("one-process")
    job = resolve(
        "tiny",
        [*TINY, *COMMON, f"data.path={text_dataset}", f"storage.root={root}", "tracking.experiment=x"],
    )
    Trainer(job, "single", progress=False).fit()
    return load_checkpoint(f"{root}/single")["model"]


def test_zero2_with_one_worker_on_each_host_matches_one_process(hosts, one_process):
    name = "spread-z2"
    hosts.finish(hosts.train(name, *spread(*zero(2))), name)
    report = hosts.progress(name)
    assert report["state"] == "succeeded" and report["step"] == TOTAL
    # STRICT_SPREAD: rank 0 and rank 1 on different hosts, whichever way round.
    assert sorted(report["hosts"]) == sorted([hosts.a.address, hosts.b.address])
    assert relative_distance(hosts.load(name)["model"], one_process) <= 1e-5


def test_zero3_losing_a_host_mid_run_resumes_from_its_newest_checkpoint_in_the_same_mlflow_run(
    hosts, one_process
):
    """Every Ray process of host b is killed after the first checkpoint; a new node joins on that host, and
    Ray Train's restarted worker group (one worker per node again) resumes from S3. The result is the
    uninterrupted training's: the one-process run's, which the ZeRO-2 drill matches too."""
    name = "node-lost"
    proc = hosts.train(name, *spread(*zero(3), "scale.max_failures=1"))
    deadline = time.monotonic() + 240
    while not ((seen := hosts.progress(name)).get("state") == "running" and seen.get("last_checkpoint")):
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the run ended before its first checkpoint"
        )
        time.sleep(0.05)
    killed = hosts.b.power_off()
    lost_at = time.monotonic()
    hosts.procs["ray-b"].wait(timeout=30)
    newest = hosts.complete_checkpoints(name)[-1]  # what a restart can resume from
    assert newest < TOTAL, "host b was lost after the end: nothing was interrupted"
    hosts.start_ray_node(hosts.b, "ray-b-again", f"--address={hosts.ray_address}")
    hosts.finish(proc, name)
    resumed_in = time.monotonic() - lost_at

    report = hosts.progress(name)
    assert report["state"] == "succeeded" and report["step"] == TOTAL
    assert sorted(report["hosts"]) == sorted([hosts.a.address, hosts.b.address])
    assert relative_distance(hosts.load(name)["model"], one_process) <= 1e-5

    client = MlflowClient(f"sqlite:///{hosts.mlflow.base / 'mlflow.db'}")
    run = client.get_run(report["mlflow_run_id"])
    assert run.info.run_id == seen["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["ttt.resumed_from"] == f"{RUNS}/{name}/checkpoints/step-{newest:08d}"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(TOTAL)), "a step's loss was lost or logged twice"
    print(
        f"\nnode-loss drill: rank 0 on {report['hosts'][0]}; {killed} processes of host b killed after step "
        f"{seen['step']}; resumed from step {newest}; done {resumed_in:.0f} s after the loss"
    )


def test_a_local_storage_root_is_refused_on_two_nodes(hosts):
    local = hosts.base / "local-runs"
    proc = hosts.train("local", f"data.path=s3://{BUCKET}/data", f"storage.root={local}")
    proc.wait(timeout=120)
    out = (hosts.base / "local.log").read_text()
    assert proc.returncode == 2 and "Traceback" not in out, out
    [line] = [line for line in out.splitlines() if line.startswith("ttt:")]
    assert "storage.root" in line and "2 nodes" in line and "storage.shared=true" in line
    assert not local.exists()  # refused before anything was written
