"""Pure builders: a TTTJob (a plain dict, as the API server returns it) → the job config it runs, and the
ConfigMap and KubeRay RayJob of one attempt. No I/O here, so every manifest can be checked in tests.

Attempt N of TTTJob `x` is the RayJob and ConfigMap `x-aN` (shortened with a hash where that would not
fit KubeRay's names, see `attempt_name`). Every attempt runs under the same run name (`x-<uid prefix>`), so
it writes to the same run directory and MLflow run and resumes from the newest checkpoint there.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
from dataclasses import dataclass
from decimal import Decimal, DecimalException
from pathlib import PurePosixPath
from typing import Any

from ttt import config as cfgmod
from ttt.jobspec import SpecError, job_config, spec_field
from ttt.storage import join
from ttt.train.preemption import STOP_DIR_ENV, prestop_command
from ttt.train.report import ATTEMPT_ENV
from ttt_operator.settings import Settings

GROUP = "ttt.dev"
VERSION = "v1alpha1"
PLURAL = "tttjobs"
KIND = "TTTJob"
LABEL_JOB = "ttt.dev/job"
LABEL_ATTEMPT = "ttt.dev/attempt"
CONFIG_DIR = "/etc/ttt"
CONFIG_FILE = "job.yaml"
STOP_DIR = "/run/ttt-stop"
"""Where a Ray pod's preStop hook asks its training processes to stop (an emptyDir of its own)."""
DEFAULT_GRACE_S = 30
NAME_RULE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
"""KubeRay refuses RayJob and RayCluster names that are not DNS-1035 labels (a letter first, no dots)."""
MAX_JOB_NAME = 42
"""The CRD's limit: KubeRay allows RayJob names of 47 characters, and attempts add -aN (to attempt 999)."""
MAX_RAYJOB_NAME = 47
NAME_HASH = 10
"""Hex digits of the hash in a shortened child name: 40 bits, so two long names sharing a cut do not meet."""
AGENT_PORT = 52365
"""The Ray dashboard agent's port: KubeRay's probes and ours ask it for the node's health."""
HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}
HEAD_SHM_SHARE = 4
"""The head's /dev/shm (Ray's object store; the driver's objects only) is a quarter of its memory."""
DEFAULT_POD_SECURITY = {"fsGroup": 1000, "fsGroupChangePolicy": "OnRootMismatch"}
"""The image runs as uid 1000: fsGroup makes the runs volume group-writable for it (OnRootMismatch skips
the recursive chown of a volume that is already right)."""
STOP_MARGIN_S = 5
"""Of the pod's grace period, what the trainer leaves for its own exit and Ray's teardown."""


@dataclass(frozen=True)
class Layout:
    """What the pods look like: derived from the spec, shared by the config and the RayJob."""

    nodes: int
    gpus_per_node: int
    cpu: str
    memory: str
    shared_memory: str
    """Of a worker pod; the head has its own, below."""
    head_cpu: str
    head_memory: str
    head_shared_memory: str

    @property
    def workers_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def workers(self) -> int:
        return self.nodes * self.workers_per_node


def layout(spec: dict[str, Any]) -> Layout:
    gpus = int(spec.get("gpusPerNode", 0))
    res = spec.get("resources") or {}
    head = (spec.get("head") or {}).get("resources") or {}
    head_memory = str(head.get("memory", HEAD_RESOURCES["memory"]))
    if "sharedMemory" in head:
        head_shm = str(head["sharedMemory"])
    else:
        # /dev/shm is memory of its own pod: sized from the head's, not from the (GPU) workers'.
        head_shm = mebibytes(quantity_bytes(head_memory, "spec.head.resources.memory") / HEAD_SHM_SHARE)
    return Layout(
        nodes=int(spec.get("numNodes", 1)),
        gpus_per_node=gpus,
        # A GPU node needs CPUs to feed each GPU and host memory for the optimizer and data.
        cpu=str(res.get("cpu", 8 * gpus if gpus else 2)),
        memory=str(res.get("memory", f"{64 * gpus}Gi" if gpus else "4Gi")),
        shared_memory=str(res.get("sharedMemory", f"{8 * gpus}Gi" if gpus else "1Gi")),
        head_cpu=str(head.get("cpu", HEAD_RESOURCES["cpu"])),
        head_memory=head_memory,
        head_shared_memory=head_shm,
    )


