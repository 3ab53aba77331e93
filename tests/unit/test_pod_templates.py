"""What a real GPU cluster needs of the Ray pods a TTTJob renders: probes the image can run whatever KubeRay
adds, pod customisation (placement per role, identity, env, accelerator network, fsGroup) from the spec
through the CRD into KubeRay's RayJob, child names KubeRay takes, and finished attempts' pods kept long
enough to read their logs."""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex

import jsonschema
import pytest
import yaml

from tests.helpers import DATA, ROOT
from tests.kube.crdschema import admit, prune
from ttt.errors import UserError
from ttt_operator import builders, sweeps
from ttt_operator.builders import SpecError
from ttt_operator.settings import Settings

CRDS = ROOT / "charts" / "ttt-platform" / "crds"
CRD = yaml.safe_load((CRDS / "tttjobs.ttt.dev.yaml").read_text())
SWEEP_CRD = yaml.safe_load((CRDS / "tttsweeps.ttt.dev.yaml").read_text())
RAYJOB_CRD = yaml.safe_load((DATA / "kuberay" / "ray.io_rayjobs.yaml").read_text())
RAYJOB_SCHEMA = next(v for v in RAYJOB_CRD["spec"]["versions"] if v["name"] == "v1")["schema"][
    "openAPIV3Schema"
]
# One validator: jsonschema.validate would check the (large) schema itself again on every call.
RAYJOB_VALIDATOR = jsonschema.validators.validator_for(RAYJOB_SCHEMA)(RAYJOB_SCHEMA)
EXAMPLES = ROOT / "jobs" / "examples"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
SETTINGS = Settings(
    default_image="registry.example/ttt:test", runs_pvc="ttt-runs", s3_secret="s3-credentials"
)
UID = "0a1b2c3d-0000-4000-8000-000000000001"


def load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


def stored(doc: dict) -> dict:
    """Through the CRD's admission (defaults, pruning, checks), plus what the API server fills in."""
    out, errors = admit(CRD, doc)
    assert errors == [], errors
    out["metadata"].update(namespace="research", uid=UID, generation=1)
    return out


def render(job: dict, settings: Settings = SETTINGS, attempt: int = 1) -> dict:
    rayjob = builders.ray_job(job, attempt, builders.render_config(job, settings), settings)
    RAYJOB_VALIDATOR.validate(rayjob)
    assert admit(RAYJOB_CRD, rayjob)[1] == []
    assert prune(RAYJOB_CRD, rayjob) == rayjob  # no field the API server would drop unseen
    return rayjob


def pods(rayjob: dict) -> tuple[dict, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]


# -- 3: probes --------------------------------------------------------------------------------------

# Programs of the Ubuntu base image (coreutils, bash, dash, grep, ...), and the apt package that brings each
# other program a pod might exec. A program in neither is not in the image.
BASE_PROGRAMS = {"sh", "bash", "grep", "cat", "ls", "mkdir", "touch", "sleep", "[", "test", "echo", "kill"}
PROGRAM_PACKAGE = {"python": "python-is-python3", "python3": "python3", "curl": "curl", "wget": "wget"}
SHELL_WORDS = {"while", "until", "do", "done", "if", "then", "else", "fi", "!", "{", "}"}


