"""The reconcile decision when RayJobs go away: a finished TTTJob stays finished, failures stay counted, and
only the RayJobs of this TTTJob (by owner UID, not by name) are its attempts."""

from __future__ import annotations

import copy

from tests.unit.test_operator import UID, decide, example, rayjob, with_status
from ttt_operator.cluster import owned_by
from ttt_operator.reconcile import annotate_attempts


def owned(body: dict, uid: str = UID) -> dict:
    body = copy.deepcopy(body)
    body["metadata"]["ownerReferences"] = [{"kind": "TTTJob", "name": "tiny-cpu", "uid": uid}]
    return body


def test_a_succeeded_job_whose_rayjob_is_removed_is_not_run_again():
    job = example("tiny-cpu")
    job = with_status(job, decide(job, [rayjob(1, "Running", "RUNNING")]))
    done = decide(job, [rayjob(1, "Complete", "SUCCEEDED")])
    assert done.status["phase"] == "Succeeded"
    job = with_status(job, done)
    # KubeRay's deletionStrategy (or a clean-up by hand) removed the RayJob; the operator restarted.
    again = decide(job, [])
    assert again.create is None and again.events == []
    assert again.status == {}  # nothing of the finished status is rewritten


def test_a_job_failed_for_good_whose_rayjobs_are_removed_is_not_run_again():
    job = example("tiny-cpu", backoffLimit=0)
    final = decide(job, [rayjob(1, "Complete", "FAILED")])
    assert (final.status["phase"], final.create) == ("Failed", None)
    job = with_status(job, final)
    assert decide(job, []).create is None


def test_failures_stay_counted_after_their_rayjobs_are_removed():
    job = example("tiny-cpu", backoffLimit=1)
    retry = decide(job, [rayjob(1, "Complete", "FAILED")])
    assert retry.create == 2 and retry.status["failedAttemptNumbers"] == [1]
    job = with_status(job, retry)
    # RayJob a1 is gone; a2 fails: two failures against backoffLimit 1, not one.
    final = decide(job, [rayjob(2, "Complete", "FAILED")])
    assert final.create is None and final.status["phase"] == "Failed"
    assert (final.status["failedAttempts"], final.status["failedAttemptNumbers"]) == (2, [1, 2])


def test_failures_are_read_back_from_the_next_rayjob_when_the_status_was_lost():
    job = example("tiny-cpu", backoffLimit=1)
    retry = decide(job, [rayjob(1, "Complete", "FAILED")])
    a2 = annotate_attempts(rayjob(2, "Complete", "FAILED"), retry.status)
    assert a2["metadata"]["annotations"]["ttt.dev/failed-attempts"] == "1"
    # The status patch was lost with the operator, and RayJob a1 was removed since.
    final = decide(job, [a2])
    assert (final.status["phase"], final.status["failedAttemptNumbers"]) == ("Failed", [1, 2])


def test_an_attempt_whose_rayjob_went_after_finishing_is_judged_by_its_run():
    job = example("tiny-cpu")
    job = with_status(job, decide(job, [rayjob(1, "Running", "RUNNING")]))
    report = {"state": "succeeded", "attempt": 1, "step": 300, "total_steps": 300}
    done = decide(job, [], report=report)
    assert (done.status["phase"], done.create) == ("Succeeded", None)
    failed = decide(job, [], report={**report, "state": "failed", "message": "RuntimeError: boom"})
    assert failed.create == 2 and failed.status["failedAttemptNumbers"] == [1]
    assert "RuntimeError: boom" in next(m for _, r, m in failed.events if r == "AttemptFailed")
    # Deleted by hand before its run reported an end: a new attempt, not a failure.
    deleted = decide(job, [], report={**report, "state": "running"})
    assert deleted.create == 2 and deleted.status["failedAttempts"] == 0


def test_a_spec_change_on_a_finished_job_is_not_applied_and_said_once():
    job = example("tiny-cpu")
    job = with_status(job, decide(job, [rayjob(1, "Complete", "SUCCEEDED")]))
    job["spec"]["backoffLimit"] = 5
    job["metadata"]["generation"] = 2
    todo = decide(job, [])
    assert todo.create is None and [r for _, r, _ in todo.events] == ["SpecChangeIgnored"]
    assert "not run again" in todo.status["message"] and "phase" not in todo.status
    job["status"].update(todo.status)
    assert decide(job, []).events == []


def test_a_rejected_job_is_planned_again_when_its_spec_changes():
    job = example("tiny-cpu")
    job["status"] = {
        "phase": "Failed",
        "attempt": 0,
        "observedGeneration": 1,
        "conditions": [{"type": "Failed", "status": "True", "reason": "RayJobRejected"}],
    }
    assert decide(job, []).create is None  # the same spec is not re-sent
    job["metadata"]["generation"] = 2
    assert decide(job, []).create == 1


def test_only_rayjobs_owned_by_this_uid_are_its_attempts():
    mine, theirs = owned(rayjob(1)), owned(rayjob(1), uid="another-uid-of-a-deleted-tttjob")
    unowned = rayjob(2)  # orphaned by `kubectl delete --cascade=orphan`
    assert owned_by([theirs, mine, unowned], UID) == [mine]
