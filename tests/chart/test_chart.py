"""The Helm chart: lint, render, validate the objects against the Kubernetes schemas, and check the contract
between the chart and the operator (environment, RBAC, volumes, MLflow).

helm runs offline (`lint`, `template`, `install --dry-run=client`), with its home folders in a temp dir.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.chart.helm import CHART, KUBE_VERSIONS, NAMESPACE, RELEASE, Helm

EXTERNAL_VALUES = CHART / "ci" / "external-values.yaml"
FULLNAME = f"{RELEASE}-ttt-platform"
BUILTIN_GROUPS = {"", "apps", "rbac.authorization.k8s.io", "apiextensions.k8s.io", "policy", "batch"}

OPERATOR_CONTRACT = [
    "TTT_OPERATOR_NAMESPACES",
    "TTT_DEFAULT_IMAGE",
    "TTT_MLFLOW_TRACKING_URI",
    "TTT_STORAGE_URI",
    "TTT_RUNS_PVC",
    "TTT_RUNS_MOUNT",
    "TTT_S3_ENDPOINT_URL",
    "TTT_S3_SECRET",
    "TTT_IMAGE_PULL_SECRETS",
    "TTT_RAYJOB_TTL_SECONDS",
    "TTT_RETRY_BACKOFF_SECONDS",
    "TTT_RETRY_BACKOFF_CAP_SECONDS",
    "TTT_RAY_VERSION",
    "TTT_LOG_LEVEL",
]


@pytest.fixture(scope="session")
def default_objects(helm: Helm) -> list[dict[str, Any]]:
    return helm.render()


@pytest.fixture(scope="session")
def external_objects(helm: Helm) -> list[dict[str, Any]]:
    return helm.render("-f", str(EXTERNAL_VALUES))


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        obj for obj in objects if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]


def the(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    (only,) = the(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return only


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    env = container(objects, f"{FULLNAME}-operator")["env"]
    return {var["name"]: var.get("value") for var in env}


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# ---------- helm lint / template ----------


@pytest.mark.parametrize("values", [[], ["-f", str(EXTERNAL_VALUES)]], ids=["default", "external"])
@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint(helm: Helm, values: list[str], strict: bool) -> None:
    result = helm.run("lint", str(CHART), *(["--strict"] if strict else []), *values)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_default_render_has_every_component(default_objects: list[dict[str, Any]]) -> None:
    kinds = sorted((obj["kind"], obj["metadata"]["name"]) for obj in default_objects)
    assert kinds == sorted(
        [
            ("ServiceAccount", f"{FULLNAME}-operator"),
            ("Deployment", f"{FULLNAME}-operator"),
            ("ClusterRole", f"{FULLNAME}-operator"),
            ("ClusterRoleBinding", f"{FULLNAME}-operator"),
            ("ClusterRole", f"{FULLNAME}-operator-discovery"),
            ("ClusterRoleBinding", f"{FULLNAME}-operator-discovery"),
            ("PersistentVolumeClaim", f"{FULLNAME}-runs"),
            ("Deployment", f"{FULLNAME}-mlflow"),
            ("Service", f"{FULLNAME}-mlflow"),
            ("PersistentVolumeClaim", f"{FULLNAME}-mlflow"),
            ("Pod", f"{FULLNAME}-test-mlflow"),
        ]
    )
    for obj in default_objects:
        labels = obj["metadata"]["labels"]
        assert labels["helm.sh/chart"] == "ttt-platform-0.1.0"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize(
    "values",
    [
        [],
        ["-f", str(EXTERNAL_VALUES)],
        ["--set", "mlflow.enabled=false", "--set", "mlflow.external.trackingUri=https://mlflow.example.com"],
        ["--set", "storage.existingClaim=shared-runs", "--set", "imagePullSecrets[0]=registry"],
        ["--set", "operator.mountRunsVolume=true", "--set", "image.repository=registry.local:5000/ttt"],
    ],
    ids=["default", "external", "mlflow-external", "existing-claim", "operator-mounts-runs"],
)
def test_builtin_objects_pass_kubernetes_schemas(helm: Helm, values: list[str], kube_version: str) -> None:
    # CRDs too (crds/ is copied verbatim). The chart must render no custom resource: the validator skips them.
    objects = helm.render(*values, crds=True)
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        assert group in BUILTIN_GROUPS, f"{obj['kind']} {obj['apiVersion']} is not a built-in kind"
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(
                f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {kube_version}): {error.message}"
            )


# ---------- the operator's environment contract ----------


class _Recorder(dict):
    """An environment that remembers which variables were asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return default


