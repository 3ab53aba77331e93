"""The TTTJob CRD's schema: the examples pass it, and bad jobs are refused with the field named, through
the same admission chain (defaults, pruning, OpenAPI schema, CEL rules) as the API server."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from tests.helpers import ROOT
from tests.kube.crdschema import admit

CRDS = ROOT / "charts" / "ttt-platform" / "crds"
CRD = yaml.safe_load((CRDS / "tttjobs.ttt.dev.yaml").read_text())
SWEEP_CRD = yaml.safe_load((CRDS / "tttsweeps.ttt.dev.yaml").read_text())
EXAMPLES = sorted((ROOT / "jobs" / "examples").glob("*.yaml"))


def tiny() -> dict:
    return yaml.safe_load((ROOT / "jobs" / "examples" / "tiny-cpu.yaml").read_text())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_are_valid(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs and {d["kind"] for d in docs} <= {"TTTJob", "TTTSweep"}, path.name
    for doc in docs:
        assert admit(CRD if doc["kind"] == "TTTJob" else SWEEP_CRD, doc)[1] == []


def test_sweep_crd_is_generated_from_the_job_crd():
    """Its template schema is the TTTJob spec schema: regenerating it changes nothing."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "infra" / "gen-sweep-crd.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    template = SWEEP_CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    job_spec = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert {**template["properties"]["template"], "description": ""} == {**job_spec, "description": ""}


def sweep() -> dict:
    return yaml.safe_load((ROOT / "jobs" / "examples" / "sweep-tiny-cpu.yaml").read_text())


BAD_SWEEPS = [
    ({"parameters": []}, "spec.parameters"),
    ({"parameters": [{"name": "model.window_size", "values": []}]}, "spec.parameters[0].values"),
    ({"parameters": [{"name": "optim.lr", "min": 0.1, "max": 0.01, "num": 3}]}, "spec.parameters[0]"),
    ({"parameters": [{"name": "optim.lr", "min": 0.1}]}, "spec.parameters[0]"),
    ({"parameters": [{"name": "optim.lr", "values": [1], "min": 0.1, "max": 1}]}, "spec.parameters[0]"),
    ({"parameters": [{"name": "window", "values": [1]}]}, "spec.parameters[0].name"),
    ({"objective": {"metric": "val/accuracy"}}, "spec.objective.metric"),
    ({"parallelism": 0}, "spec.parallelism"),
    ({"algorithm": "bayes"}, "spec.algorithm"),
    ({"template": {"numNodes": 1}}, "spec.template"),  # neither recipe nor config
]


@pytest.mark.parametrize(
    ("change", "field"), BAD_SWEEPS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_SWEEPS)]
)
def test_bad_tttsweep_is_rejected_naming_the_field(change, field):
    doc = sweep()
    doc["spec"].update(change)
    _, errors = admit(SWEEP_CRD, doc)
    assert any(e.startswith(f"{field}:") or e.startswith(f"{field} ") for e in errors), errors


def test_defaults_are_filled_in():
    job = tiny()
    for key in ("numNodes", "gpusPerNode", "backoffLimit", "suspend"):
        job["spec"].pop(key, None)
    stored, errors = admit(CRD, job)
    assert errors == []
    spec = stored["spec"]
    assert (spec["numNodes"], spec["gpusPerNode"], spec["backoffLimit"], spec["suspend"]) == (1, 0, 2, False)


def test_unknown_fields_are_pruned_but_config_is_kept():
    job = tiny()
    job["spec"]["nodes"] = 3  # a typo of numNodes: dropped, as a real API server drops it
    job["spec"]["config"] = {"train": {"total_steps": 9, "anything": 1}}
    stored, errors = admit(CRD, job)
    assert errors == [] and "nodes" not in stored["spec"]
    assert stored["spec"]["config"] == job["spec"]["config"]  # checked by the operator instead


