"""kopf handlers: thin. Every trigger of a TTTJob (created, changed or resumed after a restart; one of its
RayJobs changed; the poll) runs the same `reconcile`, which reads what exists, asks `reconcile.plan` what
to do, and does it. TTTSweeps likewise: `reconcile_sweep` on the sweep's own events and on its trial
TTTJobs' changes, deciding through `sweeps.plan_sweep`.

No handler needs a finalizer, so none is put on a TTTJob: deleting one (or its sweep, or its namespace)
completes with the operator scaled to zero, uninstalled or crash-looping, and owner references take its
RayJobs and ConfigMaps. That is why the periodic poll is a thread of our own over the TTTJobs kopf's watch
has shown, not a kopf timer (timers always take a finalizer, to be stopped at deletion).

A starting attempt's pods and Events are read (read-only) to say what holds it back (stuck.py); a failed
attempt's retry is created by the poll once its backoff, recorded in the status, has passed.

An attempt refused for a ResourceQuota (or a webhook citing one), or whose name is still held by the
children of a deleted TTTJob of the same name, waits: phase Pending with reason QuotaExceeded or
NameInUse, tried again by the poll with a backoff that doubles up to BACKOFF_CAP_S (kept in memory: a
restarted operator tries once at once).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from ttt.config import ConfigError, JobConfig
from ttt.storage import open_storage
from ttt.train.report import read_progress
from ttt_operator import builders, sweep_tracking, sweeps
from ttt_operator.builders import GROUP, LABEL_JOB, PLURAL, VERSION, SpecError
from ttt_operator.cluster import PODS_READ, Cluster, KubeRayMissing, NameTaken, load_credentials, owned_by
from ttt_operator.reconcile import Backoff, annotate_attempts, blocked, by_attempt, plan
from ttt_operator.run_report import from_mlflow
from ttt_operator.settings import Settings
from ttt_operator.status import FAILED, PENDING, SUSPENDED, TERMINAL, Outcome, now_iso, outcome
from ttt_operator.stuck import Stuck, diagnose

SETTINGS = Settings.from_env()
RETRY_BACKOFF = Backoff(SETTINGS.retry_backoff_seconds, SETTINGS.retry_backoff_cap_seconds)
log = logging.getLogger("ttt_operator")
# Answers that will not change on a retry (bad request, forbidden, invalid): report them, do not retry.
REFUSED = (400, 403, 422)

# Handlers of an object and of what it owns run in different threads: one reconcile per object at a time.
_locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)
_cluster: Cluster | None = None
BACKOFF_CAP_S = 300.0
# (namespace, name) → phase of each TTTJob kopf's watch has shown: what the poll goes over.
_seen: dict[tuple[str, str], str | None] = {}
# (namespace, name) → (tries, monotonic time of the next try) of jobs waiting for a quota or a name.
_waiting: dict[tuple[str, str], tuple[int, float]] = {}
_seen_lock = threading.Lock()
_stop = threading.Event()


def cluster() -> Cluster:
    global _cluster
    if _cluster is None:
        load_credentials()
        _cluster = Cluster()
    return _cluster


def reconcile(namespace: str, name: str) -> None:
    with _locks[("TTTJob", namespace, name)]:
        api = cluster()
        job = api.get("TTTJob", namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        try:
            config = builders.render_config(job, SETTINGS)
        except SpecError as exc:
            config = exc
        run = (builders.run_name(job), builders.storage_path(job, SETTINGS))
        now = now_iso()
        old = job.get("status") or {}
        wait: tuple[str, str] | None = None  # (reason, message) of an attempt that has to wait
        try:
            rayjobs = by_attempt(api.rayjobs(namespace, name, job["metadata"]["uid"]))
        except KubeRayMissing as exc:  # retried by the poll: installing KubeRay unblocks the job
            todo = plan(job, {}, None, config, run, now)
            if todo.create is not None:
                todo.status = blocked(job, todo.status, PENDING, "KubeRayMissing", str(exc), now)
                todo.create, todo.events = None, [("Warning", "KubeRayMissing", str(exc))]
        else:
            attempt = max(int(old.get("attempt") or 0), max(rayjobs, default=0))
            # The current attempt's RayJob is gone: only its run's report tells whether it ended.
            gone = (
                attempt
                and attempt not in rayjobs
                and old.get("phase") != SUSPENDED
                and not job["spec"].get("suspend")
            )
            report, unreadable = _read_report(run[1], config) if rayjobs or attempt else (None, None)
            stuck = _why_stuck(api, rayjobs.get(attempt))
            todo = plan(job, rayjobs, report, config, run, now, stuck, RETRY_BACKOFF)
            if unreadable and gone and todo.create is not None:
                why = f"the RayJob of attempt {attempt} is gone and its run's progress cannot be read"
                wait = ("ProgressUnreadable", f"{why} ({unreadable})")
        for rayjob in todo.delete:
            api.delete("RayJob", namespace, rayjob)
        if wait is None and todo.create is not None and not isinstance(config, SpecError):
            wait = _create_attempt(api, job, todo, config, now)
            if wait is None:
                _release(api, namespace, todo.release)
        if wait is not None:
            reason, message = wait
            tries = _waiting.get((namespace, name), (0, 0.0))[0] + 1
            delay = min(BACKOFF_CAP_S, SETTINGS.poll_seconds * 2 ** (tries - 1))
            _waiting[(namespace, name)] = (tries, time.monotonic() + delay)
            message += f"; trying again in {delay:g} s"
            before = next((c for c in old.get("conditions") or [] if c.get("type") == "Created"), {})
            todo.status = blocked(job, todo.status, PENDING, reason, message, now)
            todo.events = [] if before.get("reason") == reason else [("Warning", reason, message)]
        else:
            _waiting.pop((namespace, name), None)
        api.patch_status("TTTJob", namespace, name, todo.status)
        _post(job, todo.events)


def _create_attempt(api: Cluster, job: dict, todo: Any, config: Any, now: str) -> tuple[str, str] | None:
    """Create the attempt's ConfigMap and RayJob; (reason, message) if it has to wait for them."""
    # Both children are built before either is created: a spec that cannot render leaves none.
    config_map = builders.config_map(job, todo.create, config)
    rayjob = annotate_attempts(builders.ray_job(job, todo.create, config, SETTINGS), todo.status)
    try:
        api.create(config_map)
        api.create(rayjob)
    except NameTaken as exc:
        return "NameInUse", str(exc)
    except ApiException as exc:
        if exc.status not in REFUSED:
            raise  # transient: kopf retries the handler
        if _quota_denial(exc):
            return "QuotaExceeded", f"attempt {todo.create} waits for quota: {_reason(exc)}"
        message = f"the API server refused attempt {todo.create}: {_reason(exc)}"
        todo.status = blocked(job, todo.status, FAILED, "RayJobRejected", message, now)
        todo.events = [("Warning", "RayJobRejected", message)]
    return None


