"""Attempts that do not start, seen through `kubectl`: what holds them back (read from their pods and Events)
in the TTTJob's status and `kubectl get -o wide`, the provisioning deadline, the backoff of retries and the
release of a failed attempt's Ray cluster. A real `python -m ttt_operator` against the local API server; the
test plays KubeRay (RayJob status, RayClusters), the kubelet and the scheduler (pod status, Events)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
import yaml

from tests.kube.apiserver import FakeApiServer
from tests.kube.drive import (
    CRD,
    RAYJOB_CRD,
    Operator,
    eventually,
    get,
    kubectl,
    operator_env,
    prepare,
    set_rayjob_status,
    tttjob,
)

NAMESPACE = "stuck"
BACKOFF_S = 5
# KubeRay's RayCluster, reduced to what this test stores (the operator only deletes RayClusters by name).
RAYCLUSTER_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "rayclusters.ray.io"},
    "spec": {
        "group": "ray.io",
        "scope": "Namespaced",
        "names": {"plural": "rayclusters", "singular": "raycluster", "kind": "RayCluster"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def stuck(apiserver: FakeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("stuck")
    crd = base / "rayclusters.yaml"
    crd.write_text(yaml.safe_dump(RAYCLUSTER_CRD))
    kubeconfig = prepare(apiserver, base, [NAMESPACE], crds=(CRD, RAYJOB_CRD, crd))
    # Retries wait 5 s, 10 s, ...: longer than an operator takes to restart, so that the drill below shows
    # the wait is kept in the status, not in the process.
    env = operator_env(
        kubeconfig,
        NAMESPACE,
        base / "runs",
        TTT_RETRY_BACKOFF_SECONDS=str(BACKOFF_S),
        TTT_RETRY_BACKOFF_CAP_SECONDS="20",
    )
    operator = Operator(env, base / "operator.log")
    operator.start()
    yield {"k": kubectl(kubeconfig), "server": apiserver, "operator": operator}
    operator.stop()


def ray_pod(server: FakeApiServer, name: str, cluster: str, role: str, **status) -> None:
    labels = {"ray.io/cluster": cluster, "ray.io/node-type": role}
    server.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            "spec": {"containers": [{"name": f"ray-{role}", "image": "registry.local:5000/ttt:typo"}]},
            "status": {"phase": "Pending", **status},
        }
    )


def warning(server: FakeApiServer, about: str, reason: str, message: str) -> None:
    server.apply(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{about}.{reason.lower()}", "namespace": NAMESPACE},
            "type": "Warning",
            "reason": reason,
            "message": message,
            "involvedObject": {"kind": "Pod", "name": about, "namespace": NAMESPACE},
            "lastTimestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )


def wide(k, name: str) -> dict[str, str]:
    """`kubectl get tj NAME -o wide` as {column: value}."""
    header, row = k("get", "tj", name, "-o", "wide").splitlines()
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
    cells = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return dict(zip(header.split(), cells, strict=True))


def reason_is(k, name: str, reason: str):
    def probe():
        job = get(k, "tj", name)
        return job if job and job.get("status", {}).get("reason") == reason else None

    return probe


def warnings_on(k, name: str) -> list[str]:
    events = k("get", "events", "-n", NAMESPACE, "-o", "json")["items"]
    return [e["reason"] for e in events if e["involvedObject"]["name"] == name and e["type"] == "Warning"]


def test_a_stuck_attempt_says_why_and_is_replaced_at_its_provisioning_deadline(stuck):
    k, server, name = stuck["k"], stuck["server"], "pull-fails"
    k("apply", "-n", NAMESPACE, "-f", "-", stdin=tttjob(name, provisioningDeadlineSeconds=6, backoffLimit=1))
    eventually(lambda: get(k, "rayjob", f"{name}-a1"), "RayJob a1")
    cluster = f"{name}-a1-raycluster-x7k2p"
    set_rayjob_status(k, f"{name}-a1", jobDeploymentStatus="Initializing", rayClusterName=cluster)
    # A Secret volume that does not exist: only an Event on the pod says so.
    ray_pod(server, f"{cluster}-head", cluster, "head")
    warning(
        server,
        f"{cluster}-head",
        "FailedMount",
        'MountVolume.SetUp failed for volume "creds" : secret "s3" not found',
    )
    job = eventually(reason_is(k, name, "FailedMount"), "reason FailedMount", seconds=5)
    assert 'secret "s3" not found' in job["status"]["message"]
    # The image cannot be pulled: the container's waiting reason says more than the Event.
    waiting = {
        "reason": "ImagePullBackOff",
        "message": 'Back-off pulling image "registry.local:5000/ttt:typo"',
    }
    statuses = [{"name": "ray-head", "state": {"waiting": waiting}}]
    ray_pod(server, f"{cluster}-head", cluster, "head", containerStatuses=statuses)
    job = eventually(reason_is(k, name, "ImagePullBackOff"), "reason ImagePullBackOff", seconds=5)
    columns = wide(k, name)
    assert (columns["PHASE"], columns["REASON"]) == ("Pending", "ImagePullBackOff")
    assert "ttt:typo" in columns["MESSAGE"]
    assert {"FailedMount", "ImagePullBackOff"} <= set(warnings_on(k, name))
    # Six seconds after it was first seen starting, the attempt is given up and a second one is made.
    since = datetime.fromisoformat(job["status"]["startingSince"].replace("Z", "+00:00"))
    a2 = eventually(lambda: get(k, "rayjob", f"{name}-a2"), "RayJob a2", seconds=30)
    assert get(k, "rayjob", f"{name}-a1") is None  # deleted, with (by owner references) its Ray cluster
    made = datetime.fromisoformat(a2["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    assert (made - since).total_seconds() >= 6 + BACKOFF_S  # the deadline, then the first retry's backoff
    job = get(k, "tj", name)
    assert job["status"]["failedAttemptNumbers"] == [1] and job["status"]["attempt"] == 2
    assert "ProvisioningDeadlineExceeded" in warnings_on(k, name)
    # Nothing holds a2 back: it is just starting; then it never starts either and backoffLimit 1 is spent.
    set_rayjob_status(k, f"{name}-a2", jobDeploymentStatus="Initializing")
    eventually(reason_is(k, name, "Starting"), "a2 starting", seconds=10)
    job = eventually(reason_is(k, name, "BackoffLimitExceeded"), "failed for good", seconds=30)
    assert job["status"]["phase"] == "Failed" and "did not start within" in job["status"]["message"]
    assert get(k, "rayjob", f"{name}-a2") is None


def test_a_failed_attempts_retry_waits_its_backoff_across_a_restart_and_frees_the_failed_ray_cluster(stuck):
    k, server, name, operator = stuck["k"], stuck["server"], "fails-once", stuck["operator"]
    k("apply", "-n", NAMESPACE, "-f", "-", stdin=tttjob(name, backoffLimit=2))
    eventually(lambda: get(k, "rayjob", f"{name}-a1"), "RayJob a1")
    cluster = f"{name}-a1-raycluster-q9w8e"
    server.apply(
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {
                "name": cluster,
                "namespace": NAMESPACE,
                "labels": {"ray.io/originated-from-cr-name": f"{name}-a1"},
            },
            "spec": {},
        }
    )
    set_rayjob_status(
        k, f"{name}-a1", jobDeploymentStatus="Failed", jobStatus="FAILED", rayClusterName=cluster
    )
    job = eventually(reason_is(k, name, "BackingOff"), "reason BackingOff", seconds=10)
    retry_at = job["status"]["nextAttemptAfter"]
    assert "retry 1 of 2 at " + retry_at in job["status"]["message"]
    assert get(k, "rayjob", f"{name}-a2") is None and get(k, "raycluster", cluster) is not None
    # The operator restarts in the middle of the wait: the retry still waits for the time in the status.
    operator.kill()
    operator.start()
    a2 = eventually(lambda: get(k, "rayjob", f"{name}-a2"), "RayJob a2", seconds=30)
    assert a2["metadata"]["creationTimestamp"] >= retry_at  # RFC 3339 UTC strings sort as times
    eventually(
        lambda: get(k, "raycluster", cluster) is None, "the failed attempt's RayCluster deleted", seconds=5
    )
    assert get(k, "rayjob", f"{name}-a1") is not None  # its record stays for ttlSecondsAfterFinished
    events = k("get", "events", "-n", NAMESPACE, "-o", "json")["items"]
    events.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))  # the order they were posted in
    said = [e["reason"] for e in events if e["involvedObject"]["name"] == name]
    assert said.index("AttemptFailed") < said.index("BackingOff") < said.index("Retrying")
    assert (
        said.count("AttemptFailed") == 1 and said.count("BackingOff") == 1
    )  # not said again after the restart
