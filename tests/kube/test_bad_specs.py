"""Generated bad TTTJob and TTTSweep specs, through the CRD's admission (as the API server does it) and then
the operator's render: every spec is refused naming a field, rendered, or marked invalid with a SpecError
naming a spec field, and nothing is ever half-created (a sweep creates no trial unless every trial it will
create passes the TTTJob CRD, a job's ConfigMap and RayJob are both built before either is created).

Hypothesis runs derandomized and without its example database, so CI sees the same examples every time.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import DATA, ROOT, generated
from tests.kube.crdschema import admit
from ttt import config as cfgmod
from ttt.config import ConfigError
from ttt.jobspec import SpecError
from ttt_operator import builders, sweeps
from ttt_operator.settings import Settings

CRDS = ROOT / "charts" / "ttt-platform" / "crds"
CRD = yaml.safe_load((CRDS / "tttjobs.ttt.dev.yaml").read_text())
SWEEP_CRD = yaml.safe_load((CRDS / "tttsweeps.ttt.dev.yaml").read_text())
RAYJOB_CRD = yaml.safe_load((DATA / "kuberay" / "ray.io_rayjobs.yaml").read_text())
SETTINGS = Settings()
FIELDS = sorted(cfgmod.flatten(cfgmod.preset("tiny")))


@lru_cache(maxsize=1)
def example(name: str) -> str:
    return (ROOT / "jobs" / "examples" / name).read_text()


# Integers stay within int64: the API server refuses larger ones before admission, as a bad request.
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    # JSON has no NaN or infinity (kubectl cannot send one); whole floats past int64 are refused like ints.
    st.floats(min_value=-1e15, max_value=1e15),
    st.booleans(),
    st.none(),
    st.text(max_size=10),
    st.sampled_from(["", "0", "-1", "2", "500m", "4Gi", "s3://b", "/runs", "tiny-cpu", "ü-名", "a" * 300]),
)
# Keys without line breaks: the API server puts a map's key into the field path of its error as it is.
keys = st.text(alphabet=st.characters(blacklist_characters="\n\r"), max_size=6)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=5,
)
config_sections = st.dictionaries(
    st.sampled_from(
        ["model", "ttt", "optim", "train", "data", "scale", "storage", "tracking", "preset", "x"]
    ),
    junk
    | st.dictionaries(
        st.sampled_from([f.split(".")[1] for f in FIELDS]) | st.text(max_size=5), junk, max_size=3
    ),
    max_size=3,
)
overrides = st.lists(
    st.tuples(st.sampled_from(FIELDS) | st.sampled_from(["model.x", "a.b", "train.seq_len.x"]), junk).map(
        lambda kv: f"{kv[0]}={kv[1]}"
    )
    | st.text(max_size=12),
    max_size=3,
)
SPEC_FIELDS = {
    "recipe": st.sampled_from(["tiny-cpu", "nope", "Tiny", ""]) | junk,
    "config": config_sections | junk,
    "overrides": overrides | junk,
    "ttt": st.fixed_dictionaries(
        {},
        optional={
            k: st.integers(min_value=-5, max_value=2**20) | junk
            for k in ("windowSize", "miniBatchSize", "seqLen")
        },
    )
    | junk,
    "numNodes": st.integers(min_value=-1, max_value=2000) | junk,
    "gpusPerNode": st.integers(min_value=-1, max_value=20) | junk,
    "resources": st.fixed_dictionaries(
        {},
        optional={
            k: st.sampled_from(["0", "0.5", "500m", "2", "1000", "4Gi", "1Ti", "x"]) | junk
            for k in ("cpu", "memory", "sharedMemory")
        },
    )
    | junk,
    "deepspeed": st.fixed_dictionaries({}, optional={"stage": st.integers(min_value=-1, max_value=5) | junk})
    | junk,
    "storageUri": st.sampled_from(["/runs", "s3://bucket/runs", "s3://b", "relative", "/"]) | junk,
    "mlflow": st.fixed_dictionaries(
        {},
        optional={
            "experiment": st.text(max_size=6) | junk,
            "trackingUri": st.sampled_from(["http://m:5000", "x"]) | junk,
        },
    )
    | junk,
    "terminationGracePeriodSeconds": st.integers(min_value=-1, max_value=4000) | junk,
    "activeDeadlineSeconds": st.integers(min_value=-1, max_value=2**40) | junk,
    "labels": st.dictionaries(
        st.sampled_from(["queue", "kueue.x-k8s.io/queue-name", "Bad Key"]), junk, max_size=2
    )
    | junk,
    "image": st.text(max_size=8) | junk,
    "suspend": st.booleans() | junk,
    "unknownField": junk,
}
# The Ray pods' customisation: mostly valid values with a few bad ones (junk only in place of a whole
# field), so that many get past the CRD and the RayJob they make is put to KubeRay's CRD.
toleration = st.fixed_dictionaries(
    {},
    optional={
        "key": st.sampled_from(["nvidia.com/gpu", "nvidia.com/gpu", ""]),
        "operator": st.sampled_from(["Exists", "Exists", "Equal", "In"]),
        "value": st.sampled_from(["", "true"]),
        "effect": st.sampled_from(["NoSchedule", "NoExecute", "Later"]),
        "tolerationSeconds": st.integers(min_value=-1, max_value=10**6),
    },
)
env_var = st.fixed_dictionaries(
    {"name": st.sampled_from(["NCCL_DEBUG", "FI_PROVIDER", "AWS_ENDPOINT_URL", "TTT_ATTEMPT", "a b"])},
    optional={
        "value": st.text(max_size=5),
        "valueFrom": st.sampled_from(
            [
                {"fieldRef": {"fieldPath": "status.hostIP"}},
                {"secretKeyRef": {"name": "s", "key": "k"}},
                {"x": {}},
            ]
        ),
    },
)
node_affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}]}}
placement = {
    "nodeSelector": st.dictionaries(
        st.sampled_from(["pool", "a/b"]), st.sampled_from(["gpu", "h100", "x y"])
    ),
    "tolerations": st.lists(toleration, max_size=2),
    "affinity": st.sampled_from([{}, {"nodeAffinity": node_affinity}, {"podAffinity": []}]),
    "env": st.lists(env_var, max_size=2),
}
extra_resources = st.dictionaries(
    st.sampled_from(["vpc.amazonaws.com/efa", "rdma/hca", "efa", "nvidia.com/gpu"]),
    st.sampled_from([1, "4", 32, "0.5", -1]),
    max_size=2,
)
POD_SPEC_FIELDS = {
    "head": st.fixed_dictionaries({}, optional={**placement, "resources": SPEC_FIELDS["resources"]}),
    "worker": st.fixed_dictionaries(
        {},
        optional={
            **placement,
            "extraResources": extra_resources,
            "capabilities": st.lists(st.sampled_from(["IPC_LOCK", "SYS_NICE", "ipc"]), max_size=2),
        },
    ),
    "env": st.lists(env_var, max_size=2),
    "envFrom": st.lists(st.sampled_from([{"secretRef": {"name": "s"}}, {"prefix": "X"}]), max_size=2),
    "serviceAccountName": st.sampled_from(["ttt", "s3-writer", "Bad Name"]),
    "priorityClassName": st.sampled_from(["high", "x" * 300]),
    "imagePullSecrets": st.lists(st.sampled_from([{"name": "pull"}, {}]), max_size=2),
    "securityContext": st.fixed_dictionaries(
        {},
        optional={
            "fsGroup": st.integers(min_value=-1, max_value=2**31),
            "fsGroupChangePolicy": st.sampled_from(["OnRootMismatch", "Never"]),
        },
    ),
    "ttlSecondsAfterFinished": st.integers(min_value=-1, max_value=10**6),
}
SPEC_FIELDS |= {name: strategy | junk for name, strategy in POD_SPEC_FIELDS.items()}
changes = st.dictionaries(st.sampled_from(sorted(SPEC_FIELDS)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: SPEC_FIELDS[k] for k in keys})
)


def one_line(text: str) -> bool:
    return bool(text) and "\n" not in text and "\r" not in text and "Traceback" not in text


def stored(doc: dict, uid: str = "0d9c5a7e-1111-2222-3333-444455556666") -> dict:
    """What the API server hands the operator: the object plus the metadata it fills in."""
    out = copy.deepcopy(doc)
    out["metadata"].update(namespace="research", uid=uid, generation=1)
    return out


@generated(120)
@given(changes, st.sampled_from([None, []]))
def test_generated_tttjobs_are_refused_rendered_or_invalid_naming_a_spec_field(change, drop):
    job = yaml.safe_load(example("tiny-cpu.yaml"))
    job["spec"].update(change)
    if drop is not None:
        job["spec"].pop("recipe", None)
    refused_rendered_or_invalid(job)


pod_changes = st.dictionaries(
    st.sampled_from(sorted(POD_SPEC_FIELDS)), st.none(), min_size=1, max_size=4
).flatmap(lambda keys: st.fixed_dictionaries({k: POD_SPEC_FIELDS[k] for k in keys}))


@generated(80)
@given(pod_changes)
def test_generated_pod_customisation_is_refused_or_makes_a_rayjob_kuberay_takes(change):
    """The Ray pods' fields alone on a job that renders: more of them get past the CRD to the RayJob."""
    job = yaml.safe_load(example("tiny-cpu.yaml"))
    job["spec"].update(change)
    refused_rendered_or_invalid(job)