def cpu_cores(quantity: str | int) -> float:
    """Kubernetes CPU quantity → cores ('500m' → 0.5, '1e1' → 10)."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


_QUANTITY = re.compile(
    r"^(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[eE](?P<exponent>[0-9]+)|[mkMGTPE])?$"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def quantity_bytes(quantity: str | int, field: str) -> Decimal:
    """A Kubernetes memory quantity in bytes ('8Gi', '500M', '1e9'); a SpecError naming `field` if it is none
    (one stored before the CRD checked it)."""
    match = _QUANTITY.match(str(quantity))
    if match is None:
        raise SpecError(field, f"'{quantity}' is not a Kubernetes quantity such as 8Gi, 8192Mi or 8G")
    number, suffix = Decimal(match["number"]), match["suffix"] or ""
    if match["exponent"]:
        try:
            return number.scaleb(int(match["exponent"]))
        except DecimalException:  # an exponent past Decimal's range: no memory is that large
            raise SpecError(field, f"'{quantity}' is out of range") from None
    return number * _BINARY.get(suffix, _DECIMAL.get(suffix, 1))


def mebibytes(size: Decimal) -> str:
    """Bytes as a quantity in whole Mi (at least 1Mi), in Gi or Ti when exact: 2Gi, 2384Mi."""
    mib = max(int(size // 2**20), 1)
    for unit, factor in (("Ti", 2**20), ("Gi", 2**10)):
        if mib % factor == 0:
            return f"{mib // factor}{unit}"
    return f"{mib}Mi"


def by_index(objects: list[dict[str, Any]], label: str) -> dict[int, dict[str, Any]]:
    """Owned objects keyed by the number in their `label` (an attempt, a trial); others are ignored."""
    out = {}
    for obj in objects:
        value = (obj["metadata"].get("labels") or {}).get(label, "")
        if value.isdigit():
            out[int(value)] = obj
    return out


def run_name(job: dict[str, Any]) -> str:
    """Stable across attempts, unique across re-created jobs of the same name."""
    meta = job["metadata"]
    return f"{meta['name']}-{meta['uid'].replace('-', '')[:8]}"


def child_name(base: str, suffix: str, limit: int) -> str:
    """`base + suffix` if it has at most `limit` characters. Otherwise the base is cut short and a hash of the
    whole name goes between it and the suffix (`<cut base>-<hash><suffix>`): the same inputs give the same
    name, it still starts with the base's first letter and ends with the suffix, and two long names that
    share their cut differ in the hash. A valid DNS-1035 base gives a valid DNS-1035 name."""
    name = f"{base}{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()
    room = limit - len(suffix) - NAME_HASH - 1
    if room < 1:  # a suffix (attempt number) too long to keep: the hash stands for it
        return f"{base[:1]}-{digest[: limit - 2]}"
    return f"{base[:room].rstrip('-')}-{digest[:NAME_HASH]}{suffix}"


def attempt_name(job_name: str, attempt: int) -> str:
    """The RayJob and ConfigMap of an attempt: `<job>-a<attempt>`, within KubeRay's 47 characters for any
    attempt (preemptions are retried without limit). The operator finds them by owner UID and attempt label,
    never by name, so a shortened name is only read, never parsed."""
    return child_name(job_name, f"-a{attempt}", MAX_RAYJOB_NAME)


def storage_root(spec: dict[str, Any], settings: Settings) -> str:
    return spec.get("storageUri") or settings.storage_uri


def storage_path(job: dict[str, Any], settings: Settings) -> str:
    return join(storage_root(job["spec"], settings), run_name(job))


# -- the job config ---------------------------------------------------------------------------------


def check_name(name: str) -> None:
    """The CRD refuses such names; a TTTJob created before that rule would otherwise never run."""
    if not NAME_RULE.match(name) or len(name) > MAX_JOB_NAME:
        raise SpecError(
            "metadata.name",
            f"'{name}' cannot name a KubeRay RayJob: use at most {MAX_JOB_NAME} lowercase letters, digits "
            "and '-', starting with a letter and ending with a letter or digit",
        )


def check_storage(spec: dict[str, Any], settings: Settings) -> None:
    """A local storageUri must be on the runs volume: anywhere else in a Ray pod is the container's own disk,
    and the run (its checkpoints too) would go with the pod."""
    uri = spec.get("storageUri")
    if not uri or uri.startswith("s3://"):
        return
    # Normalised first: /runs/../tmp is not on the volume.
    if not PurePosixPath(posixpath.normpath(uri)).is_relative_to(settings.runs_mount):
        raise SpecError(
            "spec.storageUri",
            f"'{uri}' is outside the runs volume, mounted at '{settings.runs_mount}' in the Ray pods: a run "
            "there would be lost with its pod; use a path under the mount or s3://bucket/prefix",
        )


def render_config(job: dict[str, Any], settings: Settings) -> cfgmod.JobConfig:
    """The spec's job config (recipe, config, overrides, knobs), then what the platform decides."""
    check_name(job["metadata"]["name"])
    spec = job["spec"]
    check_storage(spec, settings)
    data = job_config(spec).to_dict()
    shape = layout(spec)
    gpus = shape.gpus_per_node > 0
    data["scale"].update(
        workers=shape.workers,
        gpus_per_worker=1.0 if gpus else 0.0,
        # One worker per GPU (per pod on CPU) with that share of the pod's CPUs, so that Ray places
        # exactly `workers_per_node` workers on each worker pod.
        cpus_per_worker=max(cpu_cores(shape.cpu) / shape.workers_per_node, 0.5),
        ray_address="auto",
    )
    stage = (spec.get("deepspeed") or {}).get("stage")
    if stage is not None:
        data["scale"]["zero_stage"] = stage
    data["train"]["device"] = "cuda" if gpus else "cpu"
    data["train"]["stop_grace_s"] = grace_seconds(spec) - STOP_MARGIN_S
    mlflow = spec.get("mlflow") or {}
    root = data["storage"]["root"] = storage_root(spec, settings)
    # Every Ray pod mounts the runs volume at the same path: a local root there is shared by the nodes.
    on_volume = PurePosixPath(root).is_relative_to(settings.runs_mount)
    data["storage"]["shared"] = bool(settings.runs_pvc) and not root.startswith("s3://") and on_volume
    data["tracking"].update(
        uri=mlflow.get("trackingUri") or settings.mlflow_tracking_uri or data["tracking"]["uri"],
        experiment=mlflow.get("experiment", "ttt-e2e"),
        run_name=run_name(job),
    )
    try:
        return cfgmod.JobConfig.from_dict(data)
    except cfgmod.ConfigError as exc:
        raise SpecError(spec_field(exc.field), exc.message) from None