def _why_stuck(api: Cluster, rayjob: dict[str, Any] | None) -> Stuck | None:
    """What holds a starting attempt back, from its pods and the Events on them, its RayCluster and its
    RayJob; None if it is not starting or nothing is known to be wrong. Reading them must never stop the
    reconcile: a denied or failed read only loses the diagnosis."""
    if rayjob is None or outcome(rayjob) is not Outcome.STARTING:
        return None
    meta, ray_cluster = rayjob["metadata"], (rayjob.get("status") or {}).get("rayClusterName")
    try:
        pods = api.pods(meta["namespace"], ray_cluster) if ray_cluster else []
        # Events of pods that are not running yet (a running pod says nothing about being stuck).
        names = [meta["name"], *([ray_cluster] if ray_cluster else [])]
        names += [p["metadata"]["name"] for p in pods if (p.get("status") or {}).get("phase") != "Running"]
        events = [event for name in names[:PODS_READ] for event in api.events(meta["namespace"], name)]
    except ApiException as exc:
        log.warning(
            "cannot read the pods or Events of RayJob %s/%s: %s", meta["namespace"], meta["name"], exc
        )
        return None
    return diagnose(pods, events)


def _release(api: Cluster, namespace: str, ray_clusters: list[str]) -> None:
    """Delete the Ray clusters of attempts that a retry replaces; one that cannot be deleted now goes with
    its RayJob's ttlSecondsAfterFinished."""
    for name in ray_clusters:
        try:
            api.delete("RayCluster", namespace, name)
        except ApiException as exc:
            log.warning("cannot delete RayCluster %s/%s of a failed attempt: %s", namespace, name, exc)