def refused_rendered_or_invalid(job: dict) -> None:
    admitted, errors = admit(CRD, job)
    if errors:
        assert all(one_line(e) for e in errors), errors
        return
    job = stored(admitted)
    try:
        cfg = builders.render_config(job, SETTINGS)
    except SpecError as exc:
        assert one_line(str(exc)) and exc.field.startswith("spec."), str(exc)
        return
    # Rendered: both children build, and the API server would take the RayJob (KubeRay's own CRD).
    assert builders.config_map(job, 1, cfg)["data"]
    rayjob = builders.ray_job(job, 1, cfg, SETTINGS)
    assert admit(RAYJOB_CRD, rayjob)[1] == []


parameters = st.lists(
    st.fixed_dictionaries(
        # The knobs (spec.ttt) half the time: their values reach the trial's TTTJob spec typed by the CRD.
        {
            "name": st.sampled_from(["model.window_size", "ttt.mini_batch_size", "train.seq_len"])
            | st.sampled_from([*FIELDS, "window", "model"])
        },
        optional={
            "values": st.lists(
                st.sampled_from([16, 32, 64, 256, "32", "64", 32.0, 64.0, 1e9, -1, True, "x" * 300]) | junk,
                min_size=0,
                max_size=3,
            ),
            "min": st.floats(min_value=-1e6, max_value=1e6) | junk,
            "max": st.floats(min_value=-1e6, max_value=1e9),
            "num": st.integers(min_value=-1, max_value=20000),
            "step": st.floats(min_value=-1, max_value=1e6),
            "scale": st.sampled_from(["linear", "log", "cubic"]),
        },
    ),
    max_size=3,
)
SWEEP_FIELDS = {
    "parameters": parameters | junk,
    "algorithm": st.sampled_from(["grid", "random", "bayes"]) | junk,
    "maxTrials": st.integers(min_value=-1, max_value=2**20) | junk,
    "parallelism": st.integers(min_value=-1, max_value=5) | junk,
    "objective": st.fixed_dictionaries(
        {},
        optional={
            "metric": st.sampled_from(["val/loss", "acc"]),
            "goal": st.sampled_from(["minimize", "up"]),
        },
    )
    | junk,
    "earlyStopping": st.fixed_dictionaries({}, optional={"gracePeriod": junk, "method": junk}) | junk,
    "skipInvalid": st.booleans() | junk,
    "seed": st.integers(min_value=-1, max_value=2**63 - 1) | junk,
    "template": st.fixed_dictionaries(
        {}, optional={k: SPEC_FIELDS[k] for k in ("recipe", "config", "overrides", "ttt")}
    ),
}
sweep_changes = st.dictionaries(st.sampled_from(sorted(SWEEP_FIELDS)), st.none(), max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: SWEEP_FIELDS[k] for k in keys})
)