def test_chart_sets_what_the_operator_reads(default_objects: list[dict[str, Any]]) -> None:
    from ttt_operator.settings import Settings

    env = _Recorder()
    Settings.from_env(env)
    assert env.asked - {"TTT_POLL_SECONDS"} == set(OPERATOR_CONTRACT)
    assert set(OPERATOR_CONTRACT) <= set(operator_env(default_objects))


def test_operator_env_with_defaults(default_objects: list[dict[str, Any]]) -> None:
    env = operator_env(default_objects)
    assert {name: env[name] for name in OPERATOR_CONTRACT} == {
        "TTT_OPERATOR_NAMESPACES": "",
        "TTT_DEFAULT_IMAGE": "ttt-platform/ttt:0.1.0",
        "TTT_MLFLOW_TRACKING_URI": f"http://{FULLNAME}-mlflow.{NAMESPACE}.svc:5000",
        "TTT_STORAGE_URI": "/runs",
        "TTT_RUNS_PVC": f"{FULLNAME}-runs",
        "TTT_RUNS_MOUNT": "/runs",
        "TTT_S3_ENDPOINT_URL": "",
        "TTT_S3_SECRET": "",
        "TTT_IMAGE_PULL_SECRETS": "",
        "TTT_RAYJOB_TTL_SECONDS": "3600",
        "TTT_RETRY_BACKOFF_SECONDS": "10",
        "TTT_RETRY_BACKOFF_CAP_SECONDS": "360",
        "TTT_RAY_VERSION": "2.60.0",
        "TTT_LOG_LEVEL": "INFO",
    }


def test_operator_env_with_external_values(external_objects: list[dict[str, Any]]) -> None:
    env = operator_env(external_objects)
    assert {name: env[name] for name in OPERATOR_CONTRACT} == {
        "TTT_OPERATOR_NAMESPACES": "team-a,team-b",
        "TTT_DEFAULT_IMAGE": "ttt-platform/ttt:0.1.0",
        "TTT_MLFLOW_TRACKING_URI": f"http://{FULLNAME}-mlflow.{NAMESPACE}.svc:5000",
        "TTT_STORAGE_URI": "s3://ttt-runs/platform",
        "TTT_RUNS_PVC": "",
        "TTT_RUNS_MOUNT": "/runs",
        "TTT_S3_ENDPOINT_URL": "http://minio.storage.svc:9000",
        "TTT_S3_SECRET": "ttt-s3",
        "TTT_IMAGE_PULL_SECRETS": "",
        "TTT_RAYJOB_TTL_SECONDS": "3600",
        "TTT_RETRY_BACKOFF_SECONDS": "10",
        "TTT_RETRY_BACKOFF_CAP_SECONDS": "360",
        "TTT_RAY_VERSION": "2.60.0",
        "TTT_LOG_LEVEL": "DEBUG",
    }
    operator = container(external_objects, f"{FULLNAME}-operator")
    assert operator["envFrom"] == [{"secretRef": {"name": "ttt-s3"}}]


