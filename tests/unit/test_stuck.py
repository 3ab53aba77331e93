"""A starting attempt that cannot start says why (from its pods and Events), gives up at its provisioning
deadline, and a failed attempt's retry waits an exponential, capped backoff. The pod and Event bodies are
shaped as the kubelet, the scheduler and KubeRay write them (field names of core/v1 Pod and Event)."""

from __future__ import annotations

import pytest

from tests.unit.test_operator import SETTINGS, example, rayjob, with_status
from ttt.errors import UserError
from ttt_operator import builders
from ttt_operator.reconcile import Backoff, by_attempt, plan
from ttt_operator.settings import Settings
from ttt_operator.status import later
from ttt_operator.stuck import MESSAGE_CHARS, Stuck, diagnose

NOW = "2026-12-03T12:00:00Z"


def pod(name: str, role: str = "worker", phase: str = "Pending", **status) -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {"ray.io/cluster": "tiny-cpu-a1-raycluster", "ray.io/node-type": role},
        },
        "status": {"phase": phase, **status},
    }


def waiting(reason: str, message: str = "", container: str = "ray-worker") -> dict:
    return {
        "containerStatuses": [
            {"name": container, "state": {"waiting": {"reason": reason, "message": message}}}
        ]
    }


def unschedulable(message: str) -> dict:
    return {
        "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        ]
    }


def event(
    reason: str, message: str, kind: str = "Pod", name: str = "p", at: str = NOW, type_: str = "Warning"
):
    return {
        "type": type_,
        "reason": reason,
        "message": message,
        "involvedObject": {"kind": kind, "name": name},
        "lastTimestamp": at,
    }


# -- diagnose ---------------------------------------------------------------------------------------


def test_an_image_that_cannot_be_pulled_names_the_pod_the_container_and_the_kubelets_words():
    found = diagnose(
        [
            pod("h", "head", "Running"),
            pod("w", **waiting("ImagePullBackOff", 'Back-off pulling image "registry.local:5000/ttt:typo"')),
        ],
        [],
    )
    assert found == Stuck(
        "ImagePullBackOff",
        "pod w (worker) container ray-worker: ImagePullBackOff: "
        'Back-off pulling image "registry.local:5000/ttt:typo"',
    )


def test_a_missing_secret_in_env_from_is_a_container_config_error():
    status = waiting("CreateContainerConfigError", 'secret "s3-credentials" not found', "ray-head")
    found = diagnose([pod("h", "head", **status)], [])
    assert (
        found.reason == "CreateContainerConfigError" and 'secret "s3-credentials" not found' in found.message
    )


def test_init_containers_count_too():
    status = {
        "initContainerStatuses": [{"name": "wait-gcs", "state": {"waiting": {"reason": "ErrImagePull"}}}]
    }
    assert diagnose([pod("w", **status)], []).reason == "ErrImagePull"


@pytest.mark.parametrize(
    "message",
    [
        "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available.",
        '0/4 nodes are available: persistentvolumeclaim "ttt-runs" not found.',
        "0/4 nodes are available: 4 node(s) had untolerated taint {nvidia.com/gpu: present}.",
    ],
)
def test_an_unschedulable_pod_says_what_the_scheduler_said(message):
    found = diagnose([pod("w", **unschedulable(message))], [])
    assert found == Stuck("Unschedulable", f"pod w (worker) cannot be scheduled: {message}")


def test_a_waiting_container_comes_before_an_unschedulable_pod_and_events():
    pods = [pod("w1", **unschedulable("0/1 nodes are available")), pod("w2", **waiting("CrashLoopBackOff"))]
    assert diagnose(pods, [event("FailedMount", "x")]).reason == "CrashLoopBackOff"


def test_kuberay_events_tell_of_pods_that_could_not_be_created():
    quota = 'pods "tiny-cpu-a1-worker-x" is forbidden: exceeded quota: pods, requested: pods=1, used: pods=10'
    events = [
        event("CreatedHeadPod", "Created head Pod", "RayCluster", "rc", type_="Normal"),
        event("FailedToCreateWorkerPod", f"Failed to create worker Pod: {quota}", "RayCluster", "rc"),
    ]
    found = diagnose([pod("h", "head", "Running")], events)
    assert found.reason == "FailedToCreateWorkerPod" and found.message.startswith("RayCluster rc: ")
    assert "exceeded quota" in found.message


def test_the_newest_warning_event_wins():
    events = [
        event(
            "FailedMount",
            'MountVolume.SetUp failed for volume "creds": secret "old" not found',
            at="2026-12-03T11:00:00Z",
        ),
        event("FailedScheduling", "0/2 nodes are available", at="2026-12-03T11:59:00Z"),
        event("Pulled", "Successfully pulled image", type_="Normal", at="2026-12-03T12:00:00Z"),
    ]
    assert diagnose([pod("w")], events).reason == "FailedScheduling"