def dockerfile_packages() -> set[str]:
    """The packages `apt-get install` puts into the image."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = set()
    for match in re.finditer(r"apt-get install ([^&\n]*)", text):
        found |= {word for word in match.group(1).split() if not word.startswith("-")}
    return found


def programs(command: list[str]) -> set[str]:
    """The programs an exec command runs, looking into `sh -c` / `bash -c` scripts."""
    if command[0] in ("sh", "bash") and len(command) >= 3 and command[1] == "-c":
        script = re.sub(r"\d*[<>]&?[^\s;|&]*", " ", command[2])  # redirections: 2>&1, >/dev/null
        found = {command[0]}
        for part in re.split(r"&&|\|\||[;|\n]", script):
            words = [w for w in shlex.split(part) if w not in SHELL_WORDS and not re.match(r"^\w+=", w)]
            if words:
                found.add(words[0])
        return found
    return {command[0]}


def with_kuberay_probes(container: dict, head: bool) -> dict:
    """What KubeRay 1.1-1.5 (and later ones with Ray before 2.53) does to a Ray container: the probes it
    lacks become `bash -c` wget checks of the raylet (and on the head the GCS); its own are kept
    (ray-operator/controllers/ray/common/pod.go, initLivenessAndReadinessProbe)."""
    wget = "wget --tries 1 -T 2 -q -O- http://localhost:{}/{} | grep success"
    checks = [wget.format(52365, "api/local_raylet_healthz")]
    if head:
        checks.append(wget.format(8265, "api/gcs_healthz"))
    out = copy.deepcopy(container)
    for probe in ("livenessProbe", "readinessProbe"):
        out.setdefault(probe, {"exec": {"command": ["bash", "-c", " && ".join(checks)]}})
    return out


def exec_commands(container: dict) -> list[list[str]]:
    hooks = [container.get(p) or {} for p in ("livenessProbe", "readinessProbe", "startupProbe")]
    hooks += list((container.get("lifecycle") or {}).values())
    return [h["exec"]["command"] for h in hooks if "exec" in h]


def test_the_image_check_knows_what_the_image_has():
    """The two halves of the probe test: the Dockerfile's packages, and the programs of a command."""
    packages = dockerfile_packages()
    assert {"python3", "python-is-python3", "curl", "tini"} <= packages and "wget" not in packages
    assert programs(["bash", "-c", "wget -T 2 -q -O- http://localhost:1/x | grep success"]) == {
        "bash",
        "wget",
        "grep",
    }
    hook = builders.prestop_command(builders.STOP_DIR, 28)
    assert programs(hook) == {"sh", "mkdir", "touch", "[", "ls", "sleep"}


@pytest.mark.parametrize("name", ["tiny-cpu", "125m-pretrain-8k", "760m-ext-32k"])
def test_ray_pods_probe_with_nothing_the_image_lacks(name):
    """KubeRay adds wget probes to a Ray container without probes, and the image has no wget: the pods
    would never become ready. Every probe and hook, after KubeRay, runs only programs the image has."""
    packages = dockerfile_packages()
    head, worker = pods(render(stored(load(name))))
    for pod, is_head in ((head, True), (worker, False)):
        (container,) = pod["containers"]
        for command in exec_commands(with_kuberay_probes(container, is_head)):
            for program in programs(command):
                assert program in BASE_PROGRAMS or PROGRAM_PACKAGE.get(program) in packages, (
                    program,
                    command,
                )
        for probe in ("livenessProbe", "readinessProbe"):
            # The dashboard agent answers for the raylet and, on the head, the GCS (Ray 2.53+).
            assert container[probe]["httpGet"] == {"path": "/api/healthz", "port": 52365}


def test_probes_of_an_older_ray_ask_the_raylet_endpoint_it_has():
    old = dataclasses.replace(SETTINGS, ray_version="2.40.0")
    head, worker = pods(render(stored(load("tiny-cpu")), old))
    for pod in (head, worker):
        assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/api/local_raylet_healthz"


# -- 4: examples take the chart's image ---------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_examples_take_the_charts_image(path):
    """An example that names an image runs that one, not the image the chart was installed with."""
    for doc in yaml.safe_load_all(path.read_text()):
        spec = doc["spec"].get("template", doc["spec"])
        assert "image" not in spec, f"{path.name} sets spec image {spec['image']}"


# -- 5: pod customisation -----------------------------------------------------------------------------

GPU_CLUSTER = {
    "serviceAccountName": "ttt-s3-writer",
    "priorityClassName": "training-high",
    "imagePullSecrets": [{"name": "registry-creds"}],
    "securityContext": {"runAsUser": 1000, "runAsNonRoot": True},
    "env": [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "AWS_ENDPOINT_URL", "value": "https://s3.eu-west-1.amazonaws.com"},
    ],
    "envFrom": [{"configMapRef": {"name": "cluster-env"}}],
    "head": {
        "nodeSelector": {"pool": "cpu"},
        "resources": {"cpu": "4", "memory": "16Gi"},
        "env": [{"name": "RAY_LOG_LEVEL", "value": "debug"}],
    },
    "worker": {
        "nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"a": "b"}}}
                ]
            }
        },
        "env": [
            {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"},
            {"name": "FI_PROVIDER", "value": "efa"},
            {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        ],
        "extraResources": {"vpc.amazonaws.com/efa": 32, "rdma/hca": "1"},
        "capabilities": ["IPC_LOCK"],
    },
}