BAD = [
    # (change to the tiny example's spec or metadata, the field the error must name)
    ({"spec.numNodes": 0}, "spec.numNodes"),
    ({"spec.numNodes": 2000}, "spec.numNodes"),
    ({"spec.numNodes": "two"}, "spec.numNodes"),
    ({"spec.gpusPerNode": -1}, "spec.gpusPerNode"),
    ({"spec.gpusPerNode": 17}, "spec.gpusPerNode"),
    ({"spec.ttt": {"windowSize": 0}}, "spec.ttt.windowSize"),
    ({"spec.ttt": {"miniBatchSize": -4}}, "spec.ttt.miniBatchSize"),
    ({"spec.ttt": {"seqLen": 100, "miniBatchSize": 32}}, "spec.ttt"),
    ({"spec.recipe": "Tiny CPU"}, "spec.recipe"),
    ({"spec.recipe": None, "spec.config": None}, "spec"),
    ({"spec.overrides": ["total_steps=3"]}, "spec.overrides[0]"),
    ({"spec.overrides": "train.total_steps=3"}, "spec.overrides"),
    ({"spec.deepspeed": {"stage": 4}}, "spec.deepspeed.stage"),
    ({"spec.storageUri": "http://bucket/runs"}, "spec.storageUri"),
    ({"spec.storageUri": "relative/path"}, "spec.storageUri"),
    ({"spec.mlflow": {"experiment": ""}}, "spec.mlflow.experiment"),
    ({"spec.mlflow": {"trackingUri": "mlflow:5000"}}, "spec.mlflow.trackingUri"),
    ({"spec.backoffLimit": -1}, "spec.backoffLimit"),
    ({"spec.activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds"),
    ({"spec.suspend": "yes"}, "spec.suspend"),
    ({"spec.resources": {"cpu": "two"}}, "spec.resources.cpu"),
    ({"spec.resources": {"memory": "4 GB"}}, "spec.resources.memory"),
    ({"spec.resources": {"memory": "4ki"}}, "spec.resources.memory"),  # Kubernetes writes Ki
    ({"spec.resources": {"sharedMemory": "1gi"}}, "spec.resources.sharedMemory"),
    ({"spec.imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy"),
    ({"spec.image": ""}, "spec.image"),
    ({"spec.labels": {"queue": 3}}, "spec.labels.queue"),
    ({"spec.labels": {"queue": "h100 nodes"}}, "spec.labels.queue"),
    ({"metadata.name": "a-very-long-name-for-a-training-job-of-ours-x"}, "metadata.name"),
]


def mutate(job: dict, change: dict) -> dict:
    job = copy.deepcopy(job)
    for dotted, value in change.items():
        section, key = dotted.split(".", 1)
        if value is None:
            job[section].pop(key, None)
        else:
            job[section][key] = value
    return job


def test_there_are_enough_bad_cases():
    assert len(BAD) >= 15


@pytest.mark.parametrize(("change", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_tttjob_is_rejected_naming_the_field(change, field):
    _, errors = admit(CRD, mutate(tiny(), change))
    assert errors, f"{change} was accepted"
    assert any(e.startswith(f"{field}:") or e.startswith(f"{field} ") for e in errors), errors


# -- kubectl explain ------------------------------------------------------------------------------------

# Fields that hold a Kubernetes API type as it is: described once, naming the type's place in the Pod API,
# which `kubectl explain pod.spec.<field>` (or pod.spec.containers.<field>) documents field by field.
KUBERNETES_SHAPES = {
    "tolerations": "Pod spec.tolerations",
    "affinity": "Pod spec.affinity",
    "env": "container env",
    "envFrom": "container envFrom",
    "imagePullSecrets": "Pod spec.imagePullSecrets",
    "securityContext": "Pod spec.securityContext",
}


def undescribed(schema: dict, path: str) -> list[str]:
    """Paths of the properties under `schema` without a description (see the test for the rule)."""
    missing = []
    for name, sub in (schema.get("properties") or {}).items():
        where = f"{path}.{name}" if path else name
        if not (sub.get("description") or "").strip():
            missing.append(where)
        if name in KUBERNETES_SHAPES and path.startswith("spec"):
            if KUBERNETES_SHAPES[name] not in (sub.get("description") or ""):
                missing.append(f"{where} (its description must name {KUBERNETES_SHAPES[name]})")
            continue
        missing += undescribed(sub, where)
    if isinstance(schema.get("items"), dict):
        missing += undescribed(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        missing += undescribed(schema["additionalProperties"], f"{path}.*")
    return missing


@pytest.mark.parametrize("crd", [CRD, SWEEP_CRD], ids=["TTTJob", "TTTSweep"])
def test_every_field_has_a_description_for_kubectl_explain(crd):
    """The rule: every named property of the schema, at any depth (spec, status, the sweep's parameters,
    ranges and trials, apiVersion, kind and metadata too), has a non-empty description. Array items and
    map values are described by the field that holds them. The one exception: a field that holds a
    Kubernetes API type unchanged (KUBERNETES_SHAPES: tolerations, affinity, env, envFrom,
    imagePullSecrets, securityContext) has a description that names that type's place in the Pod API,
    and its sub-fields, the Kubernetes type's own, need none (kubectl explain pod.spec... has them)."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert (schema.get("description") or "").strip()
    assert undescribed(schema, "") == []


def test_the_description_check_finds_a_missing_one():
    schema = copy.deepcopy(CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    del schema["properties"]["status"]["properties"]["progress"]["properties"]["loss"]["description"]
    del schema["properties"]["spec"]["properties"]["worker"]["properties"]["env"]["description"]
    assert undescribed(schema, "") == [
        "spec.worker.env",
        "spec.worker.env (its description must name container env)",
        "status.progress.loss",
    ]


@pytest.mark.parametrize("crd", [CRD, SWEEP_CRD], ids=["TTTJob", "TTTSweep"])
def test_status_conditions_are_metav1_conditions(crd):
    """status.conditions in the shape of metav1.Condition (what status.py writes), each part described,
    merged by type."""
    conditions = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"
    ]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == [
        "type"
    ]
    item = conditions["items"]
    fields = item["properties"]
    assert set(fields) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
    assert all(f.get("description") for f in fields.values()), fields
    assert {"type", "status"} <= set(item["required"])
    assert fields["status"]["enum"] == ["True", "False", "Unknown"]
    assert fields["lastTransitionTime"] == {
        **fields["lastTransitionTime"],
        "type": "string",
        "format": "date-time",
    }
    assert fields["observedGeneration"]["type"] == "integer"