def _quota_denial(exc: ApiException) -> bool:
    """A ResourceQuota's refusal ('exceeded quota: ...'), or a webhook's that cites a quota: it passes
    once other jobs finish or the quota is raised."""
    return exc.status == 403 and "quota" in _reason(exc).lower()


def reconcile_sweep(namespace: str, name: str) -> None:
    with _locks[("TTTSweep", namespace, name)]:
        api = cluster()
        sweep = api.get("TTTSweep", namespace, name)
        if sweep is None or sweep["metadata"].get("deletionTimestamp"):
            return
        trials = api.list("TTTJob", namespace, f"{sweeps.LABEL_SWEEP}={name}")
        children = sweeps.by_trial(owned_by(trials, sweep["metadata"]["uid"]))
        old = sweep.get("status") or {}
        template = sweep["spec"].get("template") or {}
        uri = (template.get("mlflow") or {}).get("trackingUri") or SETTINGS.mlflow_tracking_uri
        parent = old.get("mlflowRunId")
        if parent is None and not children and sweep_tracking.reachable_uri(uri):
            parent = _open_parent(sweep, uri)
        todo = sweeps.plan_sweep(sweep, children, now_iso(), parent)
        for job in todo.create:
            try:
                api.create(job)
            except ApiException as exc:
                if exc.status not in REFUSED:
                    raise
                message = f"the API server refused trial {job['metadata']['name']}: {_reason(exc)}"
                todo.status.update(phase=FAILED, message=message)
                todo.events = [("Warning", "TrialRejected", message)]
                break
        if (
            parent
            and todo.status.get("phase") in TERMINAL
            and not old.get("mlflowLogged")
            and not todo.create
        ):
            todo.status["mlflowLogged"] = _close_parent(sweep, uri, parent, children, todo.status.get("best"))
        api.patch_status("TTTSweep", namespace, name, todo.status)
        _post(sweep, todo.events)


def _open_parent(sweep: dict[str, Any], uri: str) -> str | None:
    """The sweep's MLflow parent run; trouble with MLflow must not hold the trials back."""
    try:
        spec, expansion = sweeps.trials_of(sweep)
        experiment = (sweep["spec"]["template"].get("mlflow") or {}).get("experiment", "ttt-e2e")
        return sweep_tracking.open_parent(uri, experiment, spec, expansion, sweep["metadata"]["name"])
    except (ConfigError, SpecError):
        return None  # plan_sweep reports the invalid spec
    except Exception as exc:
        _post(sweep, [("Warning", "MLflowUnavailable", f"no parent run at {uri}: {exc}")])
        return None


def _close_parent(sweep: dict, uri: str, parent: str, children: dict, best: dict | None) -> bool:
    try:
        spec, expansion = sweeps.trials_of(sweep)
        best_index = best["index"] if best else None
        sweep_tracking.close_parent(uri, parent, spec, expansion, children, best_index)
    except Exception as exc:
        _post(sweep, [("Warning", "MLflowUnavailable", f"could not finish parent run {parent}: {exc}")])
        return False
    return True


