"""Operator restart drill: the operator process is SIGKILLed (a node loss, an OOM kill: no graceful stop)
while a TTTJob runs, while a retry is due, and between two of its API calls of a retry; after each restart
nothing is created twice, the status carries on, and the job succeeds.

The crash points between API calls are made exact by a gate on the local API server: it holds the one
request the drill names until the operator is dead, then drops it, as a request the dying process never
got to send."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
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
from ttt.storage import open_storage
from ttt.train.report import ProgressReport

NAMESPACE = "restart-drill"
JOB = "crash-drill"
SETTLE_S = 2.0  # two timer ticks of the restarted operator: time enough for a duplicate to show


class Gate:
    """Holds the first request that `match(method, path, body)` picks, on the API server's own loop, until
    `drop()`: the request is then refused unapplied. Other requests pass untouched."""

    def __init__(self, server: FakeApiServer, match: Callable[[str, str, Any], bool]):
        self.handlers, self.match = server._handlers, match
        self.route = self.handlers._route
        self.held = threading.Event()
        self.dropped = threading.Event()

    def __enter__(self) -> Gate:
        self.handlers._route = self._gated
        return self

    def __exit__(self, *exc: object) -> None:
        self.dropped.set()
        del self.handlers._route  # the class's own again

    async def _gated(self, request: Any) -> Any:
        if self.held.is_set() or request.method not in ("POST", "PATCH"):
            return await self.route(request)
        body = await request.read()  # aiohttp keeps it: the real route reads it again
        if not self.match(request.method, request.path, json.loads(body or b"null")):
            return await self.route(request)
        self.held.set()
        deadline = time.monotonic() + 60
        while not self.dropped.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        raise ApiError(503, "ServiceUnavailable", "dropped by the restart drill")

    def wait_held(self, what: str) -> None:
        if not self.held.wait(30):
            raise AssertionError(f"timed out after 30 s waiting for the operator to {what}")

    def drop(self) -> None:
        self.dropped.set()


@pytest.fixture(scope="module")
def drill(apiserver: FakeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An operator of its own, watching a namespace of its own (no MLflow: the run's id comes from its
    progress.json)."""
    base = tmp_path_factory.mktemp("restart")
    kubeconfig = prepare(apiserver, base, [NAMESPACE])
    # Retries at once: these drills are about what a restart keeps (the backoff's own restart is in
    # test_operator_stuck.py).
    env = operator_env(kubeconfig, NAMESPACE, base / "runs", TTT_RETRY_BACKOFF_SECONDS="0")
    operator = Operator(env, base / "operator.log")
    operator.start()
    yield {"operator": operator, "k": kubectl(kubeconfig), "server": apiserver}
    operator.stop()


def owned(k: Kubectl, kind: str, job: str = JOB) -> dict[str, str]:
    """name → uid of the job's objects of `kind`: a re-created object keeps its name but not its uid."""
    items = k("get", kind, "-l", f"ttt.dev/job={job}", "-o", "json")["items"]
    return {o["metadata"]["name"]: o["metadata"]["uid"] for o in items}


def events(k: Kubectl, job: str = JOB) -> list[tuple[str, str]]:
    """(reason, message) of the job's Events, oldest first."""
    items = [e for e in k("get", "events", "-o", "json")["items"] if e["involvedObject"]["name"] == job]
    items.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    return [(e["reason"], e["message"]) for e in items]


def status_with(k: Kubectl, what: str, job: str = JOB, **fields: Any) -> dict:
    def probe() -> dict | None:
        status = (get(k, "tj", job) or {}).get("status") or {}
        return status if all(status.get(key) == value for key, value in fields.items()) else None

    return eventually(probe, what)