def gpu_job() -> dict:
    job = load("760m-ext-32k")
    job["spec"].update(copy.deepcopy(GPU_CLUSTER))
    return stored(job)


def env_of(container: dict) -> dict[str, dict]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), names  # one entry per name
    return {e["name"]: e for e in container["env"]}


def test_pod_customisation_reaches_the_right_pods():
    settings = dataclasses.replace(SETTINGS, s3_endpoint_url="http://minio:9000")
    head, worker = pods(render(gpu_job(), settings))
    for pod in (head, worker):
        assert pod["serviceAccountName"] == "ttt-s3-writer" and pod["priorityClassName"] == "training-high"
        assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]
        # The spec's security context over the default fsGroup that lets uid 1000 write the runs volume.
        assert pod["securityContext"] == {
            "fsGroup": 1000,
            "fsGroupChangePolicy": "OnRootMismatch",
            "runAsUser": 1000,
            "runAsNonRoot": True,
        }
        (container,) = pod["containers"]
        env = env_of(container)
        assert env["HF_HUB_OFFLINE"]["value"] == "1" and env["TTT_ATTEMPT"]["value"] == "1"
        assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.eu-west-1.amazonaws.com"  # the spec's wins
        assert container["envFrom"] == [
            {"secretRef": {"name": "s3-credentials"}},
            {"configMapRef": {"name": "cluster-env"}},
        ]

    # The head: its own placement and size, nothing of the workers' GPU nodes.
    assert head["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in head and "affinity" not in head
    (head_container,) = head["containers"]
    assert head_container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    assert "RAY_LOG_LEVEL" in env_of(head_container) and "NCCL_SOCKET_IFNAME" not in env_of(head_container)
    assert "securityContext" not in head_container

    # The workers: GPU nodes, the accelerator network's devices, NCCL's env and the capability RDMA needs.
    wanted = GPU_CLUSTER["worker"]
    assert worker["nodeSelector"] == wanted["nodeSelector"] and worker["tolerations"] == wanted["tolerations"]
    assert worker["affinity"] == wanted["affinity"]
    (container,) = worker["containers"]
    assert container["resources"]["limits"] == container["resources"]["requests"]
    assert container["resources"]["limits"] == {
        "cpu": "96",
        "memory": "1500Gi",
        "nvidia.com/gpu": "8",
        "vpc.amazonaws.com/efa": "32",
        "rdma/hca": "1",
    }
    env = env_of(container)
    assert env["NCCL_SOCKET_IFNAME"]["value"] == "eth0" and "RAY_LOG_LEVEL" not in env
    assert env["NODE_IP"] == {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
    assert container["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}


def test_pod_defaults_pull_secrets_from_the_operator_and_keep_the_head_off_gpu_nodes():
    settings = dataclasses.replace(SETTINGS, image_pull_secrets=("chart-pull", "mirror-pull"))
    head, worker = pods(render(stored(load("125m-pretrain-8k")), settings))
    for pod in (head, worker):
        assert pod["imagePullSecrets"] == [{"name": "chart-pull"}, {"name": "mirror-pull"}]
        assert pod["securityContext"] == builders.DEFAULT_POD_SECURITY
        assert not {"nodeSelector", "tolerations", "affinity", "serviceAccountName"} & set(pod)
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert "imagePullSecrets" not in pods(render(stored(load("tiny-cpu")), Settings()))[0]
    env = {"TTT_IMAGE_PULL_SECRETS": " chart-pull, mirror-pull ,", "TTT_RAYJOB_TTL_SECONDS": ""}
    assert Settings.from_env(env).image_pull_secrets == ("chart-pull", "mirror-pull")


def test_sweep_trials_carry_the_pod_customisation():
    doc = load("sweep-125m-h100")
    doc["spec"]["template"].update(copy.deepcopy(GPU_CLUSTER))
    sweep, errors = admit(SWEEP_CRD, doc)
    assert errors == []
    sweep["metadata"].update(namespace="research", uid="sweep-uid", generation=1)
    _, expansion = sweeps.trials_of(sweep)
    trial = sweeps.trial_job(sweep, expansion.trials[0])
    job = stored(trial)
    for key, value in GPU_CLUSTER.items():
        assert job["spec"][key] == value, key
    _, worker = pods(render(job))
    assert worker["containers"][0]["resources"]["limits"]["vpc.amazonaws.com/efa"] == "32"


BAD_POD_FIELDS = [
    ({"env": [{"name": "TTT_ATTEMPT", "value": "9"}]}, "spec.env[0]"),
    ({"worker": {"env": [{"name": "TTT_STOP_DIR", "value": "/tmp"}]}}, "spec.worker.env[0]"),
    ({"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]}, "spec.env[0]"),
    ({"env": [{"value": "1"}]}, "spec.env[0].name"),
    ({"env": [{"name": "has space", "value": "1"}]}, "spec.env[0].name"),
    ({"envFrom": [{"prefix": "X_"}]}, "spec.envFrom[0]"),
    ({"worker": {"tolerations": [{"key": "k", "operator": "In"}]}}, "spec.worker.tolerations[0].operator"),
    (
        {"worker": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
        "spec.worker.tolerations[0]",
    ),
    ({"worker": {"tolerations": {"key": "k"}}}, "spec.worker.tolerations"),
    # The Pod API's rules: a Ray pod that breaks them would be refused after the RayJob was created.
    ({"worker": {"tolerations": [{"key": "k", "tolerationSeconds": 60}]}}, "spec.worker.tolerations[0]"),
    ({"head": {"tolerations": [{"operator": "Equal", "value": "v"}]}}, "spec.head.tolerations[0]"),
    ({"worker": {"nodeSelector": {"pool": "gpu nodes"}}}, "spec.worker.nodeSelector.pool"),
    ({"head": {"nodeSelector": {"pool": 3}}}, "spec.head.nodeSelector.pool"),
    ({"worker": {"affinity": {"nodeAffinity": []}}}, "spec.worker.affinity.nodeAffinity"),
    ({"worker": {"extraResources": {"efa": 1}}}, "spec.worker.extraResources"),
    ({"worker": {"extraResources": {"nvidia.com/gpu": 8}}}, "spec.worker.extraResources"),
    # Device plugins count whole devices (hugepages-* take memory quantities).
    ({"worker": {"extraResources": {"rdma/hca": "0.5"}}}, "spec.worker.extraResources"),
    ({"worker": {"extraResources": {"hugepages-2Mi": "512mi"}}}, "spec.worker.extraResources.hugepages-2Mi"),
    ({"head": {"resources": {"memory": "8gi"}}}, "spec.head.resources.memory"),
    ({"head": {"resources": {"memory": "512m"}}}, "spec.head.resources.memory"),  # milli-bytes
    ({"head": {"resources": {"sharedMemory": "2ki"}}}, "spec.head.resources.sharedMemory"),
    ({"worker": {"capabilities": ["ipc_lock"]}}, "spec.worker.capabilities[0]"),
    ({"head": {"resources": {"cpu": "two"}}}, "spec.head.resources.cpu"),
    ({"imagePullSecrets": [{}]}, "spec.imagePullSecrets[0].name"),
    ({"imagePullSecrets": ["registry-creds"]}, "spec.imagePullSecrets[0]"),
    ({"serviceAccountName": "S3 Writer"}, "spec.serviceAccountName"),
    ({"priorityClassName": "High_Priority"}, "spec.priorityClassName"),
    ({"securityContext": {"fsGroupChangePolicy": "Never"}}, "spec.securityContext.fsGroupChangePolicy"),
    ({"securityContext": {"fsGroup": -1}}, "spec.securityContext.fsGroup"),
    ({"ttlSecondsAfterFinished": -1}, "spec.ttlSecondsAfterFinished"),
]


@pytest.mark.parametrize(("change", "field"), BAD_POD_FIELDS, ids=[f for _, f in BAD_POD_FIELDS])
def test_bad_pod_fields_are_refused_naming_the_field(change, field):
    job = load("tiny-cpu")
    job["spec"].update(change)
    _, errors = admit(CRD, job)
    assert any(e.startswith(f"{field}:") or e.startswith(f"{field} ") for e in errors), errors


# -- 6: names KubeRay takes ---------------------------------------------------------------------------


def kuberay_refuses(rayjob_name: str) -> str | None:
    """KubeRay's ValidateRayJobMetadata: at most 47 characters, a DNS-1035 label (a letter first, no dots)."""
    if len(rayjob_name) > 47:
        return "longer than 47 characters"
    if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", rayjob_name):
        return "not a DNS-1035 label"
    return None


@pytest.mark.parametrize("name", ["125m-8k", "8k-window", "e2e.125m"])
def test_names_kuberay_refuses_are_refused(name):
    """The API server takes such a TTTJob (a DNS subdomain), KubeRay then refuses every RayJob of it."""
    job = load("tiny-cpu")
    job["metadata"]["name"] = name
    _, errors = admit(CRD, job)
    assert any(e.startswith("metadata.name") for e in errors), errors
    sweep = load("sweep-tiny-cpu")
    sweep["metadata"]["name"] = name
    assert any(e.startswith("metadata.name") for e in admit(SWEEP_CRD, sweep)[1])
    # One created before the CRD had the rule fails with the reason, instead of waiting forever.
    job["metadata"].update(namespace="research", uid=UID, generation=1)
    with pytest.raises(SpecError) as err:
        builders.render_config(job, SETTINGS)
    assert err.value.field == "metadata.name" and "starting with a letter" in str(err.value)


@pytest.mark.parametrize("name", ["e2e-125m-8k", "m125-8k", "a", "x" * 42])
def test_names_the_crd_takes_make_rayjobs_kuberay_takes(name):
    job = load("tiny-cpu")
    job["metadata"]["name"] = name
    for attempt in (1, 100, 1000, 10**6):  # preemptions are retried without limit
        rayjob = render(stored(job), attempt=attempt)
        assert kuberay_refuses(rayjob["metadata"]["name"]) is None, rayjob["metadata"]["name"]
    sweep = load("sweep-tiny-cpu")
    sweep["metadata"]["name"] = name[:36]
    assert admit(SWEEP_CRD, sweep)[1] == []
    for index in (99, 9999, 10_000):
        trial = sweeps.trial_name(name[:36], index)
        assert kuberay_refuses(builders.attempt_name(trial, 1000)) is None


# -- 16: the head's /dev/shm is its own ------------------------------------------------------------------


def shm_size(pod: dict) -> str:
    return next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "dshm")


def test_the_heads_shared_memory_comes_from_its_own_memory():
    """/dev/shm is memory of the pod it is in: the head (16Gi) must not get the 8-GPU workers' 64Gi."""
    head, worker = pods(render(gpu_job()))
    assert shm_size(worker) == "64Gi" and shm_size(head) == "4Gi"  # a quarter of the head's memory
    assert shm_size(pods(render(stored(load("tiny-cpu"))))[0]) == "2Gi"  # of the default 8Gi
    job = load("tiny-cpu")
    job["spec"]["head"] = {"resources": {"memory": "10G"}}
    assert shm_size(pods(render(stored(job)))[0]) == "2384Mi"  # rounded down to whole Mi
    job["spec"]["head"] = {"resources": {"memory": "6Gi", "sharedMemory": "1536Mi"}}
    head, _ = pods(render(stored(job)))
    assert shm_size(head) == "1536Mi"
    # sharedMemory sizes the volume, it is not a resource of the container.
    assert head["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "6Gi"}


# -- 13: finished attempts' pods stay for their logs ----------------------------------------------------


def test_finished_attempts_keep_their_pods_for_an_hour_or_as_set():
    job = stored(load("tiny-cpu"))
    assert render(job, Settings())["spec"]["ttlSecondsAfterFinished"] == 3600
    from_chart = Settings.from_env({"TTT_RAYJOB_TTL_SECONDS": "86400"})
    assert render(job, from_chart)["spec"]["ttlSecondsAfterFinished"] == 86400
    job["spec"]["ttlSecondsAfterFinished"] = 0  # this job's pods go at once
    assert render(stored(job), from_chart)["spec"]["ttlSecondsAfterFinished"] == 0
    for bad in ("an hour", "-5"):
        with pytest.raises(UserError, match="TTT_RAYJOB_TTL_SECONDS"):
            Settings.from_env({"TTT_RAYJOB_TTL_SECONDS": bad})