def grace_seconds(spec: dict[str, Any]) -> int:
    return int(spec.get("terminationGracePeriodSeconds") or DEFAULT_GRACE_S)


# -- manifests --------------------------------------------------------------------------------------


def owner_reference(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(job: dict[str, Any], attempt: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "ttt",
        "app.kubernetes.io/managed-by": "ttt-operator",
        LABEL_JOB: job["metadata"]["name"],
        LABEL_ATTEMPT: str(attempt),
    }


def _metadata(job: dict[str, Any], attempt: int, extra_labels: dict[str, str] | None = None) -> dict:
    return {
        "name": attempt_name(job["metadata"]["name"], attempt),
        "namespace": job["metadata"]["namespace"],
        "labels": {**(extra_labels or {}), **_labels(job, attempt)},
        "ownerReferences": [owner_reference(job)],
    }


def config_map(job: dict[str, Any], attempt: int, cfg: cfgmod.JobConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, attempt),
        "data": {CONFIG_FILE: cfgmod.to_yaml(cfg)},
    }


def entrypoint(cfg: cfgmod.JobConfig) -> str:
    run = cfg.tracking.run_name or "run"
    return shlex.join(
        ["python", "-m", "ttt", "train", f"{CONFIG_DIR}/{CONFIG_FILE}", "--run-name", run, "--no-progress"]
    )