def test_ordinary_progress_is_not_stuck():
    pods = [
        pod("h", "head", "Running"),
        pod("w", **waiting("ContainerCreating")),
        pod("x", **{"conditions": [{"type": "PodScheduled", "status": "True"}]}),
    ]
    events = [
        event("Pulling", "Pulling image", type_="Normal"),
        event("BackOff", "unrelated", type_="Warning"),
    ]
    assert diagnose(pods, events) is None
    assert diagnose([], []) is None


def test_long_messages_are_shortened_to_one_line():
    found = diagnose([pod("w", **waiting("ErrImagePull", "line\n" + "x" * 1000))], [])
    assert len(found.message) == MESSAGE_CHARS and "\n" not in found.message and found.message.endswith("…")


# -- the plan ---------------------------------------------------------------------------------------


def decide(job, rayjobs, now=NOW, stuck=None, backoff=None, report=None):
    config = builders.render_config(job, SETTINGS)
    run = (builders.run_name(job), builders.storage_path(job, SETTINGS))
    return plan(job, by_attempt(rayjobs), report, config, run, now, stuck, backoff)


def starting(attempt: int = 1) -> dict:
    return rayjob(attempt, "Initializing", rayClusterName=f"tiny-cpu-a{attempt}-raycluster")


IMAGE = Stuck("ImagePullBackOff", "pod w (worker) container ray-worker: ImagePullBackOff")


def test_a_stuck_attempt_shows_its_reason_in_the_status_conditions_and_one_event():
    job = with_status(example("tiny-cpu"), decide(example("tiny-cpu"), []))
    todo = decide(job, [starting()], stuck=IMAGE)
    assert (todo.status["phase"], todo.status["reason"]) == ("Pending", "ImagePullBackOff")
    assert todo.status["message"].endswith("held back: " + IMAGE.message)
    created = next(c for c in todo.status["conditions"] if c["type"] == "Created")
    assert created["status"] == "True"  # the RayJob exists; what holds it back is in the reason and message
    assert ("Warning", "ImagePullBackOff", todo.status["message"]) in todo.events
    again = decide(with_status(job, todo), [starting()], stuck=IMAGE)
    assert again.events == []  # said once
    unstuck = decide(with_status(job, todo), [starting()])
    assert unstuck.status["reason"] == "Starting"


def test_the_provisioning_deadline_counts_from_when_the_attempt_was_first_seen_starting():
    job = example("tiny-cpu", provisioningDeadlineSeconds=600, backoffLimit=1)
    job = with_status(job, decide(job, []))
    queued = decide(job, [rayjob(1, "Suspended")])
    assert queued.status["startingSince"] is None  # waiting in a queue does not count
    first = decide(with_status(job, queued), [starting()], now=NOW, stuck=IMAGE)
    assert first.status["startingSince"] == NOW and first.delete == []
    job = with_status(job, first)
    within = decide(job, [starting()], now=later(NOW, 599), stuck=IMAGE)
    assert within.delete == [] and within.create is None and within.status["startingSince"] == NOW
    past = decide(job, [starting()], now=later(NOW, 600), stuck=IMAGE)
    assert past.delete == ["tiny-cpu-a1"] and past.create == 2  # retried at once without a backoff
    assert past.status["failedAttemptNumbers"] == [1] and past.status["startingSince"] is None
    said = dict((r, m) for _, r, m in past.events)
    assert said["ProvisioningDeadlineExceeded"] == (
        f"attempt 1 did not start within provisioningDeadlineSeconds=600: ImagePullBackOff, {IMAGE.message}"
    )
    assert "AttemptFailed" in said and past.release == []  # deleting the RayJob takes its cluster
    # The second attempt sticks too: backoffLimit 1 is spent.
    job = with_status(job, past)
    a2 = with_status(job, decide(job, [starting(2)], now=later(NOW, 700)))
    final = decide(a2, [starting(2)], now=later(NOW, 1300))
    assert (final.status["phase"], final.status["reason"], final.create) == (
        "Failed",
        "BackoffLimitExceeded",
        None,
    )
    assert final.delete == ["tiny-cpu-a2"] and "did not start within" in final.status["message"]


def test_no_deadline_no_limit():
    job = with_status(example("tiny-cpu"), decide(example("tiny-cpu"), []))
    job = with_status(job, decide(job, [starting()]))
    assert decide(job, [starting()], now=later(NOW, 10**6), stuck=IMAGE).delete == []


