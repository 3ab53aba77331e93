"""A TTTJob's life around the operator: deleted while no operator runs, finished and then stripped of its
RayJobs, re-created under the same name, refused by a quota. A real `python -m ttt_operator` and real
kubectl against the local API server; the test plays KubeRay's part (RayJob status, deleting a finished
RayJob as its deletionStrategy does)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kube.apiserver import ApiError, FakeApiServer
from tests.kube.drive import (
    Kubectl,
    Operator,
    eventually,
    get,
    kubectl,
    operator_env,
    phase_is,
    prepare,
    set_rayjob_status,
    tttjob,
)

NAMESPACE = "lifecycle"
OTHER = "lifecycle-gone"  # a second watched namespace, deleted by a test
SETTLE_S = 3.0  # three polls of the operator: time enough for a relaunch to show


@pytest.fixture(scope="module")
def life(apiserver: FakeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("lifecycle")
    kubeconfig = prepare(apiserver, base, [NAMESPACE, OTHER])
    env = operator_env(kubeconfig, f"{NAMESPACE},{OTHER}", base / "runs")
    operator = Operator(env, base / "operator.log")
    operator.start()
    yield {"operator": operator, "k": kubectl(kubeconfig), "server": apiserver, "log": base / "operator.log"}
    operator.stop()


@pytest.fixture()
def operator(life: dict) -> Iterator[Operator]:
    """The module's operator, running again after a test that stopped it."""
    yield life["operator"]
    if life["operator"].proc is None:
        life["operator"].start()


def children(k: Kubectl, job: str, namespace: str = NAMESPACE) -> dict[str, list[str]]:
    out = {}
    for kind in ("rayjobs", "configmaps"):
        items = k("get", kind, "-n", namespace, "-l", f"ttt.dev/job={job}", "-o", "json")["items"]
        out[kind] = sorted(o["metadata"]["name"] for o in items)
    return out


def reasons(k: Kubectl, job: str) -> list[str]:
    items = [e for e in k("get", "events", "-o", "json")["items"] if e["involvedObject"]["name"] == job]
    items.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [e["reason"] for e in items]


def created(k: Kubectl, job: str) -> dict:
    status = get(k, "tj", job)["status"]
    return next(c for c in status["conditions"] if c["type"] == "Created")


def test_deletion_completes_with_the_operator_stopped(life, operator):
    k = life["k"]
    for namespace, name in ((NAMESPACE, "delete-me"), (OTHER, "goes-with-its-namespace")):
        k("apply", "-n", namespace, "-f", "-", stdin=tttjob(name))
        eventually(lambda: children(k, name, namespace)["rayjobs"], f"RayJob of {name}")  # noqa: B023
    eventually(phase_is(k, "delete-me", "Pending"), "phase Pending")
    time.sleep(SETTLE_S)  # polls ran: any finalizer they would take is on by now
    assert get(k, "tj", "delete-me")["metadata"].get("finalizers") is None
    operator.stop()  # scaled to zero, uninstalled, crash-looping

    started = time.monotonic()
    k("delete", "tttjob", "delete-me", "--timeout=15s")
    k("delete", "namespace", OTHER, "--timeout=15s")
    took = time.monotonic() - started
    assert get(k, "tj", "delete-me") is None
    assert children(k, "delete-me") == {"rayjobs": [], "configmaps": []}  # owner references took them
    assert k("get", "namespace", OTHER, check=False).returncode != 0
    assert took < 10, f"deletion took {took:.1f} s"


def test_a_finished_job_is_not_run_again_when_its_rayjobs_are_removed(life, operator):
    k = life["k"]
    k("apply", "-f", "-", stdin=tttjob("done-once"))
    k("apply", "-f", "-", stdin=tttjob("failed-once", backoffLimit=0))
    for name, end in (("done-once", "SUCCEEDED"), ("failed-once", "FAILED")):
        eventually(lambda: get(k, "rayjob", f"{name}-a1"), f"RayJob {name}-a1")  # noqa: B023
        set_rayjob_status(k, f"{name}-a1", jobDeploymentStatus="Complete", jobStatus=end)
    eventually(phase_is(k, "done-once", "Succeeded"), "phase Succeeded")
    eventually(phase_is(k, "failed-once", "Failed"), "phase Failed")
    # KubeRay's deletionStrategy removes finished RayJobs; the operator also restarts meanwhile.
    for name in ("done-once", "failed-once"):
        k("delete", "rayjob", f"{name}-a1")
    operator.stop()
    operator.start()
    k("patch", "tj", "done-once", "--type=merge", "-p", json.dumps({"spec": {"backoffLimit": 4}}))
    time.sleep(SETTLE_S)
    for name, phase in (("done-once", "Succeeded"), ("failed-once", "Failed")):
        assert children(k, name)["rayjobs"] == [], name
        status = get(k, "tj", name)["status"]
        assert (status["phase"], status["attempt"]) == (phase, 1), name
    assert get(k, "tj", "failed-once")["status"]["failedAttemptNumbers"] == [1]
    assert "not run again" in get(k, "tj", "done-once")["status"]["message"]
    assert reasons(k, "done-once").count("SpecChangeIgnored") == 1