def _env(spec: dict, role: dict, settings: Settings, gpus: bool, attempt: int) -> tuple[list, list]:
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # The run's progress.json names its attempt (so a preempted end is matched to this RayJob), and
        # the preStop hook reaches the training processes through STOP_DIR.
        {"name": ATTEMPT_ENV, "value": str(attempt)},
        {"name": STOP_DIR_ENV, "value": STOP_DIR},
    ]
    if not gpus:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})  # DeepSpeed would look for CUDA
    if settings.s3_endpoint_url:
        env += [
            {"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint_url},
            {"name": "MLFLOW_S3_ENDPOINT_URL", "value": settings.s3_endpoint_url},
        ]
    # The spec's env, then the pod role's, each replacing a variable of the same name (the CRD keeps
    # the ones the operator needs out of reach): one entry per name, as the kubelet would pick the last.
    merged = {e["name"]: e for e in [*env, *(spec.get("env") or []), *(role.get("env") or [])]}
    env_from = [{"secretRef": {"name": settings.s3_secret}}] if settings.s3_secret else []
    return list(merged.values()), env_from + list(spec.get("envFrom") or [])


def _probes(settings: Settings, head: bool) -> dict[str, dict]:
    """KubeRay before 1.6 (or with Ray before 2.53) gives a Ray container without probes ones that run
    `wget`, which the image lacks; it keeps the container's own. HTTP probes need nothing in the image."""
    version = tuple(int(p) for p in re.findall(r"\d+", settings.ray_version)[:2])
    # Ray 2.53+ answers /api/healthz for the raylet and, on the head, the GCS (what KubeRay 1.6 asks).
    path = "/api/healthz" if version >= (2, 53) else "/api/local_raylet_healthz"
    timeout = 5 if head else 2  # KubeRay's timings
    check = {"httpGet": {"path": path, "port": AGENT_PORT}, "timeoutSeconds": timeout, "periodSeconds": 5}
    return {
        "livenessProbe": {**check, "initialDelaySeconds": 30, "failureThreshold": 120},
        "readinessProbe": {**check, "initialDelaySeconds": 10, "failureThreshold": 10},
    }


def _volumes(attempt_cm: str, shm: str, settings: Settings, root: str) -> tuple[list, list]:
    volumes = [
        {"name": "job-config", "configMap": {"name": attempt_cm}},
        # /dev/shm is 64Mi in a container by default: too small for NCCL and data loader workers.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        {"name": "stop", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    mounts = [
        {"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "stop", "mountPath": STOP_DIR},
    ]
    if settings.runs_pvc and not root.startswith("s3://"):
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": settings.runs_pvc}})
        mounts.append({"name": "runs", "mountPath": settings.runs_mount})
    return volumes, mounts


def _pod_template(
    job: dict, role: str, resources: dict, settings: Settings, shape: Layout, root: str, attempt: int
) -> dict[str, Any]:
    spec = job["spec"]
    group = spec.get(role) or {}
    cm = attempt_name(job["metadata"]["name"], attempt)
    env, env_from = _env(spec, group, settings, shape.gpus_per_node > 0, attempt)
    shm = shape.head_shared_memory if role == "head" else shape.shared_memory
    volumes, mounts = _volumes(cm, shm, settings, root)
    grace = grace_seconds(spec)
    container: dict[str, Any] = {
        "name": f"ray-{role}",
        "image": spec.get("image") or settings.default_image,
        "resources": {"requests": resources, "limits": resources},
        "env": env,
        "volumeMounts": mounts,
        # Preemption, eviction, drain or deletion: the hook asks the pod's training processes to stop
        # after a checkpoint and waits for them (Kubernetes sends SIGTERM to Ray only after it).
        "lifecycle": {"preStop": {"exec": {"command": prestop_command(STOP_DIR, grace - 2)}}},
        **_probes(settings, role == "head"),
    }
    if env_from:
        container["envFrom"] = env_from
    if spec.get("imagePullPolicy"):
        container["imagePullPolicy"] = spec["imagePullPolicy"]
    if group.get("capabilities"):
        # e.g. IPC_LOCK: RDMA (EFA, InfiniBand) pins the memory NCCL registers.
        container["securityContext"] = {"capabilities": {"add": list(group["capabilities"])}}
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": grace,
        "securityContext": {**DEFAULT_POD_SECURITY, **(spec.get("securityContext") or {})},
    }
    # Placement is per role: the head (CPU only, no training) does not follow the workers to GPU nodes.
    for key in ("nodeSelector", "tolerations", "affinity"):
        if group.get(key):
            pod[key] = group[key]
    for key in ("priorityClassName", "serviceAccountName"):
        if spec.get(key):
            pod[key] = spec[key]
    pull = spec.get("imagePullSecrets") or [{"name": n} for n in settings.image_pull_secrets]
    if pull:
        pod["imagePullSecrets"] = pull
    return {"metadata": {"labels": {LABEL_JOB: job["metadata"]["name"]}}, "spec": pod}


def ttl_seconds(spec: dict[str, Any], settings: Settings) -> int:
    value = spec.get("ttlSecondsAfterFinished")
    return settings.rayjob_ttl_seconds if value is None else int(value)


def ray_job(job: dict[str, Any], attempt: int, cfg: cfgmod.JobConfig, settings: Settings) -> dict:
    spec = job["spec"]
    shape = layout(spec)
    root = storage_root(spec, settings)
    worker_res = {"cpu": shape.cpu, "memory": shape.memory}
    if shape.gpus_per_node:
        worker_res["nvidia.com/gpu"] = str(shape.gpus_per_node)
    # Accelerator networks (vpc.amazonaws.com/efa, rdma/hca, ...): device-plugin resources of the workers,
    # and huge pages; quantities as given (an integer from YAML becomes the string Kubernetes writes).
    for name, amount in ((spec.get("worker") or {}).get("extraResources") or {}).items():
        worker_res[name] = str(amount)
    head_res = {"cpu": shape.head_cpu, "memory": shape.head_memory}
    group = "gpu-workers" if shape.gpus_per_node else "cpu-workers"
    body: dict[str, Any] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(job, attempt, spec.get("labels")),
        "spec": {
            "entrypoint": entrypoint(cfg),
            "submissionMode": "K8sJobMode",
            # One Ray cluster per attempt, torn down when the job ends; retries are the operator's. KubeRay
            # deletes it ttlSecondsAfterFinished later: until then its pods' logs can be read.
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl_seconds(spec, settings),
            "backoffLimit": 0,
            "rayClusterSpec": {
                "rayVersion": settings.ray_version,
                "headGroupSpec": {
                    # The head runs the driver only: no training worker may land there.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod_template(job, "head", head_res, settings, shape, root, attempt),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": group,
                        "replicas": shape.nodes,
                        "minReplicas": shape.nodes,
                        "maxReplicas": shape.nodes,
                        "rayStartParams": {},
                        "template": _pod_template(job, "worker", worker_res, settings, shape, root, attempt),
                    }
                ],
            },
        },
    }
    if spec.get("activeDeadlineSeconds"):
        body["spec"]["activeDeadlineSeconds"] = spec["activeDeadlineSeconds"]
    return body