def test_operator_env_follows_values(helm: Helm) -> None:
    objects = helm.render(
        *("--set", "image.repository=registry.example.com/ttt", "--set", "image.tag=1.2.3"),
        *("--set", "operator.rayVersion=2.53.1", "--set", "storage.uri=/runs/team-a"),
        *("--set", "mlflow.enabled=false", "--set", "mlflow.external.trackingUri=https://mlflow.example.com"),
    )
    env = operator_env(objects)
    assert env["TTT_DEFAULT_IMAGE"] == "registry.example.com/ttt:1.2.3"
    # The operator has an image of its own; the tag follows image.tag.
    assert container(objects, f"{FULLNAME}-operator")["image"] == "ttt-platform/operator:1.2.3"
    assert env["TTT_RAY_VERSION"] == "2.53.1"
    assert env["TTT_STORAGE_URI"] == "/runs/team-a"
    assert env["TTT_RUNS_PVC"] == f"{FULLNAME}-runs"
    assert env["TTT_MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert not [obj for obj in objects if "mlflow" in obj["metadata"]["name"]]


def test_pull_secrets_and_rayjob_ttl_reach_the_operator(helm: Helm) -> None:
    chart_secrets = ("--set", "imagePullSecrets[0]=registry", "--set", "imagePullSecrets[1].name=mirror")
    env = operator_env(helm.render(*chart_secrets, "--set", "operator.rayJobTTLSeconds=0"))
    # By default TTTJobs pull with the chart's own secrets, whichever way they are written.
    assert (env["TTT_IMAGE_PULL_SECRETS"], env["TTT_RAYJOB_TTL_SECONDS"]) == ("registry,mirror", "0")
    env = operator_env(helm.render(*chart_secrets, "--set", "operator.jobImagePullSecrets={jobs-a,jobs-b}"))
    assert env["TTT_IMAGE_PULL_SECRETS"] == "jobs-a,jobs-b"

    from ttt_operator.settings import Settings

    settings = Settings.from_env(env)
    assert (settings.image_pull_secrets, settings.rayjob_ttl_seconds) == (("jobs-a", "jobs-b"), 3600)


def test_images_from_a_registry_with_a_port(helm: Helm) -> None:
    objects = helm.render(
        *("--set", "image.repository=registry.local:5000/ttt", "--set", "image.tag=1.2.3"),
        *("--set", "operator.image.repository=registry.local:5000/ttt-operator"),
        *("--set", "mlflow.image.repository=registry.local:5000/ttt-mlflow"),
    )
    assert operator_env(objects)["TTT_DEFAULT_IMAGE"] == "registry.local:5000/ttt:1.2.3"
    assert container(objects, f"{FULLNAME}-operator")["image"] == "registry.local:5000/ttt-operator:1.2.3"
    assert container(objects, f"{FULLNAME}-mlflow")["image"] == "registry.local:5000/ttt-mlflow:1.2.3"


def test_operator_and_mlflow_have_slim_images_of_their_own(default_objects: list[dict[str, Any]]) -> None:
    assert container(default_objects, f"{FULLNAME}-operator")["image"] == "ttt-platform/operator:0.1.0"
    assert container(default_objects, f"{FULLNAME}-mlflow")["image"] == "ttt-platform/mlflow:0.1.0"
    hook = the(default_objects, "Pod", f"{FULLNAME}-test-mlflow")["spec"]["containers"][0]
    assert hook["image"] == "ttt-platform/mlflow:0.1.0"
    assert operator_env(default_objects)["TTT_DEFAULT_IMAGE"] == "ttt-platform/ttt:0.1.0"


def test_operator_pod_hardening(default_objects: list[dict[str, Any]]) -> None:
    deployment = the(default_objects, "Deployment", f"{FULLNAME}-operator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{FULLNAME}-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (operator,) = pod["containers"]
    assert operator["command"] == ["python", "-m", "ttt_operator"]
    security = operator["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in operator["volumeMounts"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert operator["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    assert operator["resources"]["limits"]["memory"] == "512Mi"


# ---------- RBAC ----------

# The exact rules are what the operator's code calls: tests/kube/test_rbac.py derives them from the code and
# compares them with the rendered chart both ways; here, the shape every rendering must have.
READ = {"get", "list", "watch"}


@pytest.mark.parametrize("objects_fixture", ["default_objects", "external_objects"])
def test_rbac_is_least_privilege(objects_fixture: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(objects_fixture)
    roles = find(objects, "ClusterRole") + find(objects, "Role")
    assert roles
    for role in roles:
        name = f"{role['kind']} {role['metadata']['name']}"
        # No wildcards, no resourceNames or nonResourceURLs: each rule names groups, resources and verbs.
        assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"]), name
        for group, resource, verb in rules_of(role):
            assert "*" not in (group, resource, verb), f"wildcard in {name}"
            assert resource.split("/")[0] != "secrets", f"{resource} in {name}"
            if resource.split("/")[0] == "pods":  # read only: why an attempt is stuck; no exec, no logs
                assert resource == "pods" and verb in READ, f"{verb} {resource} in {name}"
    discovery = the(objects, "ClusterRole", f"{FULLNAME}-operator-discovery")
    # Only what a Role cannot grant, read only: cluster-scoped resources.
    assert {(group, resource) for group, resource, _ in rules_of(discovery)} <= {
        ("", "namespaces"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
    }
    assert {verb for _, _, verb in rules_of(discovery)} <= READ


def test_rbac_grants_the_same_work_cluster_wide_or_per_namespace(
    default_objects: list[dict[str, Any]], external_objects: list[dict[str, Any]]
) -> None:
    cluster_wide = rules_of(the(default_objects, "ClusterRole", f"{FULLNAME}-operator"))
    assert cluster_wide
    assert all(rules_of(role) == cluster_wide for role in find(external_objects, "Role"))
    # kopf lists and watches namespaces only when it serves some of them, not all.
    discovery = f"{FULLNAME}-operator-discovery"
    assert ("", "namespaces", "watch") not in rules_of(the(default_objects, "ClusterRole", discovery))
    assert ("", "namespaces", "watch") in rules_of(the(external_objects, "ClusterRole", discovery))


def test_rbac_cluster_wide_without_watch_namespaces(default_objects: list[dict[str, Any]]) -> None:
    assert find(default_objects, "ClusterRole", f"{FULLNAME}-operator")
    for name in (f"{FULLNAME}-operator", f"{FULLNAME}-operator-discovery"):
        binding = the(default_objects, "ClusterRoleBinding", name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": name,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{FULLNAME}-operator", "namespace": NAMESPACE}
        ]
    assert not find(default_objects, "Role") and not find(default_objects, "RoleBinding")


def test_rbac_role_per_watched_namespace(external_objects: list[dict[str, Any]]) -> None:
    assert [role["metadata"]["name"] for role in find(external_objects, "ClusterRole")] == [
        f"{FULLNAME}-operator-discovery"
    ]
    roles = {role["metadata"]["namespace"]: role for role in find(external_objects, "Role")}
    bindings = {
        binding["metadata"]["namespace"]: binding for binding in find(external_objects, "RoleBinding")
    }
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for namespace, role in roles.items():
        binding = bindings[namespace]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{FULLNAME}-operator", "namespace": NAMESPACE}
        ]


# ---------- runs storage ----------


def test_runs_volume_when_storage_is_a_path(default_objects: list[dict[str, Any]]) -> None:
    claim = the(default_objects, "PersistentVolumeClaim", f"{FULLNAME}-runs")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert operator_env(default_objects)["TTT_RUNS_PVC"] == claim["metadata"]["name"]


def test_operator_does_not_need_the_runs_volume(default_objects: list[dict[str, Any]]) -> None:
    """A claim the default StorageClass cannot provide (ReadWriteMany on EKS, GKE, AKS) must not keep the
    operator Pending, nor may the operator hold a ReadWriteOnce volume that Ray pods need."""
    pod = the(default_objects, "Deployment", f"{FULLNAME}-operator")["spec"]["template"]["spec"]
    assert [volume["name"] for volume in pod["volumes"]] == ["tmp"]
    assert [mount["name"] for mount in pod["containers"][0]["volumeMounts"]] == ["tmp"]


def test_operator_mounts_the_runs_volume_when_asked(helm: Helm) -> None:
    objects = helm.render("--set", "operator.mountRunsVolume=true")
    pod = the(objects, "Deployment", f"{FULLNAME}-operator")["spec"]["template"]["spec"]
    runs = next(volume for volume in pod["volumes"] if volume["name"] == "runs")
    assert runs["persistentVolumeClaim"] == {"claimName": f"{FULLNAME}-runs", "readOnly": True}
    assert {"name": "runs", "mountPath": "/runs", "readOnly": True} in pod["containers"][0]["volumeMounts"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"operator": {"watchNamespaces": ["team-a"]}},
            'operator.watchNamespaces lists "team-a", but runs go to the PersistentVolumeClaim '
            f'{FULLNAME}-runs in namespace "{NAMESPACE}"',
        ),
        (
            {"operator": {"mountRunsVolume": True}, "storage": {"uri": "s3://bucket/runs"}},
            "operator.mountRunsVolume: storage.uri is S3, there is no runs volume to mount",
        ),
        (
            {
                "operator": {"mountRunsVolume": True},
                "storage": {"persistence": {"accessMode": "ReadWriteOncePod"}},
            },
            "operator.mountRunsVolume: a ReadWriteOncePod runs volume",
        ),
    ],
    ids=["claim-in-another-namespace", "mount-without-volume", "mount-exclusive-volume"],
)
def test_storage_combinations_that_cannot_work_fail(
    helm: Helm, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    assert message in helm.template_error(values, tmp_path, "-n", NAMESPACE)


def test_runs_volume_with_the_release_namespace_watched(helm: Helm) -> None:
    objects = helm.render("--set", f"operator.watchNamespaces={{{NAMESPACE}}}")
    assert operator_env(objects)["TTT_OPERATOR_NAMESPACES"] == NAMESPACE
    assert find(objects, "Role")[0]["metadata"]["namespace"] == NAMESPACE


def test_no_volumes_when_everything_is_external(external_objects: list[dict[str, Any]]) -> None:
    assert not find(external_objects, "PersistentVolumeClaim")
    pod = the(external_objects, "Deployment", f"{FULLNAME}-operator")["spec"]["template"]["spec"]
    assert [volume["name"] for volume in pod["volumes"]] == ["tmp"]
    mlflow_pod = the(external_objects, "Deployment", f"{FULLNAME}-mlflow")["spec"]["template"]["spec"]
    assert [volume["name"] for volume in mlflow_pod["volumes"]] == ["tmp"]


def test_existing_runs_claim_is_used_not_created(helm: Helm) -> None:
    objects = helm.render(
        "--set", "storage.existingClaim=shared-runs", "--set", "storage.persistence.size=1Ti"
    )
    assert [claim["metadata"]["name"] for claim in find(objects, "PersistentVolumeClaim")] == [
        f"{FULLNAME}-mlflow"
    ]
    assert operator_env(objects)["TTT_RUNS_PVC"] == "shared-runs"


# ---------- MLflow ----------


def test_mlflow_defaults_to_sqlite_and_local_artifacts(default_objects: list[dict[str, Any]]) -> None:
    mlflow = container(default_objects, f"{FULLNAME}-mlflow")
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert command[command.index("--backend-store-uri") + 1] == "sqlite:////mlflow/mlflow.db"
    assert command[command.index("--artifacts-destination") + 1] == "/mlflow/artifacts"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "5000"
    assert {"name": "data", "mountPath": "/mlflow"} in mlflow["volumeMounts"]
    assert "envFrom" not in mlflow
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert mlflow[probe]["httpGet"]["path"] == "/health"
    service = the(default_objects, "Service", f"{FULLNAME}-mlflow")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["port"] == 5000


def test_mlflow_external_database_and_s3_artifacts(external_objects: list[dict[str, Any]]) -> None:
    mlflow = container(external_objects, f"{FULLNAME}-mlflow")
    command = mlflow["command"]
    assert command[command.index("--backend-store-uri") + 1] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert command[command.index("--artifacts-destination") + 1] == "s3://ttt-mlflow/artifacts"
    env = {var["name"]: var for var in mlflow["env"]}
    # The kubelet substitutes $(MLFLOW_BACKEND_STORE_URI) in the command from this env entry.
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"] == {
        "secretKeyRef": {"name": "mlflow-db", "key": "uri"}
    }
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000"
    assert mlflow["envFrom"] == [{"secretRef": {"name": "ttt-s3"}}]


