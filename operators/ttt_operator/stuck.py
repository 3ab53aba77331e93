"""Why a starting attempt is not running yet, read from its Ray pods and the Events on them, on its
RayCluster and on its RayJob: a pure function, fed by the operator's read-only calls.

KubeRay reports a RayJob whose pods cannot start as `Initializing` for as long as that lasts, so without this
a TTTJob shows "Starting" forever. What Kubernetes says instead, by where it says it:
- a container that cannot start waits with a reason on the pod (ImagePullBackOff, ErrImagePull,
  CreateContainerConfigError for a missing Secret or ConfigMap key, CrashLoopBackOff, ...);
- a pod the scheduler cannot place has condition PodScheduled=False, reason Unschedulable (no GPU node, a
  taint not tolerated, a PersistentVolumeClaim that does not exist or cannot bind);
- a volume that cannot be mounted (a Secret volume whose Secret is missing) and a pod KubeRay could not
  create (a ResourceQuota on pods) appear only as Warning Events: FailedMount on the pod,
  FailedToCreateHeadPod / FailedToCreateWorkerPod on the RayCluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Container waiting reasons that mean the container will not start without a change (or only after a
# back-off): ContainerCreating and PodInitializing are ordinary progress, not stuck.
STUCK_WAITING = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
)
# Warning Event reasons that say why a pod does not exist or does not start.
STUCK_EVENTS = (
    "FailedToCreateHeadPod",
    "FailedToCreateWorkerPod",
    "FailedCreate",
    "FailedScheduling",
    "FailedMount",
    "FailedAttachVolume",
    "FailedCreatePodSandBox",
    "FailedToRetrieveImagePullSecret",
)
MESSAGE_CHARS = 300


@dataclass(frozen=True)
class Stuck:
    reason: str
    """One word, Kubernetes' own (ImagePullBackOff, Unschedulable, FailedMount, ...)."""
    message: str
    """Which pod (and whether head or worker) and what Kubernetes said."""


def diagnose(pods: list[dict[str, Any]], events: list[dict[str, Any]]) -> Stuck | None:
    """The first thing that holds the attempt back: a waiting container, then an unschedulable pod, then
    the newest Warning Event of a known reason; None when nothing is known to be wrong (still pulling,
    still scheduling, or simply starting)."""
    for pod in pods:
        found = _waiting(pod)
        if found:
            return found
    for pod in pods:
        found = _unschedulable(pod)
        if found:
            return found
    warnings = [e for e in events if e.get("type") == "Warning" and e.get("reason") in STUCK_EVENTS]
    if warnings:
        newest = max(warnings, key=_event_time)
        about = newest.get("involvedObject") or newest.get("regarding") or {}
        where = f"{about.get('kind', 'object')} {about.get('name', '?')}"
        text = newest.get("message") or newest.get("note") or ""
        return Stuck(newest["reason"], _short(f"{where}: {text}"))
    return None


def _waiting(pod: dict[str, Any]) -> Stuck | None:
    status = pod.get("status") or {}
    statuses = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    for container in statuses:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING:
            detail = waiting.get("message") or ""
            text = f"{_pod_name(pod)} container {container.get('name', '?')}: {waiting['reason']}"
            return Stuck(waiting["reason"], _short(f"{text}: {detail}" if detail else text))
    return None


def _unschedulable(pod: dict[str, Any]) -> Stuck | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            reason = condition.get("reason") or "Unschedulable"
            detail = condition.get("message") or "no node fits it"
            return Stuck(reason, _short(f"{_pod_name(pod)} cannot be scheduled: {detail}"))
    return None


def _pod_name(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    role = (meta.get("labels") or {}).get("ray.io/node-type")
    return f"pod {meta.get('name', '?')}" + (f" ({role})" if role else "")


def _event_time(event: dict[str, Any]) -> str:
    # RFC 3339 strings in UTC compare as times; core/v1 Events carry lastTimestamp, events.k8s.io eventTime.
    return str(
        event.get("lastTimestamp")
        or event.get("eventTime")
        or (event.get("metadata") or {}).get("creationTimestamp")
        or ""
    )


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"