def test_a_job_recreated_under_the_same_name_does_not_adopt_the_old_attempt(life):
    k, name = life["k"], "same-name"
    k("apply", "-f", "-", stdin=tttjob(name))
    eventually(lambda: get(k, "rayjob", f"{name}-a1"), "RayJob a1")
    set_rayjob_status(k, f"{name}-a1", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    eventually(phase_is(k, name, "Succeeded"), "phase Succeeded")
    # Its children outlive it (orphaned here; on a cluster, until the garbage collector gets to them).
    k("delete", "tttjob", name, "--cascade=orphan")
    old = get(k, "rayjob", f"{name}-a1")["metadata"]["uid"]
    k("apply", "-f", "-", stdin=tttjob(name))
    uid = eventually(lambda: get(k, "tj", name), "the new TTTJob")["metadata"]["uid"]

    def waiting() -> dict | None:
        condition = created(k, name) if (get(k, "tj", name) or {}).get("status") else {}
        return condition if condition.get("reason") == "NameInUse" else None

    condition = eventually(waiting, "the NameInUse condition")
    assert "ConfigMap same-name-a1 exists" in condition["message"]
    time.sleep(SETTLE_S)
    assert get(k, "tj", name)["status"]["phase"] == "Pending"  # not the old attempt's Succeeded
    assert get(k, "rayjob", f"{name}-a1")["metadata"]["uid"] == old

    k("delete", "rayjob,configmap", f"{name}-a1")  # the old ones go: the new job starts its own
    rayjob = eventually(
        lambda: (r := get(k, "rayjob", f"{name}-a1")) and r["metadata"]["uid"] != old and r, "its own a1"
    )
    assert rayjob["metadata"]["ownerReferences"][0]["uid"] == uid
    assert get(k, "configmap", f"{name}-a1")["metadata"]["ownerReferences"][0]["uid"] == uid
    eventually(lambda: created(k, name)["reason"] == "RayJobCreated", "RayJobCreated")


class Quota:
    """Refuses RayJob creates in NAMESPACE as a ResourceQuota does (403 Forbidden, 'exceeded quota')
    while active; records when it refused."""

    MESSAGE = (
        'rayjobs.ray.io "{name}" is forbidden: exceeded quota: gpu-quota, requested: '
        "count/rayjobs.ray.io=1, used: count/rayjobs.ray.io=4, limited: count/rayjobs.ray.io=4"
    )

    def __init__(self, server: FakeApiServer):
        self.handlers = server._handlers
        self.route = self.handlers._route
        self.refused: list[float] = []
        self.lock = threading.Lock()

    def __enter__(self) -> Quota:
        self.handlers._route = self._checked
        return self

    def __exit__(self, *exc: object) -> None:
        del self.handlers._route  # the class's own again

    async def _checked(self, request: Any) -> Any:
        if request.method == "POST" and request.path == f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs":
            body = json.loads(await request.read())
            with self.lock:
                self.refused.append(time.monotonic())
            raise ApiError(403, "Forbidden", self.MESSAGE.format(name=body["metadata"]["name"]))
        return await self.route(request)


def test_a_quota_denial_waits_and_is_retried_with_backoff(life):
    k, name = life["k"], "over-quota"
    with Quota(life["server"]) as quota:
        k("apply", "-f", "-", stdin=tttjob(name))
        eventually(lambda: len(quota.refused) >= 3, "three refused creates", seconds=30)
        status = get(k, "tj", name)["status"]
        condition = created(k, name)
    assert status["phase"] == "Pending" and status["attempt"] == 0
    assert condition["reason"] == "QuotaExceeded" and "exceeded quota: gpu-quota" in condition["message"]
    t = quota.refused[:3]
    first, second = t[1] - t[0], t[2] - t[1]
    assert second >= 1.8 and second > first, f"retries {first:.2f} s then {second:.2f} s apart"
    rayjob = eventually(lambda: get(k, "rayjob", f"{name}-a1"), "RayJob a1 once the quota allows", 30)
    assert rayjob["metadata"]["name"] == f"{name}-a1"
    eventually(lambda: created(k, name)["reason"] == "RayJobCreated", "RayJobCreated")
    assert get(k, "tj", name)["status"]["attempt"] == 1
    assert reasons(k, name).count("QuotaExceeded") == 1  # said once, not at every retry