@pytest.mark.parametrize("objects_fixture", ["default_objects", "external_objects"])
def test_mlflow_accepts_the_host_of_the_tracking_uri(
    objects_fixture: str, request: pytest.FixtureRequest
) -> None:
    """MLflow (3.5+) rejects unknown Host headers; pods send the tracking URI's host:port."""
    objects = request.getfixturevalue(objects_fixture)
    env = {var["name"]: var.get("value") for var in container(objects, f"{FULLNAME}-mlflow")["env"]}
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")

    def accepted(host: str) -> bool:  # MLflow's rule: fnmatch for patterns with "*", equality otherwise
        return any(
            fnmatch.fnmatch(host, pattern) if "*" in pattern else host == pattern for pattern in allowed
        )

    tracking_host = urlparse(operator_env(objects)["TTT_MLFLOW_TRACKING_URI"]).netloc
    for host in (
        tracking_host,
        f"{FULLNAME}-mlflow:5000",
        "localhost:5000",
        "127.0.0.1:5000",
        "10.1.2.3:5000",
    ):
        assert accepted(host), host
    assert not accepted("evil.example.com:5000")
    if objects_fixture == "external_objects":
        assert accepted("mlflow.example.internal")


def test_mlflow_disabled_requires_an_external_uri(helm: Helm, tmp_path: Path) -> None:
    message = helm.template_error({"mlflow": {"enabled": False}}, tmp_path)
    assert "mlflow.external.trackingUri is required" in message


