"""What to do about one TTTJob, decided from what exists: a pure function, so that a restarted operator
(or a second look at the same state) reaches the same decision and creates nothing twice.

The RayJobs a TTTJob owns (by owner UID, labelled with their attempt number) and its status are the record:
the newest attempt is followed, and a new attempt is created only when the newest one failed within the
backoff limit, or when there is none (first start, resume after suspend, RayJob deleted by hand).
Failed attempts are recorded by number in `status.failedAttemptNumbers` (and on each later RayJob), so that
a RayJob removed after it finished (KubeRay's deletionStrategy, a clean-up by hand) is still counted; when
the current attempt's RayJob is gone, the run's progress.json (written by that attempt) says how it ended.
An attempt whose run reported that it was stopped on request after a checkpoint (preemption, eviction,
node drain: `state: preempted` in its progress.json, written by that attempt) failed as a RayJob but is
recorded in `status.preemptedAttempts` instead, retried with reason `Preempted` and not counted against
backoffLimit. Each RayJob also carries the preempted and failed attempts before it (annotations), so that
a status update lost with a crashed operator, after progress.json has moved on to the next attempt, loses
none.

A failed attempt's retry waits a backoff that doubles with each failure, up to a cap; the time it is due is
kept in `status.nextAttemptAfter`, so an operator restarted meanwhile waits for it too. Preemptions are
retried at once. When the retry is created, the failed attempt's RayCluster is released (its RayJob stays
as the record). An attempt still starting `provisioningDeadlineSeconds` after it was first seen starting
(out of its queue) is deleted and counted as a failed attempt, with what held it back (`stuck.diagnose`)
in the message.

Succeeded and Failed are final: such a TTTJob is never run again, whatever happens to its RayJobs later and
whatever is changed in its spec (running again means a new TTTJob). The exceptions launched nothing: a job
that failed with InvalidSpec is planned again (a fixed spec starts it), one refused by the API server
(RayJobRejected) when its spec changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ttt.config import JobConfig
from ttt_operator.builders import LABEL_ATTEMPT, SpecError, attempt_name, by_index
from ttt_operator.status import (
    FAILED,
    PENDING,
    PREEMPTED,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    TERMINAL,
    Outcome,
    failure_message,
    later,
    outcome,
    phase_conditions,
    progress_status,
    seconds_between,
)
from ttt_operator.stuck import Stuck

_ACTIVE = (Outcome.STARTING, Outcome.QUEUED, Outcome.RUNNING)
PREEMPTED_ANNOTATION = "ttt.dev/preempted-attempts"
"""On a RayJob: the attempts before it that were preempted, as the operator knew when it created it."""
FAILED_ANNOTATION = "ttt.dev/failed-attempts"
"""On a RayJob: the attempts before it that failed (counted against backoffLimit)."""
# Failed with these reasons, nothing was launched: planning again cannot re-run anything.
_REPLANNED = ("InvalidSpec", "RayJobRejected")


@dataclass(frozen=True)
class Backoff:
    """How long a failed attempt waits for its retry: base_s, doubled for each failure, at most cap_s (the
    delays of a Kubernetes Job's pod failures: 10 s, 20 s, 40 s, ... capped at six minutes)."""

    base_s: float = 10.0
    cap_s: float = 360.0

    def delay(self, failures: int) -> float:
        return min(self.cap_s, self.base_s * 2 ** max(failures - 1, 0))


@dataclass
class Plan:
    create: int | None = None
    """Attempt whose ConfigMap and RayJob to create."""
    delete: list[str] = field(default_factory=list)
    """RayJobs to delete (suspension, an attempt past its provisioning deadline)."""
    release: list[str] = field(default_factory=list)
    """RayClusters of the attempt before the one created, to delete: a failed attempt's RayJob stays for
    ttlSecondsAfterFinished (its record, its submitter's logs), but its Ray pods must not hold the GPUs
    its retry needs."""
    status: dict[str, Any] = field(default_factory=dict)
    """Merge patch for the TTTJob's status (None values remove a field)."""
    events: list[tuple[str, str, str]] = field(default_factory=list)
    """(type, reason, message) Events to post on the TTTJob."""


def by_attempt(rayjobs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return by_index(rayjobs, LABEL_ATTEMPT)


def plan(
    job: dict[str, Any],
    rayjobs: dict[int, dict[str, Any]],
    report: dict[str, Any] | None,
    config: JobConfig | SpecError,
    run: tuple[str, str],
    now: str,
    stuck: Stuck | None = None,
    backoff: Backoff | None = None,
) -> Plan:
    """`config` is the rendered job config (or why it cannot be rendered); `run` is (run name, path);
    `rayjobs` are the RayJobs this TTTJob (by UID) owns; `stuck`, what holds the current attempt back if it
    is starting; `backoff`, the retry delays of failed attempts (None: retry at once)."""
    spec, old = job["spec"], job.get("status") or {}
    name = job["metadata"]["name"]
    generation = job["metadata"].get("generation")
    if finished(old, generation):
        return _finished(old, generation)
    limit = int(spec.get("backoffLimit", 2))
    attempt = max(int(old.get("attempt") or 0), max(rayjobs, default=0))
    current = rayjobs.get(attempt)
    result = outcome(current) if current else None
    failures = set(old.get("failedAttemptNumbers") or []) | recorded(rayjobs, FAILED_ANNOTATION)
    if current is None and attempt and not spec.get("suspend") and old.get("phase") != SUSPENDED:
        # Its RayJob is gone: a failure already recorded (the RayJob removed while its retry waits), or
        # what the run tells of how it ended.
        result = Outcome.FAILED if attempt in failures else ended_as_reported(report, attempt)
    preempted = set(old.get("preemptedAttempts") or []) | recorded(rayjobs, PREEMPTED_ANNOTATION)
    if result is Outcome.FAILED and was_preempted(report, attempt):
        preempted.add(attempt)
    why = failure_message(current) if current else gone_message(name, attempt, report)
    out = Plan()
    starting_since = None
    if result is Outcome.STARTING and not spec.get("suspend"):
        starting_since = old.get("startingSince") if old.get("attempt") == attempt else None
        starting_since = starting_since or now
        deadline = spec.get("provisioningDeadlineSeconds")
        if deadline and seconds_between(starting_since, now) >= deadline:
            held = f": {stuck.reason}, {stuck.message}" if stuck else ""
            why = f"attempt {attempt} did not start within provisioningDeadlineSeconds={deadline}{held}"
            out.delete.append(current["metadata"]["name"])  # its pods hold what others could use
            out.events.append(("Warning", "ProvisioningDeadlineExceeded", why))
            result, starting_since = Outcome.FAILED, None
    failures |= {n for n, rj in rayjobs.items() if outcome(rj) is Outcome.FAILED}
    if result is Outcome.FAILED:
        failures.add(attempt)
    failures -= preempted
    failed = len(failures)
    retry_at = None

    if result is Outcome.SUCCEEDED:
        phase, reason, message = SUCCEEDED, "Succeeded", f"attempt {attempt} finished"
    elif result is Outcome.TIMED_OUT:
        phase, reason, message = FAILED, "DeadlineExceeded", why
    elif spec.get("suspend"):
        if current is not None and result in _ACTIVE:
            out.delete.append(current["metadata"]["name"])
        phase, reason = SUSPENDED, "Suspended"
        message = "the Ray cluster is released; set spec.suspend=false to resume from the last checkpoint"
    elif result is Outcome.FAILED and failed > limit:
        phase, reason = FAILED, "BackoffLimitExceeded"
        message = f"{failed} failed attempts, backoffLimit {limit}; last: {why}"
    elif result is None or result is Outcome.FAILED:
        failure = result is Outcome.FAILED and attempt not in preempted
        if failure and backoff is not None:
            retry_at = old.get("nextAttemptAfter") or later(now, backoff.delay(failed))
        told = bool(old.get("nextAttemptAfter"))  # AttemptFailed was posted when the wait began
        if isinstance(config, SpecError):
            phase, reason, message = FAILED, "InvalidSpec", str(config)
        elif retry_at is not None and now < retry_at:
            phase, reason = PENDING, "BackingOff"
            message = old.get("message") if told and old.get("reason") == reason else None
            message = message or f"attempt {attempt} failed: {why}; retry {failed} of {limit} at {retry_at}"
            if not told:
                out.events.append(("Warning", "AttemptFailed", why))
        else:
            retry_at = None
            attempt += 1
            out.create = attempt
            phase, message = PENDING, f"RayJob {attempt_name(name, attempt)} created"
            before = rayjobs.get(attempt - 1)
            ray_cluster = ((before or {}).get("status") or {}).get("rayClusterName")
            if ray_cluster and before["metadata"]["name"] not in out.delete:
                out.release.append(ray_cluster)
            if attempt - 1 in preempted:
                reason = PREEMPTED
                message = f"attempt {attempt - 1} was {report.get('message', 'stopped')}; {message}"
                message += " (a preemption is not counted against backoffLimit)"
            elif result is Outcome.FAILED:
                reason = "Retrying"
                if not told:
                    out.events.append(("Warning", "AttemptFailed", why))
                message += f" (retry {failed} of {limit})"
            else:
                reason = "Resumed" if old.get("phase") == SUSPENDED else "Created"
            out.events.append(("Normal", reason, message))
    elif result is Outcome.RUNNING:
        workers = config.scale.workers if isinstance(config, JobConfig) else "?"
        phase, reason, message = RUNNING, "Running", f"attempt {attempt} training on {workers} workers"
    elif result is Outcome.QUEUED:
        phase, reason = PENDING, "Queued"
        message = f"RayJob {attempt_name(name, attempt)} waits to be admitted by its queue"
    else:
        phase, reason = PENDING, "Starting"
        message = f"RayJob {attempt_name(name, attempt)} is starting its Ray cluster"
        if stuck is not None:
            reason, message = stuck.reason, f"{message}; held back: {stuck.message}"
            if old.get("reason") != reason:
                out.events.append(("Warning", reason, message))

    if phase != old.get("phase") or (reason == "BackingOff" and old.get("reason") != reason):
        kind = "Warning" if phase == FAILED else "Normal"
        if not out.events or out.events[-1][1] != reason:
            out.events.append((kind, reason, message))
    holds = attempt and (out.create or current) and not (out.delete and not out.create)
    rayjob = attempt_name(name, attempt) if holds else None
    status: dict[str, Any] = {
        **progress_status(report),
        "phase": phase,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "attempt": attempt,
        "failedAttempts": failed,
        "failedAttemptNumbers": sorted(failures) or None,
        "preemptedAttempts": sorted(preempted) or None,
        "rayJobName": attempt_name(name, attempt) if attempt else None,
        "runName": run[0],
        "storagePath": run[1],
        "startingSince": starting_since,
        "nextAttemptAfter": retry_at,
        "conditions": phase_conditions(
            old.get("conditions") or [], phase, reason, message, generation, now, rayjob
        ),
        "startTime": old.get("startTime") or (now if phase == RUNNING else None),
        "completionTime": (old.get("completionTime") or now) if phase in TERMINAL else None,
    }
    if isinstance(config, JobConfig):
        status["config"] = {
            "windowSize": config.model.window_size,
            "miniBatchSize": config.ttt.mini_batch_size,
            "seqLen": config.train.seq_len,
            "workers": config.scale.workers,
        }
    out.status = status
    return out


def finished(old: dict[str, Any], generation: int | None) -> bool:
    """Succeeded or Failed for good: nothing of this TTTJob is ever launched again."""
    if old.get("phase") not in TERMINAL:
        return False
    reason = next((c.get("reason") for c in old.get("conditions") or [] if c.get("type") == FAILED), None)
    if reason == "InvalidSpec":
        return False  # nothing ran; the same spec plans to the same error
    return not (reason == "RayJobRejected" and generation != old.get("observedGeneration"))


def _finished(old: dict[str, Any], generation: int | None) -> Plan:
    """A finished job's status stays; a spec changed after the end is said to be ignored, once."""
    out = Plan()
    if generation is not None and generation != old.get("observedGeneration"):
        message = (
            f"{old['phase']}: spec changes after the end are not applied; "
            "a finished TTTJob is not run again (create a new one to run again)"
        )
        out.status = {"message": message}
        if old.get("message") != message:
            out.events.append(("Warning", "SpecChangeIgnored", message))
    return out


def ended_as_reported(report: dict[str, Any] | None, attempt: int) -> Outcome | None:
    """How `attempt` ended, by its own progress.json (when its RayJob is gone); None: not known to have
    ended (a RayJob deleted by hand before its run reported its end)."""
    if not report or report.get("attempt") != attempt:
        return None
    state = report.get("state")
    if state == "succeeded":
        return Outcome.SUCCEEDED
    return Outcome.FAILED if state in ("failed", "preempted", "killed") else None


def gone_message(name: str, attempt: int, report: dict[str, Any] | None) -> str:
    said = f": {report['message']}" if report and report.get("message") else ""
    state = (report or {}).get("state", "unknown")
    return f"RayJob {attempt_name(name, attempt)} is gone; its run reported {state}{said}"


def annotate_attempts(rayjob: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """`rayjob` naming the preempted and failed attempts before it: it is created before the status that
    records them, and a crash in between must not lose them."""
    fields = {PREEMPTED_ANNOTATION: "preemptedAttempts", FAILED_ANNOTATION: "failedAttemptNumbers"}
    for key, field_name in fields.items():
        if status.get(field_name):
            rayjob["metadata"].setdefault("annotations", {})[key] = ",".join(map(str, status[field_name]))
    return rayjob


def recorded(rayjobs: dict[int, dict[str, Any]], annotation: str) -> set[int]:
    """The attempts that the RayJobs' `annotation` names."""
    out = set()
    for rayjob in rayjobs.values():
        text = (rayjob["metadata"].get("annotations") or {}).get(annotation, "")
        out.update(int(n) for n in text.split(",") if n.strip().isdigit())
    return out


def was_preempted(report: dict[str, Any] | None, attempt: int) -> bool:
    """The run says that this attempt stopped on request after writing its checkpoint."""
    return bool(report) and report.get("state") == "preempted" and report.get("attempt") == attempt


def blocked(
    job: dict[str, Any], status: dict[str, Any], phase: str, reason: str, message: str, now: str
) -> dict:
    """`status` rewritten for an attempt that could not be created (KubeRay missing, RayJob refused)."""
    old = job.get("status") or {}
    generation = job["metadata"].get("generation")
    conditions = phase_conditions(old.get("conditions") or [], phase, reason, message, generation, now, None)
    return {
        **status,
        "phase": phase,
        "reason": reason,
        "message": message,
        "attempt": old.get("attempt", 0),
        "rayJobName": old.get("rayJobName"),
        "conditions": conditions,
        "completionTime": status.get("completionTime") if phase in TERMINAL else None,
    }
