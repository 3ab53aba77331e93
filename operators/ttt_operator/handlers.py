"""kopf handlers: thin. Every trigger of a TTTJob (created, changed or resumed after a restart; one of its
RayJobs changed; the progress timer) runs the same `reconcile`, which reads what exists, asks
`reconcile.plan` what to do, and does it. TTTSweeps likewise: `reconcile_sweep` on the sweep's own events
and on its trial TTTJobs' changes, deciding through `sweeps.plan_sweep`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from ttt.config import ConfigError
from ttt.storage import open_storage
from ttt.train.report import read_progress
from ttt_operator import builders, sweep_tracking, sweeps
from ttt_operator.builders import GROUP, LABEL_JOB, PLURAL, VERSION, SpecError
from ttt_operator.cluster import Cluster, KubeRayMissing, load_credentials
from ttt_operator.reconcile import annotate_preemptions, blocked, by_attempt, plan
from ttt_operator.settings import Settings
from ttt_operator.status import FAILED, PENDING, TERMINAL, now_iso

SETTINGS = Settings.from_env()
log = logging.getLogger("ttt_operator")
# Answers that will not change on a retry (bad request, forbidden, invalid): report them, do not retry.
REFUSED = (400, 403, 422)

# Handlers of an object and of what it owns run in different threads: one reconcile per object at a time.
_locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)
_cluster: Cluster | None = None


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
        try:
            rayjobs = by_attempt(api.rayjobs(namespace, name))
        except KubeRayMissing as exc:  # retried by the timer: installing KubeRay unblocks the job
            todo = plan(job, {}, None, config, run, now)
            todo.status = blocked(job, todo.status, PENDING, "KubeRayMissing", str(exc), now)
            todo.create, todo.events = None, [("Warning", "KubeRayMissing", str(exc))]
        else:
            report = _read_report(run[1]) if rayjobs else None
            todo = plan(job, rayjobs, report, config, run, now)
        for rayjob in todo.delete:
            api.delete("RayJob", namespace, rayjob)
        if todo.create is not None and not isinstance(config, SpecError):
            # Both children are built before either is created: a spec that cannot render leaves none.
            config_map = builders.config_map(job, todo.create, config)
            rayjob = builders.ray_job(job, todo.create, config, SETTINGS)
            rayjob = annotate_preemptions(rayjob, todo.status["preemptedAttempts"])
            try:
                api.create(config_map)
                api.create(rayjob)
            except ApiException as exc:
                if exc.status not in REFUSED:
                    raise  # transient: kopf retries the handler
                message = f"the API server refused attempt {todo.create}: {_reason(exc)}"
                todo.status = blocked(job, todo.status, FAILED, "RayJobRejected", message, now)
                todo.events = [("Warning", "RayJobRejected", message)]
        api.patch_status("TTTJob", namespace, name, todo.status)
        _post(job, todo.events)


def reconcile_sweep(namespace: str, name: str) -> None:
    with _locks[("TTTSweep", namespace, name)]:
        api = cluster()
        sweep = api.get("TTTSweep", namespace, name)
        if sweep is None or sweep["metadata"].get("deletionTimestamp"):
            return
        children = sweeps.by_trial(api.list("TTTJob", namespace, f"{sweeps.LABEL_SWEEP}={name}"))
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
    meta = body["metadata"]
    for kind, reason, message in events:
        kopf.event(body, type=kind, reason=reason, message=message)
        log.info("%s %s/%s: %s: %s", body["kind"], meta["namespace"], meta["name"], reason, message)


def _reason(exc: ApiException) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


def _read_report(path: str) -> dict[str, Any] | None:
    try:
        return read_progress(open_storage(path))
    except Exception as exc:  # storage trouble must not stop status updates from the RayJob
        log.warning("cannot read progress of %s: %s", path, exc)
        return None


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


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_job(namespace: str, name: str, **_: Any) -> None:
    reconcile(namespace, name)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=SETTINGS.poll_seconds,
    initial_delay=SETTINGS.poll_seconds,
    when=lambda status, **_: status.get("phase") not in TERMINAL,
)
def poll_progress(namespace: str, name: str, **_: Any) -> None:
    reconcile(namespace, name)


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