# ---------- values: schema and documentation ----------


def test_values_schema_is_draft7_and_accepts_the_shipped_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    for values_file in (CHART / "values.yaml", EXTERNAL_VALUES):
        jsonschema.Draft7Validator(schema).validate(yaml.safe_load(values_file.read_text()))

    def closed(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for key, child in node["properties"].items():
                closed(child, f"{path}.{key}")

    closed(schema, "values")
    for name, definition in schema["definitions"].items():
        closed(definition, f"definitions.{name}")


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"operator": {"replicas": "two"}}, "/operator/replicas"),
        ({"operator": {"replicas": 2}}, "/operator/replicas"),
        ({"operator": {"replica": 1}}, "replica"),
        ({"mlfow": {"enabled": False}}, "mlfow"),
        ({"storage": {"uri": "http://x"}}, "/storage/uri"),
        ({"mlflow": {"artifacts": {"destination": "gs://bucket"}}}, "/mlflow/artifacts/destination"),
        ({"operator": {"logLevel": "verbose"}}, "/operator/logLevel"),
        ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
        ({"storage": {"persistence": {"size": "lots"}}}, "/storage/persistence/size"),
        # A tag belongs in image.tag; a registry port is fine (test_images_from_a_registry_with_a_port).
        ({"image": {"repository": "registry.local:5000/ttt:1.0"}}, "/image/repository"),
        ({"operator": {"rayJobTTLSeconds": -1}}, "/operator/rayJobTTLSeconds"),
    ],
)
def test_bad_values_fail_naming_the_key(helm: Helm, tmp_path: Path, values: dict[str, Any], key: str) -> None:
    message = helm.template_error(values, tmp_path)
    assert "ttt-platform" in message and key in message, message