def test_a_failed_attempt_waits_its_backoff_and_the_waits_double_up_to_the_cap():
    backoff = Backoff(base_s=10, cap_s=25)
    assert [backoff.delay(n) for n in (1, 2, 3, 4)] == [10, 20, 25, 25]
    job = example("tiny-cpu", backoffLimit=3)
    job = with_status(job, decide(job, []))
    failed = rayjob(1, "Failed", "FAILED", rayClusterName="tiny-cpu-a1-raycluster")
    wait = decide(job, [failed], backoff=backoff)
    assert wait.create is None and wait.status["nextAttemptAfter"] == later(NOW, 10)
    assert (wait.status["phase"], wait.status["reason"]) == ("Pending", "BackingOff")
    assert [r for _, r, _ in wait.events] == ["AttemptFailed", "BackingOff"]
    assert "retry 1 of 3 at " + later(NOW, 10) in wait.status["message"]
    job = with_status(job, wait)
    # Still waiting (the RayJob may meanwhile be removed by KubeRay): nothing said again, nothing created.
    for rayjobs in ([failed], []):
        again = decide(job, rayjobs, now=later(NOW, 9), backoff=backoff)
        assert (
            again.create is None and again.events == [] and again.status["message"] == wait.status["message"]
        )
        assert again.status["failedAttemptNumbers"] == [1]
    retry = decide(job, [failed], now=later(NOW, 10), backoff=backoff)
    assert retry.create == 2 and retry.status["nextAttemptAfter"] is None
    assert retry.release == ["tiny-cpu-a1-raycluster"]  # the failed attempt's Ray pods free their GPUs
    assert [r for _, r, _ in retry.events] == ["Retrying"]  # AttemptFailed was said when the wait began
    job = with_status(job, retry)
    second = decide(job, [failed, rayjob(2, "Failed", "FAILED")], now=later(NOW, 20), backoff=backoff)
    assert second.status["nextAttemptAfter"] == later(NOW, 40)  # 20 s after the second failure
    job = with_status(job, second)
    a3 = with_status(job, decide(job, [rayjob(2, "Failed", "FAILED")], now=later(NOW, 40), backoff=backoff))
    third = decide(a3, [rayjob(3, "Failed", "FAILED")], now=later(NOW, 50), backoff=backoff)
    assert third.status["nextAttemptAfter"] == later(NOW, 75)  # capped at 25 s


def test_the_retry_of_a_removed_failed_attempt_is_not_a_fresh_start():
    """A RayJob that failed and was then removed (deletionStrategy) while its retry waits stays a failure:
    backoffLimit still applies."""
    job = example("tiny-cpu", backoffLimit=0)
    job = with_status(job, decide(job, []))
    job = with_status(job, decide(job, [rayjob(1, "Failed", "FAILED")], backoff=Backoff()))
    assert job["status"]["phase"] == "Failed"  # backoffLimit 0: no wait, no retry
    job = example("tiny-cpu", backoffLimit=1)
    job = with_status(job, decide(job, []))
    job = with_status(job, decide(job, [rayjob(1, "Failed", "FAILED")], backoff=Backoff()))
    retry = decide(job, [], now=later(NOW, 10), backoff=Backoff())
    assert retry.create == 2 and retry.status["failedAttempts"] == 1 and retry.status["reason"] == "Retrying"


def test_a_preempted_attempt_is_retried_at_once_without_backoff():
    job = example("tiny-cpu")
    job = with_status(job, decide(job, []))
    job = with_status(job, decide(job, [rayjob(1, "Running", "RUNNING")]))
    report = {
        "state": "preempted",
        "attempt": 1,
        "message": "preempted (SIGTERM)",
        "step": 5,
        "total_steps": 10,
    }
    retry = decide(
        job, [rayjob(1, "Failed", "FAILED", rayClusterName="rc1")], backoff=Backoff(), report=report
    )
    assert retry.create == 2 and retry.status["reason"] == "Preempted" and retry.release == ["rc1"]


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"TTT_RETRY_BACKOFF_SECONDS": "soon"}, "TTT_RETRY_BACKOFF_SECONDS: 'soon' is not a number"),
        ({"TTT_RETRY_BACKOFF_SECONDS": "-1"}, "TTT_RETRY_BACKOFF_SECONDS: must be a finite number"),
        ({"TTT_RETRY_BACKOFF_CAP_SECONDS": "inf"}, "TTT_RETRY_BACKOFF_CAP_SECONDS: must be a finite number"),
        ({"TTT_RETRY_BACKOFF_CAP_SECONDS": "nan"}, "TTT_RETRY_BACKOFF_CAP_SECONDS: must be a finite number"),
    ],
)
def test_bad_backoff_settings_are_refused_in_one_line(env, words):
    with pytest.raises(UserError, match=words):
        Settings.from_env(env)


def test_backoff_settings_default_to_a_kubernetes_jobs_delays():
    settings = Settings.from_env({})
    assert (settings.retry_backoff_seconds, settings.retry_backoff_cap_seconds) == (10.0, 360.0)
    assert Settings.from_env({"TTT_RETRY_BACKOFF_SECONDS": "0"}).retry_backoff_seconds == 0.0
