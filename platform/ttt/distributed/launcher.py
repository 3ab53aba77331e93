"""Ray Train launcher: `scale.workers` processes each run the same `Trainer`, with its rank.

Locally it starts a Ray cluster on this machine; inside a KubeRay RayJob (`scale.ray_address: auto`) it
joins the existing one. Worker failures restart the whole worker group (up to `scale.max_failures`), and
the restarted trainers resume from the newest complete checkpoint in the run directory, in the same MLflow
run. Rank 0 alone logs to MLflow and prints progress. A SIGTERM or SIGINT to the driver (or its pod's
preStop) asks the workers to stop after a checkpoint (ttt.train.preemption).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ttt.config import JobConfig, ScaleConfig
from ttt.data.streams import BUNDLED
from ttt.errors import UserError
from ttt.eval.position import EvalResult
from ttt.storage import join, open_storage
from ttt.tracking.logger import default_tracking_uri
from ttt.train.preemption import forward_to_workers
from ttt.train.trainer import InjectedFailure, RunResult, Trainer

RESULT_FILE = "ttt-result.json"


def absolute_paths(job: JobConfig) -> JobConfig:
    """Workers need not share the driver's working directory: make local paths absolute."""

    def local(path: str) -> bool:
        return "://" not in path and not path.startswith(BUNDLED)

    storage = job.storage
    if local(storage.root):
        storage = dataclasses.replace(storage, root=str(Path(storage.root).resolve()))
    data = job.data
    if local(data.path):
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    tracking = dataclasses.replace(job.tracking, uri=job.tracking.uri or default_tracking_uri(storage.root))
    return dataclasses.replace(job, storage=storage, data=data, tracking=tracking)


def local_only_ray() -> None:
    """Keep a private Ray cluster on loopback: Ray's single-machine mode, read when Ray is imported
    (otherwise it binds every interface and advertises the machine's routable address)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def ensure_ray(scale: ScaleConfig) -> None:
    address = scale.ray_address or os.environ.get("RAY_ADDRESS")  # KubeRay sets RAY_ADDRESS for a RayJob
    if not address:
        local_only_ray()
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        # A private cluster on this machine, reachable on loopback only.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1")


def worker_resources(scale: ScaleConfig) -> dict[str, float]:
    gpu = {"GPU": scale.gpus_per_worker} if scale.gpus_per_worker else {}
    return {"CPU": scale.cpus_per_worker, **gpu, **scale.resources_per_worker}


def check_placement(scale: ScaleConfig) -> None:
    """Fail now, with the numbers, if the cluster cannot hold the workers (instead of waiting forever)."""
    import ray

    total = ray.cluster_resources()
    short = {
        name: (amount * scale.workers, total.get(name, 0.0))
        for name, amount in worker_resources(scale).items()
        if amount * scale.workers > total.get(name, 0.0)
    }
    if short:
        detail = ", ".join(
            f"{need:g} {name} needed, {have:g} in the cluster" for name, (need, have) in short.items()
        )
        raise UserError(f"scale.workers: {scale.workers} workers cannot be placed ({detail})")


def check_shared_storage(job: JobConfig) -> None:
    """A local storage.root on a Ray cluster of several nodes: each node would write its checkpoint shards
    (and the driver its stop marker) to its own disk, and a restarted worker group could not resume."""
    import ray

    root = job.storage.root
    if root.startswith("s3://") or job.storage.shared:
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1:
        raise UserError(
            f"storage.root: '{root}' is a local path, but the Ray cluster has {len(nodes)} nodes, each "
            "with its own disk: use s3://bucket/prefix, or set storage.shared=true if every node mounts "
            "it (a ReadWriteMany volume)"
        )


def _worker_hosts(rank: int) -> list[str]:
    """Each rank's node address, as every rank sees them: MLflow and progress.json say where it ran."""
    import ray
    import torch.distributed as dist

    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, ray.util.get_node_ip_address())
    return [str(host) for host in hosts]


def _report(metrics: dict, payload: dict | None, rank: int) -> None:
    """Every rank reports (Ray Train requires it); rank 0 attaches a small checkpoint with `payload`."""
    import ray.train

    if rank != 0 or payload is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / RESULT_FILE).write_text(json.dumps(payload))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _worker(config: dict) -> None:
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    job = JobConfig.from_dict(config["job"])
    trainer = Trainer(
        job,
        config["run_name"],
        rank=rank,
        world_size=context.get_world_size(),
        progress=config["progress"],
        stop_token=config["stop_token"],
        hosts=_worker_hosts(rank),
        # Ray Train hears of each complete checkpoint; the checkpoint itself stays in the run directory,
        # where a restarted trainer finds the newest complete one.
        on_checkpoint=lambda step, uri: _report({"step": step}, {"checkpoint": uri, "step": step}, rank),
    )
    try:
        result = trainer.fit()
    except InjectedFailure as exc:
        print(f"{exc}: killing worker {rank}", flush=True)
        os._exit(1)  # a dead process, as after a node loss, not a Python exception
    # Ray Train keeps reported metrics only alongside a checkpoint: the run's summary travels as one.
    _report({"steps": result.steps}, {"result": dataclasses.asdict(result)}, rank)


def _in_thread(fit: Callable[[], Any]) -> Any:
    """Ray Train's fit() takes SIGINT for an abort when it runs in the main thread; run there, it would
    kill the workers before their checkpoint. In a thread it leaves the signals to us."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fit()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, name="ttt-ray-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # the main thread stays free to take signals
    if "error" in out:
        raise out["error"]
    return out["value"]


def launch(job: JobConfig, run_name: str, progress: bool = True) -> RunResult:
    job = absolute_paths(job)
    # Read by the processes of a cluster started here (a RayJob's pods get them from the operator):
    # forwarded worker output only once, and a bounded wait for the worker group to be placed.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(job.scale.placement_timeout_s))
    ensure_ray(job.scale)  # first: it decides how Ray is imported
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_placement(job.scale)
    check_shared_storage(job)
    use_gpu = job.scale.gpus_per_worker > 0
    ray_dir = job.storage.root.rstrip("/") + "/_ray"
    token = uuid.uuid4().hex[:16]  # names this driver's stop marker: an older driver's cannot stop this one
    config = {"job": job.to_dict(), "run_name": run_name, "progress": progress, "stop_token": token}
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=job.scale.workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_resources(job.scale),
            placement_strategy=job.scale.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=ray_dir,
            failure_config=FailureConfig(max_failures=job.scale.max_failures),
        ),
    )
    try:
        with forward_to_workers(open_storage(join(job.storage.root, run_name)), token):
            outcome = _in_thread(trainer.fit)
    except Exception as exc:
        raise UserError(f"distributed run {run_name} failed: {str(exc).splitlines()[0]}") from None
    if outcome.checkpoint is None:
        raise UserError(f"distributed run {run_name} ended without a result")
    with outcome.checkpoint.as_directory() as folder:
        data = json.loads((Path(folder) / RESULT_FILE).read_text())["result"]
    for key in ("final_eval", "final_eval_no_ttt"):
        data[key] = EvalResult(**data[key]) if data[key] else None
    return RunResult(**data)