@generated(100)
@given(sweep_changes, st.sampled_from(["tiny-w-b", "s", "a" * 36]))
def test_generated_tttsweeps_create_only_admissible_trials_or_none(change, name):
    doc = yaml.safe_load(example("sweep-tiny-cpu.yaml"))
    doc["metadata"]["name"] = name
    template = change.pop("template", None)
    if template is not None:
        doc["spec"]["template"].update(template)
    doc["spec"].update(change)
    admitted, errors = admit(SWEEP_CRD, doc)
    if errors:
        assert all(one_line(e) for e in errors), errors
        return
    sweep = stored(admitted)
    try:
        _, expansion = sweeps.trials_of(sweep)
    except (ConfigError, SpecError) as exc:
        assert one_line(str(exc)) and exc.field.startswith("spec"), str(exc)
        plan = sweeps.plan_sweep(sweep, {}, "2025-01-01T00:00:00Z")
        assert plan.create == [] and plan.status["phase"] == "Failed"  # no trial of an invalid sweep
        return
    # Every trial the sweep will ever create is admitted by the TTTJob CRD and renders: checked before
    # the first one is created, so a sweep never stops half-way on a refused trial.
    for trial in expansion.trials:
        child = sweeps.trial_job(sweep, trial, parent_run_id="0123abcd")
        admitted_child, child_errors = admit(CRD, child)
        assert child_errors == [], (trial.params, child_errors)
        builders.render_config(stored(admitted_child, uid=f"9{trial.index:035d}"), SETTINGS)


def test_knob_values_the_config_accepts_reach_the_trial_typed_for_the_crd():
    """A sweep may list window sizes as "32" or 64.0 (the config takes both); the trial's spec.ttt must
    hold integers, or the API server refuses the trial after its siblings were created."""
    doc = yaml.safe_load(example("sweep-tiny-cpu.yaml"))
    doc["spec"]["parameters"] = [{"name": "model.window_size", "values": ["32", 64.0]}]
    admitted, errors = admit(SWEEP_CRD, doc)
    assert errors == []
    sweep = stored(admitted)
    _, expansion = sweeps.trials_of(sweep)
    windows = []
    for trial in expansion.trials:
        child = sweeps.trial_job(sweep, trial)
        assert admit(CRD, child)[1] == []
        windows.append(child["spec"]["ttt"]["windowSize"])
    assert windows == [32, 64] and all(type(w) is int for w in windows)


def test_a_preset_in_a_recipe_jobs_config_is_named_once():
    job = yaml.safe_load(example("tiny-cpu.yaml"))
    job["spec"]["config"] = {"preset": "tiny"}
    try:
        builders.render_config(stored(job), SETTINGS)
    except SpecError as exc:
        assert exc.field == "spec.config.preset", str(exc)
    else:
        raise AssertionError("a preset merged into a recipe was accepted")
