"""TTTSweep: pure functions. The sweep's trials come from the same `ttt.sweep.spec.expand` as `ttt sweep`;
each trial is a TTTJob `<sweep>-t<index>` owned by the sweep, created lowest index first while fewer than
`parallelism` are unfinished. Like TTTJobs, decisions come from what exists (the labelled children).
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from typing import Any

from ttt.config import ConfigError
from ttt.jobspec import KNOBS, SpecError, job_config
from ttt.sweep.spec import Expansion, SweepSpec, Trial, expand, from_resource, resource_field
from ttt_operator.builders import GROUP, KIND, MAX_JOB_NAME, VERSION, by_index, child_name
from ttt_operator.status import FAILED, PENDING, RUNNING, SUCCEEDED, TERMINAL, set_condition

SWEEP_PLURAL = "tttsweeps"
SWEEP_KIND = "TTTSweep"
LABEL_SWEEP = "ttt.dev/sweep"
LABEL_TRIAL = "ttt.dev/trial"
_KNOB_OF = {dotted: knob for knob, dotted in KNOBS.items()}


@dataclass
class SweepPlan:
    create: list[dict[str, Any]] = field(default_factory=list)
    """TTTJob manifests to create."""
    status: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)


def trials_of(sweep: dict[str, Any]) -> tuple[SweepSpec, Expansion]:
    """The sweep's spec and trials; a ConfigError/SpecError names the field in the TTTSweep. Expanding
    validates every trial's config, and a sweep is reconciled on every status change of every trial: the
    result is kept per spec content (the returned objects are shared: read them, do not change them)."""
    meta = sweep.get("metadata") or {}
    return _expand_resource(json.dumps({"name": meta.get("name"), "spec": sweep.get("spec")}, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _expand_resource(key: str) -> tuple[SweepSpec, Expansion]:
    content = json.loads(key)
    spec, template = from_resource({"metadata": {"name": content["name"]}, "spec": content["spec"]})
    try:
        base = job_config(template)
    except SpecError as exc:
        raise SpecError(exc.field.replace("spec.", "spec.template.", 1), exc.message) from None
    try:
        return spec, expand(spec, base)
    except ConfigError as exc:
        raise ConfigError(resource_field(exc.field), exc.message) from None


def trial_name(sweep_name: str, index: int) -> str:
    """The trial's TTTJob, `<sweep>-t<index>`: a TTTJob name (at most 42 characters, for its attempts'
    RayJobs) for any index, shortened with a hash like an attempt's name where it would not fit."""
    return child_name(sweep_name, f"-t{index}", MAX_JOB_NAME)


def trial_job(sweep: dict[str, Any], trial: Trial, parent_run_id: str | None = None) -> dict[str, Any]:
    """The trial's TTTJob: the template with the trial's values, as knobs where the spec has one, and
    its MLflow run a child of the sweep's."""
    meta = sweep["metadata"]
    spec = copy.deepcopy(sweep["spec"]["template"])
    overrides = list(spec.get("overrides") or [])
    if parent_run_id:
        overrides.append(f"tracking.parent_run_id={json.dumps(parent_run_id)}")
    for name, value in trial.params.items():
        if name in _KNOB_OF:
            # The checked config's value: the knob is an integer in the CRD even when the sweep listed
            # "32" or 32.0, which the config accepts and the API server would refuse.
            section, key = name.split(".")
            spec.setdefault("ttt", {})[_KNOB_OF[name]] = getattr(getattr(trial.config, section), key)
        else:
            overrides.append(f"{name}={json.dumps(value)}")
    if overrides:
        spec["overrides"] = overrides
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": trial_name(meta["name"], trial.index),
            "namespace": meta["namespace"],
            "labels": {LABEL_SWEEP: meta["name"], LABEL_TRIAL: str(trial.index)},
            "annotations": {"ttt.dev/parameters": json.dumps(trial.params)},
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": SWEEP_KIND,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def by_trial(jobs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return by_index(jobs, LABEL_TRIAL)


