"""Reading a RayJob's status and writing a TTTJob's: pure functions.

KubeRay reports two fields: `jobDeploymentStatus` (the RayJob's own life: Initializing, Running, Complete,
Failed, Suspended, …) and `jobStatus` (the Ray job's: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED).
`outcome` folds them into what an attempt means for the TTTJob.
"""

from __future__ import annotations

import enum
from datetime import datetime, timedelta, timezone
from typing import Any

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
TERMINAL = (SUCCEEDED, FAILED)
PREEMPTED = "Preempted"
"""The condition reason of an attempt stopped on request after its checkpoint (preemption, eviction)."""
CONDITION_TYPES = ("Created", "Running", "Succeeded", "Failed", "Suspended")


class Outcome(enum.Enum):
    STARTING = "starting"
    QUEUED = "queued"  # suspended by a queue (e.g. Kueue) until it admits the RayJob
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed out"  # activeDeadlineSeconds passed: final, not retried


def outcome(rayjob: dict[str, Any]) -> Outcome:
    st = rayjob.get("status") or {}
    deployment, job = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
    if job == "SUCCEEDED":
        return Outcome.SUCCEEDED
    if st.get("reason") == "DeadlineExceeded":
        return Outcome.TIMED_OUT
    if deployment in ("Failed", "ValidationFailed") or job in ("FAILED", "STOPPED"):
        return Outcome.FAILED
    if deployment in ("Suspending", "Suspended"):
        return Outcome.QUEUED
    if deployment == "Running" and job == "RUNNING":
        return Outcome.RUNNING
    return Outcome.STARTING


def failure_message(rayjob: dict[str, Any]) -> str:
    st = rayjob.get("status") or {}
    parts = [st.get("reason"), st.get("message")]
    detail = ": ".join(p for p in parts if p) or f"job status {st.get('jobStatus') or 'unknown'}"
    return f"RayJob {rayjob['metadata']['name']} failed ({detail})"


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
"""RFC 3339 in UTC to the second, as Kubernetes writes times: such strings sort as the times they name."""


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime(TIME_FORMAT)


def seconds_between(start: str, end: str) -> float:
    return (_parse(end) - _parse(start)).total_seconds()


def later(stamp: str, seconds: float) -> str:
    return (_parse(stamp) + timedelta(seconds=seconds)).strftime(TIME_FORMAT)


def _parse(stamp: str) -> datetime:
    return datetime.strptime(stamp, TIME_FORMAT).replace(tzinfo=timezone.utc)


def set_condition(
    conditions: list[dict[str, Any]],
    kind: str,
    true: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """A new list with condition `kind` set; its transition time moves only when its status changes."""
    status = "True" if true else "False"
    old = next((c for c in conditions if c.get("type") == kind), None)
    changed = old is None or old.get("status") != status
    entry = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),
    }
    if generation is not None:
        entry["observedGeneration"] = generation
    rest = [c for c in conditions if c.get("type") != kind]
    return sorted([*rest, entry], key=lambda c: CONDITION_TYPES.index(c["type"]))


def phase_conditions(
    conditions: list[dict[str, Any]],
    phase: str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
    rayjob: str | None,
) -> list[dict[str, Any]]:
    """Created: whether the current attempt's RayJob exists; of the others, the phase's alone is True.
    A condition that is already False keeps the reason it turned False for: a preempted attempt turns
    Running False with reason Preempted (not a failure: Failed stays False) until the next one runs."""
    if rayjob:
        created = (True, "RayJobCreated", f"RayJob {rayjob} holds the current attempt")
    else:
        created = (False, reason, message)
    out = set_condition(conditions, "Created", *created, generation, now)
    for kind in ("Running", "Succeeded", "Failed", "Suspended"):
        old = next((c for c in out if c.get("type") == kind), None)
        if kind == phase or (kind == "Running" and reason == PREEMPTED):
            out = set_condition(out, kind, kind == phase, reason, message, generation, now)
        elif old is not None:
            keep = old.get("status") == "False"  # the reason it turned False for
            why, text = (old.get("reason"), old.get("message")) if keep else (None, None)
            out = set_condition(out, kind, False, why or f"Not{kind}", text or message, generation, now)
    return out


def progress_status(report: dict[str, Any] | None) -> dict[str, Any]:
    """The part of the TTTJob's status that comes from the run's progress.json."""
    if not report:
        return {}
    out: dict[str, Any] = {}
    step, total = report.get("step"), report.get("total_steps")
    if isinstance(step, int) and isinstance(total, int):
        progress: dict[str, Any] = {"step": step, "totalSteps": total, "stepOfTotal": f"{step}/{total}"}
        for src, dst in (("tokens_per_second", "tokensPerSecond"), ("loss", "loss")):
            if isinstance(report.get(src), int | float):
                progress[dst] = round(float(report[src]), 4 if dst == "loss" else 1)
        if report.get("updated"):
            progress["updated"] = _rfc3339(report["updated"])
        out["progress"] = progress
    metrics = {k: float(v) for k, v in (report.get("metrics") or {}).items() if isinstance(v, int | float)}
    if isinstance(report.get("loss"), int | float):
        metrics.setdefault("train/loss", float(report["loss"]))
    if metrics and report.get("state") == "succeeded":
        out["metrics"] = metrics  # final: what sweeps compare
    if report.get("mlflow_run_id"):
        out["mlflowRunId"] = report["mlflow_run_id"]
    checkpoint = report.get("last_checkpoint")
    if isinstance(checkpoint, dict) and checkpoint.get("uri"):
        out["lastCheckpoint"] = {"step": int(checkpoint.get("step", 0)), "uri": str(checkpoint["uri"])}
    return out


def _rfc3339(text: str) -> str:
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return now_iso()
    return stamp.astimezone(timezone.utc).strftime(TIME_FORMAT)