@pytest.mark.slow
def test_sigkill_while_running_and_while_a_retry_is_due_creates_nothing_twice(drill):
    k, operator, server = drill["k"], drill["operator"], drill["server"]
    k("apply", "-f", "-", stdin=tttjob(JOB, backoffLimit=3))
    eventually(lambda: get(k, "rayjob", f"{JOB}-a1"), "RayJob a1")
    set_rayjob_status(k, f"{JOB}-a1", jobDeploymentStatus="Running", jobStatus="RUNNING")
    job = eventually(phase_is(k, JOB, "Running"), "phase Running")
    path = job["status"]["storagePath"]
    report = ProgressReport(open_storage(path), total_steps=300, every_s=0)
    report.start(0, "mlflow-run-drill", "sqlite:///x", None)
    report.step(20, 3.0, 800.0)
    first = status_with(k, "progress at step 20", mlflowRunId="mlflow-run-drill", attempt=1)
    start, uid = first["startTime"], job["metadata"]["uid"]
    expected = [
        ("Created", f"RayJob {JOB}-a1 created"),
        ("Running", "attempt 1 training on 1 workers"),
    ]
    eventually(lambda: events(k) == expected, f"the events {expected}")
    made = {"rayjobs": owned(k, "rayjobs"), "configmaps": owned(k, "configmaps")}

    def unchanged(attempt: int, failed: int) -> dict:
        """The status carries on, nothing was made twice or re-made, and no Event was repeated."""
        time.sleep(SETTLE_S)
        status = get(k, "tj", JOB)["status"]
        assert (status["attempt"], status["failedAttempts"]) == (attempt, failed)
        assert (status["startTime"], status["mlflowRunId"], status["runName"], status["storagePath"]) == (
            start,
            "mlflow-run-drill",
            first["runName"],
            path,
        )
        assert get(k, "tj", JOB)["metadata"]["uid"] == uid
        for kind, names in made.items():
            assert owned(k, kind) == names, kind
        assert events(k) == expected
        return status

    # 1. Killed while attempt 1 trains; the run reports on while the operator is down.
    operator.kill()
    report.step(40, 2.5, 800.0)
    operator.start()
    eventually(lambda: get(k, "tj", JOB)["status"]["progress"]["step"] == 40, "step 40 in the status")
    unchanged(attempt=1, failed=0)

    # 2. Killed, then attempt 1 fails while no operator is there: the retry is due at the restart.
    operator.kill()
    set_rayjob_status(k, f"{JOB}-a1", jobDeploymentStatus="Failed", jobStatus="FAILED", message="node lost")
    operator.start()
    status_with(k, "attempt 2 after the restart", attempt=2, failedAttempts=1)
    for kind in made:
        made[kind][f"{JOB}-a2"] = eventually(lambda: owned(k, kind).get(f"{JOB}-a2"), f"{kind} a2")  # noqa: B023
    expected += [
        ("AttemptFailed", f"RayJob {JOB}-a1 failed (node lost)"),
        ("Retrying", f"RayJob {JOB}-a2 created (retry 1 of 3)"),
    ]
    unchanged(attempt=2, failed=1)

    # 3. Killed between the retry's ConfigMap and its RayJob: the RayJob's create never reaches the server.
    set_rayjob_status(k, f"{JOB}-a2", jobDeploymentStatus="Running", jobStatus="RUNNING")
    status_with(k, "attempt 2 running", attempt=2, phase="Running")
    expected.append(("Running", "attempt 2 training on 1 workers"))
    rayjobs = f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs"
    with Gate(server, lambda m, p, body: p == rayjobs and body["metadata"]["name"] == f"{JOB}-a3") as gate:
        set_rayjob_status(k, f"{JOB}-a2", jobDeploymentStatus="Failed", jobStatus="FAILED", message="OOM")
        gate.wait_held("create RayJob a3")
        operator.kill()
        gate.drop()
    config_a3 = owned(k, "configmaps")[f"{JOB}-a3"]  # made by the killed process
    assert f"{JOB}-a3" not in owned(k, "rayjobs")
    operator.start()
    status_with(k, "attempt 3 after the restart", attempt=3, failedAttempts=2)
    made["rayjobs"][f"{JOB}-a3"] = eventually(lambda: owned(k, "rayjobs").get(f"{JOB}-a3"), "RayJob a3")
    made["configmaps"][f"{JOB}-a3"] = config_a3  # adopted, not re-made
    expected += [
        ("AttemptFailed", f"RayJob {JOB}-a2 failed (OOM)"),
        ("Retrying", f"RayJob {JOB}-a3 created (retry 2 of 3)"),
    ]
    unchanged(attempt=3, failed=2)

    # 4. Killed after the retry's RayJob was created, before the status recorded it: the patch is lost.
    set_rayjob_status(k, f"{JOB}-a3", jobDeploymentStatus="Running", jobStatus="RUNNING")
    status_with(k, "attempt 3 running", attempt=3, phase="Running")
    expected.append(("Running", "attempt 3 training on 1 workers"))
    job_status = f"/apis/ttt.dev/v1alpha1/namespaces/{NAMESPACE}/tttjobs/{JOB}/status"
    with Gate(server, lambda m, p, body: p == job_status and body["status"].get("attempt") == 4) as gate:
        set_rayjob_status(k, f"{JOB}-a3", jobDeploymentStatus="Failed", jobStatus="FAILED", message="exit 1")
        gate.wait_held("record attempt 4 in the status")
        operator.kill()
        gate.drop()
    for kind in made:
        made[kind][f"{JOB}-a4"] = owned(k, kind)[f"{JOB}-a4"]  # made by the killed process
    assert get(k, "tj", JOB)["status"]["attempt"] == 3  # the lost patch
    operator.start()
    status_with(k, "attempt 4 adopted after the restart", attempt=4, failedAttempts=3)
    # Attempt 3's AttemptFailed and Retrying Events were due after that patch: lost with the process.
    expected.append(("Starting", f"RayJob {JOB}-a4 is starting its Ray cluster"))
    unchanged(attempt=4, failed=3)

    # The last attempt runs and succeeds under the same run.
    set_rayjob_status(k, f"{JOB}-a4", jobDeploymentStatus="Running", jobStatus="RUNNING")
    status_with(k, "attempt 4 running", attempt=4, phase="Running")
    set_rayjob_status(k, f"{JOB}-a4", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    status = status_with(k, "phase Succeeded", attempt=4, phase="Succeeded")
    assert status["completionTime"] and status["rayJobName"] == f"{JOB}-a4"
    expected += [("Running", "attempt 4 training on 1 workers"), ("Succeeded", "attempt 4 finished")]
    unchanged(attempt=4, failed=3)
    assert sorted(made["rayjobs"]) == sorted(made["configmaps"]) == [f"{JOB}-a{n}" for n in (1, 2, 3, 4)]


def test_a_preemption_retried_just_before_a_sigkill_is_still_not_a_failure(drill, monkeypatch):
    """The status patch that records a preemption is lost with the process, and the next attempt's trainer
    has already overwritten the run's progress.json (a node loss keeps the operator away for minutes)."""
    k, operator, server, name = drill["k"], drill["operator"], drill["server"], "preempt-drill"
    k("apply", "-f", "-", stdin=tttjob(name, backoffLimit=0))
    eventually(lambda: get(k, "rayjob", f"{name}-a1"), "RayJob a1")
    set_rayjob_status(k, f"{name}-a1", jobDeploymentStatus="Running", jobStatus="RUNNING")
    path = eventually(phase_is(k, name, "Running"), "phase Running")["status"]["storagePath"]

    def attempt_reports(attempt: int, step: int) -> ProgressReport:
        monkeypatch.setenv("TTT_ATTEMPT", str(attempt))  # as the operator sets it in the attempt's pods
        report = ProgressReport(open_storage(path), total_steps=300, every_s=0)
        report.start(step, "mlflow-run-p", "sqlite:///x", None)
        report.step(step + 1, 2.5, 900.0)
        return report

    attempt_reports(1, 0).finish("preempted", "stopped after step 1 (SIGTERM) in 2.0 s")
    exit_75 = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "exit 75"}
    job_status = f"/apis/ttt.dev/v1alpha1/namespaces/{NAMESPACE}/tttjobs/{name}/status"
    with Gate(server, lambda m, p, body: p == job_status and body["status"].get("attempt") == 2) as gate:
        set_rayjob_status(k, f"{name}-a1", **exit_75)
        gate.wait_held("record attempt 2 in the status")
        operator.kill()
        gate.drop()
    assert f"{name}-a2" in owned(k, "rayjobs", name)
    attempt_reports(2, 1)  # attempt 2 trains: progress.json no longer tells of attempt 1's preemption
    set_rayjob_status(k, f"{name}-a2", jobDeploymentStatus="Running", jobStatus="RUNNING")
    operator.start()
    status = status_with(k, "attempt 2 adopted", name, attempt=2, phase="Running")
    assert (status["failedAttempts"], status.get("preemptedAttempts")) == (0, [1])

    # Preempted again: with backoffLimit 0, only a job that counted attempt 1 as a failure would give up.
    attempt_reports(2, 1).finish("preempted", "stopped after step 2 (SIGTERM) in 2.0 s")
    set_rayjob_status(k, f"{name}-a2", **exit_75)
    status = status_with(k, "attempt 3", name, attempt=3)
    assert (status["failedAttempts"], status["preemptedAttempts"], status["phase"]) == (0, [1, 2], "Pending")
    set_rayjob_status(k, f"{name}-a3", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    status_with(k, "phase Succeeded", name, phase="Succeeded", failedAttempts=0, preemptedAttempts=[1, 2])
    assert sorted(owned(k, "rayjobs", name)) == [f"{name}-a{n}" for n in (1, 2, 3)]
    # Attempt 1's Preempted Event was due after the lost patch; attempt 2's is there, once.
    assert [r for r, _ in events(k, name)] == ["Created", "Running", "Preempted", "Succeeded"]