def objective_of(job: dict[str, Any], metric: str) -> float | None:
    value = ((job.get("status") or {}).get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


def plan_sweep(
    sweep: dict[str, Any], children: dict[int, dict[str, Any]], now: str, parent_run_id: str | None = None
) -> SweepPlan:
    old = sweep.get("status") or {}
    generation = sweep["metadata"].get("generation")
    out = SweepPlan()
    try:
        spec, expansion = trials_of(sweep)
    except (ConfigError, SpecError) as exc:
        return _invalid(sweep, out, str(exc), now)
    metric, maximize = spec.objective.metric, spec.objective.goal == "maximize"
    parallelism = spec.parallelism

    phase_of = {i: (job.get("status") or {}).get("phase", PENDING) for i, job in children.items()}
    unfinished = sum(phase not in TERMINAL for phase in phase_of.values())
    for trial in expansion.trials:
        if unfinished >= parallelism:
            break
        if trial.index not in children:
            out.create.append(trial_job(sweep, trial, parent_run_id))
            phase_of[trial.index] = PENDING
            unfinished += 1
            out.events.append(("Normal", "TrialCreated", f"trial {trial.index}: {trial.label()}"))

    rows = []
    for trial in expansion.trials:
        job = children.get(trial.index)
        row: dict[str, Any] = {
            "index": trial.index,
            "name": trial_name(sweep["metadata"]["name"], trial.index),
        }
        row["parameters"] = trial.params
        row["phase"] = phase_of.get(trial.index, "NotStarted")
        if job is not None:
            value = objective_of(job, metric)
            if value is not None:
                row["objective"] = value
            run = (job.get("status") or {}).get("mlflowRunId")
            if run:
                row["mlflowRunId"] = run
        rows.append(row)
    scored = [r for r in rows if r["phase"] == SUCCEEDED and "objective" in r]
    best = (max if maximize else min)(scored, key=lambda r: r["objective"]) if scored else None

    counts = {
        "total": len(expansion.trials),
        "created": len(phase_of),
        "running": sum(p == RUNNING for p in phase_of.values()),
        "succeeded": sum(p == SUCCEEDED for p in phase_of.values()),
        "failed": sum(p == FAILED for p in phase_of.values()),
        "skipped": len(expansion.skipped),
    }
    done = counts["succeeded"] + counts["failed"] == counts["total"]
    if done and best is not None:
        phase, reason = SUCCEEDED, "TrialsFinished"
        message = f"{counts['succeeded']} of {counts['total']} trials succeeded; best: {best['name']}"
    elif done:
        phase, reason, message = FAILED, "AllTrialsFailed", f"all {counts['total']} trials failed"
    else:
        phase, reason = (RUNNING if phase_of else PENDING), "TrialsRunning"
        message = f"{counts['created']} of {counts['total']} trials started, {counts['succeeded']} succeeded"

    if phase != old.get("phase") and phase in TERMINAL:
        out.events.append(("Warning" if phase == FAILED else "Normal", reason, message))
    conditions = old.get("conditions") or []
    for kind in (RUNNING, SUCCEEDED, FAILED):
        conditions = set_condition(
            conditions,
            kind,
            phase == kind,
            reason if phase == kind else f"Not{kind}",
            message,
            generation,
            now,
        )
    status: dict[str, Any] = {
        **counts,
        "phase": phase,
        "message": message,
        "observedGeneration": generation,
        "trials": rows,
        "conditions": conditions,
        "startTime": old.get("startTime") or now,
        "completionTime": (old.get("completionTime") or now) if phase in TERMINAL else None,
        "best": None,
        "mlflowRunId": parent_run_id,
    }
    if best is not None:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in best["parameters"].items())
        status["best"] = {
            **best,
            "metric": metric,
            "summary": f"t{best['index']} {label}: {best['objective']:.4f}",
        }
    out.status = status
    return out


def _invalid(sweep: dict[str, Any], out: SweepPlan, message: str, now: str) -> SweepPlan:
    old = sweep.get("status") or {}
    generation = sweep["metadata"].get("generation")
    conditions = set_condition(
        old.get("conditions") or [], FAILED, True, "InvalidSpec", message, generation, now
    )
    out.status = {
        "phase": FAILED,
        "message": message,
        "observedGeneration": generation,
        "conditions": conditions,
        "completionTime": old.get("completionTime") or now,
    }
    if old.get("phase") != FAILED:
        out.events.append(("Warning", "InvalidSpec", message))
    return out
