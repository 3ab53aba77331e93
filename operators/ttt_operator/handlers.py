"""kopf handlers: thin. Every trigger (a TTTJob created, changed or resumed after a restart; a RayJob
changed; the progress timer) runs the same `reconcile`, which reads what exists, asks `reconcile.plan`
what to do, and does it.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

import kopf

from ttt.storage import open_storage
from ttt.train.report import read_progress
from ttt_operator import builders
from ttt_operator.builders import GROUP, LABEL_JOB, PLURAL, VERSION, SpecError
from ttt_operator.cluster import Cluster, load_credentials
from ttt_operator.reconcile import by_attempt, plan
from ttt_operator.settings import Settings
from ttt_operator.status import TERMINAL, now_iso

SETTINGS = Settings.from_env()
log = logging.getLogger("ttt_operator")

# Handlers of the TTTJob and of its RayJobs run in different threads: one reconcile per job at a time.
_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_cluster: Cluster | None = None


def cluster() -> Cluster:
    global _cluster
    if _cluster is None:
        load_credentials()
        _cluster = Cluster()
    return _cluster


def reconcile(namespace: str, name: str) -> None:
    with _locks[(namespace, name)]:
        api = cluster()
        job = api.get_job(namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        try:
            config = builders.render_config(job, SETTINGS)
        except SpecError as exc:
            config = exc
        run = (builders.run_name(job), builders.storage_path(job, SETTINGS))
        rayjobs = by_attempt(api.rayjobs(namespace, name))
        report = _read_report(run[1]) if rayjobs else None
        todo = plan(job, rayjobs, report, config, run, now_iso())
        for rayjob in todo.delete:
            api.delete_rayjob(namespace, rayjob)
        if todo.create is not None and not isinstance(config, SpecError):
            api.create(builders.config_map(job, todo.create, config))
            api.create(builders.ray_job(job, todo.create, config, SETTINGS))
        api.patch_status(namespace, name, todo.status)
        for kind, reason, message in todo.events:
            kopf.event(job, type=kind, reason=reason, message=message)
            log.info("%s/%s: %s: %s", namespace, name, reason, message)


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