def test_storage_path_outside_the_runs_volume_fails(helm: Helm, tmp_path: Path) -> None:
    message = helm.template_error({"storage": {"uri": "/data/runs"}}, tmp_path)
    assert 'storage.uri "/data/runs" is a path outside storage.mountPath "/runs"' in message


def test_every_value_is_documented() -> None:
    """Each key of values.yaml has a comment right above it (inside `resources`, the block's comment)."""
    undocumented, parents = [], []  # parents: (indent, key) of the enclosing mappings
    previous = ""
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), start=1):
        match = re.match(r"^( *)([A-Za-z][\w-]*):", line)
        if match:
            indent, key = len(match.group(1)), match.group(2)
            parents = [(i, k) for i, k in parents if i < indent]
            if all(k != "resources" for _, k in parents) and not previous.lstrip().startswith("#"):
                undocumented.append(f"line {number}: {key}")
            parents.append((indent, key))
        if line.strip():
            previous = line
    assert not undocumented, undocumented


# ---------- NOTES.txt and the test hook ----------


def test_notes_tell_the_next_commands(helm: Helm) -> None:
    result = helm.run("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    for command in (
        "kubectl get crd rayjobs.ray.io",
        f"kubectl apply -n {NAMESPACE} -f jobs/examples/tiny-cpu.yaml",
        f"kubectl get tttjobs -n {NAMESPACE} -w",
        f"kubectl port-forward -n {NAMESPACE} svc/{FULLNAME}-mlflow 5000:5000",
        "http://localhost:5000",
    ):
        assert command in notes, notes


def notes(helm: Helm, *value_args: str) -> str:
    result = helm.run("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", *value_args)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_say_what_the_runs_volume_needs(helm: Helm) -> None:
    default = notes(helm)
    assert f"kubectl get pvc -n {NAMESPACE} {FULLNAME}-runs" in default
    assert "cannot provide ReadWriteMany" in default
    assert "does not mount the runs volume (operator.mountRunsVolume=false)" in default
    assert "The operator mounts the runs volume" in notes(helm, "--set", "operator.mountRunsVolume=true")
    external = notes(helm, "-f", str(EXTERNAL_VALUES))
    assert "PersistentVolumeClaim" not in external and "mountRunsVolume" not in external
    assert "kubectl apply -n team-a -f jobs/examples/tiny-cpu.yaml" in external


def test_helm_test_hook_checks_mlflow_health(default_objects: list[dict[str, Any]]) -> None:
    pod = the(default_objects, "Pod", f"{FULLNAME}-test-mlflow")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert (
        pod["spec"]["containers"][0]["command"][-1] == f"http://{FULLNAME}-mlflow.{NAMESPACE}.svc:5000/health"
    )


def test_old_kubernetes_is_refused(helm: Helm) -> None:
    result = helm.run("template", RELEASE, str(CHART), "--kube-version", "1.26.0")
    assert result.returncode != 0 and "kubeVersion" in result.stderr, result.stderr


def test_install_helm_script_is_idempotent(helm: Helm) -> None:
    script = Path(__file__).resolve().parents[2] / "infra" / "install-helm.sh"
    venv = Path(sys.executable).parent.parent
    for _ in range(2):
        result = subprocess.run(
            ["bash", str(script), str(venv)], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr
        assert re.search(r"install-helm: v\d+\.\d+\.\d+", result.stdout), result.stdout
    assert "already in" in result.stdout
    assert helm.run("version", "--short").stdout.startswith("v")