def _post(body: dict[str, Any], events: list[tuple[str, str, str]]) -> None:
    """Events are best-effort (status and RayJobs are the record): one that cannot be posted is logged."""
    meta = body["metadata"]
    for kind, reason, message in events:
        log.info("%s %s/%s: %s: %s", body["kind"], meta["namespace"], meta["name"], reason, message)
        try:
            cluster().post_event(body, kind, reason, message)
        except ApiException as exc:
            log.warning("could not post Event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)


def _reason(exc: ApiException) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


def _beyond_reach(path: str) -> bool:
    """A run directory on the runs volume, which is not mounted in this pod (the chart's default)."""
    mount = SETTINGS.runs_mount
    on_volume = not path.startswith("s3://") and PurePosixPath(path).is_relative_to(mount)
    return bool(SETTINGS.runs_pvc) and on_volume and not Path(mount).is_dir()


def _read_report(path: str, config: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the run's progress.json or None, why it could not be read). A run directory the operator cannot
    see (the runs volume, not mounted in its pod) is read from the run's MLflow run instead."""
    if _beyond_reach(path):
        report = from_mlflow(config) if isinstance(config, JobConfig) else None
        return report, None if report else "the run directory is not mounted here and MLflow has no run"
    try:
        return read_progress(open_storage(path)), None
    except Exception as exc:  # storage trouble must not stop status updates from the RayJob
        log.warning("cannot read progress of %s: %s", path, exc)
        return None, str(exc)


# -- triggers ---------------------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's bookkeeping goes into annotations: the TTTJob's status schema is ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="ttt.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="ttt.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # Events come from reconcile; kopf's own would duplicate them
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    logging.getLogger("ttt_operator").setLevel(SETTINGS.log_level)
    _stop.clear()
    threading.Thread(target=_poll, name="ttt-poll", daemon=True).start()


@kopf.on.cleanup()
def stop_polling(**_: Any) -> None:
    _stop.set()


def _poll() -> None:
    """Every poll_seconds, reconcile each TTTJob not finished (progress, retries, waits) that is not
    backing off."""
    while not _stop.wait(SETTINGS.poll_seconds):
        with _seen_lock:
            due = [key for key, phase in _seen.items() if phase not in TERMINAL]
        for key in due:
            if _stop.is_set():
                return
            if time.monotonic() < _waiting.get(key, (0, 0.0))[1]:
                continue
            try:
                reconcile(*key)
            except Exception as exc:  # the next poll tries again; one job must not stop the others
                log.warning("TTTJob %s/%s: reconcile failed, retried at the next poll: %s", *key, exc)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_job(namespace: str, name: str, **_: Any) -> None:
    reconcile(namespace, name)


@kopf.on.event(GROUP, VERSION, PLURAL)
def seen(type: str | None, namespace: str, name: str, status: dict[str, Any], **_: Any) -> None:
    with _seen_lock:
        if type == "DELETED":
            _seen.pop((namespace, name), None)
            _waiting.pop((namespace, name), None)
        else:
            _seen[(namespace, name)] = status.get("phase")


@kopf.on.event("ray.io", "v1", "rayjobs", labels={LABEL_JOB: kopf.PRESENT})
def on_rayjob(namespace: str, labels: dict[str, str], **_: Any) -> None:
    reconcile(namespace, labels[LABEL_JOB])


@kopf.on.resume(GROUP, VERSION, sweeps.SWEEP_PLURAL)
@kopf.on.create(GROUP, VERSION, sweeps.SWEEP_PLURAL)
@kopf.on.update(GROUP, VERSION, sweeps.SWEEP_PLURAL, field="spec")
def on_sweep(namespace: str, name: str, **_: Any) -> None:
    reconcile_sweep(namespace, name)


@kopf.on.event(GROUP, VERSION, PLURAL, labels={sweeps.LABEL_SWEEP: kopf.PRESENT})
def on_trial(namespace: str, labels: dict[str, str], **_: Any) -> None:
    reconcile_sweep(namespace, labels[sweeps.LABEL_SWEEP])
