"""The fake apiserver behaves like a real one for the clients we use: kubectl, the kubernetes python client
and kopf. Each test would fail against a server that skipped the behaviour it names."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml

from tests.helpers import DATA
from tests.kube import crdschema
from tests.kube.apiserver import (
    FakeApiServer,
    human_duration,
    jsonpath,
    parse_label_selector,
    request_attributes,
)

kubernetes = pytest.importorskip("kubernetes")

WIDGET_CRD = DATA / "widgets.example.dev.yaml"
GADGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.example.dev
spec:
  group: example.dev
  scope: Cluster
  names: {plural: gadgets, singular: gadget, kind: Gadget, shortNames: [gd]}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
"""


@pytest.fixture(scope="module")
def widget_crd(apiserver: FakeApiServer) -> dict:
    return apiserver.load_crd(WIDGET_CRD)[0]


def widget(name: str, namespace: str, **spec: object) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "example.dev/v1alpha1",
            "kind": "Widget",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec or {"size": 3},
        }
    )


def get_json(kubectl, *args: str) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


# ---------------------------------------------------------------------------------------------------
# kubectl


def test_kubectl_applies_a_crd_and_serves_it_cluster_scoped(kubectl, apiserver):
    assert "created" in kubectl("apply", "-f", "-", input=GADGET_CRD).stdout
    kubectl("wait", "--for=condition=Established", "crd/gadgets.example.dev", "--timeout=10s")
    resources = kubectl("api-resources", "--api-group=example.dev").stdout
    assert re.search(r"^gadgets\s+gd\s+example.dev/v1\s+false\s+Gadget", resources, re.M)
    gadget = {"apiVersion": "example.dev/v1", "kind": "Gadget", "metadata": {"name": "g1"}, "any": {"x": 1}}
    kubectl("apply", "-f", "-", input=json.dumps(gadget))
    assert get_json(kubectl, "gd", "g1")["any"] == {"x": 1}  # preserve-unknown-fields keeps it
    kubectl("delete", "crd", "gadgets.example.dev")
    assert "gadgets.example.dev" not in [crd["metadata"]["name"] for crd in apiserver.objects("crd")]
    with pytest.raises(KeyError):
        apiserver.cluster.find("gadgets")
    # Discovery with and without the trailing slash, as clients differ.
    for path in (
        "/apis/apiextensions.k8s.io/v1",
        "/apis/apiextensions.k8s.io/v1/",
        "/api/v1/",
        "/apis/apps/",
    ):
        kubectl("get", "--raw", path)


def test_kubectl_configmap_lifecycle(kubectl, namespace):
    manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"a": "1"}}
    assert "created" in kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest)).stdout
    manifest["data"] = {"a": "2", "b": "3"}
    assert "configured" in kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest)).stdout
    kubectl("patch", "-n", namespace, "cm", "cm", "-p", '{"data": {"c": "4"}}')  # strategic merge
    kubectl(
        "patch", "-n", namespace, "cm", "cm", "--type", "json", "-p", '[{"op": "remove", "path": "/data/a"}]'
    )
    found = get_json(kubectl, "-n", namespace, "configmap", "cm")
    assert found["data"] == {"b": "3", "c": "4"}
    assert found["metadata"]["uid"] and found["metadata"]["creationTimestamp"]
    assert "cm" in kubectl("get", "-n", namespace, "cm").stdout
    assert "deleted" in kubectl("delete", "-n", namespace, "cm", "cm").stdout
    missing = kubectl("get", "-n", namespace, "cm", "cm", check=False)
    assert missing.returncode == 1 and 'configmaps "cm" not found' in missing.stderr


def test_custom_resource_defaults_pruning_and_generation(kubectl, namespace, widget_crd):
    kubectl("apply", "--validate=false", "-f", "-", input=widget("w", namespace, size=3, junk=1))
    found = get_json(kubectl, "-n", namespace, "widget", "w")
    assert found["spec"] == {"size": 3, "color": "red"}  # defaulted, and the undeclared field pruned
    assert found["metadata"]["generation"] == 1
    first_rv = int(found["metadata"]["resourceVersion"])

    kubectl("label", "-n", namespace, "wg", "w", "tier=gold")  # metadata: same generation
    kubectl(
        "patch",
        "-n",
        namespace,
        "wg",
        "w",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Up"}}',
    )
    found = get_json(kubectl, "-n", namespace, "wg", "w")
    assert (found["metadata"]["generation"], found["status"]["phase"]) == (1, "Up")
    assert int(found["metadata"]["resourceVersion"]) > first_rv

    kubectl("patch", "-n", namespace, "wg", "w", "--type=merge", "-p", '{"spec": {"size": 5}}')
    assert get_json(kubectl, "-n", namespace, "wg", "w")["metadata"]["generation"] == 2
    # A patch that changes nothing changes nothing, not even the resourceVersion.
    before = get_json(kubectl, "-n", namespace, "wg", "w")["metadata"]["resourceVersion"]
    kubectl("patch", "-n", namespace, "wg", "w", "--type=merge", "-p", '{"spec": {"size": 5}}')
    assert get_json(kubectl, "-n", namespace, "wg", "w")["metadata"]["resourceVersion"] == before

    # Strategic merge patches are refused for custom resources, as by a real apiserver.
    refused = kubectl("patch", "-n", namespace, "wg", "w", "-p", '{"spec": {"size": 6}}', check=False)
    assert refused.returncode != 0 and "not supported" in refused.stderr
    kubectl("delete", "-n", namespace, "wg", "w")


def test_status_subresource_separates_spec_and_status(kube_client, namespace, widget_crd):
    api = kubernetes.client.CustomObjectsApi(kube_client)
    args = ("example.dev", "v1alpha1", namespace, "widgets")
    body = yaml.safe_load(widget("s", namespace))
    body["status"] = {"phase": "Ignored"}
    created = api.create_namespaced_custom_object(*args, body)
    assert "status" not in created  # status is not writable on create

    api.patch_namespaced_custom_object(*args, "s", {"spec": {"size": 4}, "status": {"phase": "Ignored"}})
    updated = api.patch_namespaced_custom_object_status(
        *args, "s", {"spec": {"size": 9}, "status": {"phase": "Up"}}
    )
    assert updated["spec"]["size"] == 4 and updated["status"] == {"phase": "Up"}
    assert updated["metadata"]["generation"] == 2


def test_printer_columns_in_kubectl_tables(kubectl, kube_client, namespace, widget_crd):
    kubectl("apply", "-f", "-", input=widget("table", namespace, size=7, color="blue"))
    kubernetes.client.CustomObjectsApi(kube_client).patch_namespaced_custom_object_status(
        "example.dev", "v1alpha1", namespace, "widgets", "table",
        {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
    )  # fmt: skip
    lines = kubectl("get", "-n", namespace, "widgets").stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "COLOR", "PHASE", "AGE"]
    assert re.fullmatch(r"table\s+7\s+blue\s+Running\s+\d+s", lines[1])
    wide = kubectl("get", "-n", namespace, "wg", "table", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "SIZE", "COLOR", "PHASE", "READY", "AGE"]  # priority 1 only when wide
    assert wide[1].split()[4] == "True"
    kubectl("apply", "-f", "-", input=widget("bare", namespace, size=1))
    bare = kubectl("get", "-n", namespace, "wg", "bare").stdout.splitlines()[1]
    assert re.fullmatch(r"bare\s+1\s+red\s+\d+s", bare)  # a missing value is a null cell: printed blank
    assert kubectl("get", "ns", namespace).stdout.split()[:4] == ["NAME", "STATUS", "AGE", namespace]


def test_schema_violation_answers_422_naming_the_field(
    kubectl, apiserver, kube_client, namespace, widget_crd
):
    result = kubectl("apply", "-f", "-", input=widget("bad", namespace, size=0), check=False)
    assert result.returncode != 0
    expected = "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"
    assert f'The Widget "bad" is invalid: {expected}' in result.stderr

    api = kubernetes.client.CustomObjectsApi(kube_client)
    with pytest.raises(kubernetes.client.ApiException) as error:
        api.create_namespaced_custom_object(
            "example.dev", "v1alpha1", namespace, "widgets", yaml.safe_load(widget("bad", namespace, size=0))
        )
    status = json.loads(error.value.body)
    assert (error.value.status, status["kind"], status["reason"]) == (422, "Status", "Invalid")
    assert status["message"] == f'Widget.example.dev "bad" is invalid: {expected}'
    assert status["details"]["causes"][0]["field"] == "spec.size"
    assert apiserver.objects("widgets", namespace) == []


def test_cel_rule_violation_answers_422(kubectl, namespace, widget_crd):
    result = kubectl("apply", "-f", "-", input=widget("cel", namespace, size=5, maxSize=4), check=False)
    assert result.returncode != 0
    assert 'spec.size: Invalid value: "object": size must not exceed maxSize' in result.stderr
    # The rule also guards updates.
    kubectl("apply", "-f", "-", input=widget("cel", namespace, size=3, maxSize=4))
    patch = kubectl(
        "patch", "-n", namespace, "wg", "cel", "--type=merge", "-p", '{"spec":{"maxSize":2}}', check=False
    )
    assert "size must not exceed maxSize" in patch.stderr


def test_strict_field_validation_rejects_unknown_fields(kubectl, namespace, widget_crd):
    result = kubectl("apply", "-f", "-", input=widget("strict", namespace, size=1, colour="red"), check=False)
    assert result.returncode != 0
    assert 'strict decoding error: unknown field "spec.colour"' in result.stderr
    assert kubectl(
        "apply", "--validate=false", "-f", "-", input=widget("strict", namespace, size=1, colour="x")
    )


def test_create_conflicts_and_replace_preconditions(kube_client, namespace):
    core = kubernetes.client.CoreV1Api(kube_client)
    created = core.create_namespaced_config_map(namespace, {"metadata": {"name": "c"}, "data": {"a": "1"}})
    with pytest.raises(kubernetes.client.ApiException) as duplicate:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "c"}})
    assert duplicate.value.status == 409 and json.loads(duplicate.value.body)["reason"] == "AlreadyExists"

    created.data = {"a": "2"}
    replaced = core.replace_namespaced_config_map("c", namespace, created)
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)
    created.data = {"a": "3"}  # still carries the old resourceVersion
    with pytest.raises(kubernetes.client.ApiException) as stale:
        core.replace_namespaced_config_map("c", namespace, created)
    assert stale.value.status == 409 and json.loads(stale.value.body)["reason"] == "Conflict"

    with pytest.raises(kubernetes.client.ApiException) as missing:
        core.read_namespaced_config_map("nope", namespace)
    assert missing.value.status == 404 and json.loads(missing.value.body)["reason"] == "NotFound"
    with pytest.raises(kubernetes.client.ApiException) as no_namespace:
        core.create_namespaced_config_map("no-such-namespace", {"metadata": {"name": "c"}})
    assert no_namespace.value.status == 404


def test_json_patch_test_op_guards_resource_version(kube_client, namespace):
    core = kubernetes.client.CoreV1Api(kube_client)
    cm = core.create_namespaced_config_map(namespace, {"metadata": {"name": "j"}, "data": {"a": "1"}})
    rv = cm.metadata.resource_version
    ok = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/data/b", "value": "2"},
    ]
    assert core.patch_namespaced_config_map("j", namespace, ok).data == {"a": "1", "b": "2"}
    with pytest.raises(kubernetes.client.ApiException) as stale:
        core.patch_namespaced_config_map("j", namespace, ok)  # rv has moved on: kopf retries on this 422
    assert stale.value.status == 422


def test_selectors(kube_client, namespace):
    core = kubernetes.client.CoreV1Api(kube_client)
    for name, labels in [("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"}), ("c", {})]:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": name, "labels": labels}})

    def names(**query: str) -> list[str]:
        return [cm.metadata.name for cm in core.list_namespaced_config_map(namespace, **query).items]

    assert names(label_selector="app=x") == ["a"]
    assert names(label_selector="app") == ["a", "b"]
    assert names(label_selector="!app") == ["c"]
    assert names(label_selector="app in (x,y),tier notin (2)") == ["a", "b"]
    assert names(label_selector="app!=x") == ["b", "c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    listed = core.list_namespaced_config_map(namespace)
    assert listed.kind == "ConfigMapList" and int(listed.metadata.resource_version) > 0


def test_owner_references_cascade(kube_client, namespace):
    core = kubernetes.client.CoreV1Api(kube_client)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    other = core.create_namespaced_config_map(namespace, {"metadata": {"name": "other"}})

    def ref(obj) -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap", "name": obj.metadata.name, "uid": obj.metadata.uid}

    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "child", "ownerReferences": [ref(owner)]}}
    )
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "grandchild",
                "ownerReferences": [ref(core.read_namespaced_config_map("child", namespace))],
            }
        },
    )
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "shared", "ownerReferences": [ref(owner), ref(other)]}}
    )
    core.delete_namespaced_config_map("owner", namespace)
    left = {cm.metadata.name: cm for cm in core.list_namespaced_config_map(namespace).items}
    assert sorted(left) == [
        "other",
        "shared",
    ]  # child and grandchild collected, shared kept by its live owner
    assert [r.uid for r in left["shared"].metadata.owner_references] == [other.metadata.uid]

    orphan = core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "orphan", "ownerReferences": [ref(other)]}}
    )
    assert orphan.metadata.owner_references
    core.delete_namespaced_config_map("other", namespace, propagation_policy="Orphan")
    assert core.read_namespaced_config_map("orphan", namespace).metadata.owner_references is None


def test_finalizers_hold_deletion(kubectl, apiserver, namespace):
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "f", "finalizers": ["example.dev/hold"]},
    }
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    kubectl("delete", "-n", namespace, "cm", "f", "--wait=false")
    held = apiserver.get("configmaps", "f", namespace)
    assert held["metadata"]["deletionTimestamp"] and held["metadata"]["finalizers"] == ["example.dev/hold"]
    kubectl("patch", "-n", namespace, "cm", "f", "--type=merge", "-p", '{"metadata": {"finalizers": null}}')
    assert apiserver.objects("configmaps", namespace) == []


def test_namespace_deletion_takes_its_objects(kubectl, apiserver):
    kubectl(
        "apply", "-f", "-", input='{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "doomed"}}'
    )
    kubectl(
        "apply",
        "-n",
        "doomed",
        "-f",
        "-",
        input='{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}',
    )
    kubectl("delete", "namespace", "doomed")
    assert apiserver.objects("configmaps", "doomed") == []
    assert "doomed" not in [ns["metadata"]["name"] for ns in apiserver.objects("namespaces")]


def test_watch_replays_from_resource_version_and_times_out(kube_client, namespace):
    core = kubernetes.client.CoreV1Api(kube_client)
    cm = core.create_namespaced_config_map(namespace, {"metadata": {"name": "w"}, "data": {"n": "0"}})

    def mutate() -> None:
        time.sleep(0.3)
        core.patch_namespaced_config_map("w", namespace, {"data": {"n": "1"}})
        core.delete_namespaced_config_map("w", namespace)

    writer = threading.Thread(target=mutate)
    writer.start()
    started = time.monotonic()
    events = [
        (event["type"], event["object"].metadata.name)
        for event in kubernetes.watch.Watch().stream(
            core.list_namespaced_config_map,
            namespace,
            resource_version=cm.metadata.resource_version,
            timeout_seconds=2,
            _request_timeout=10,
        )
    ]
    writer.join()
    elapsed = time.monotonic() - started
    assert events == [("MODIFIED", "w"), ("DELETED", "w")]
    assert 1.5 < elapsed < 6  # the server closed the stream at timeoutSeconds


def test_watch_from_now_starts_with_current_objects(kube_client, namespace):
    core = kubernetes.client.CoreV1Api(kube_client)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "now"}})
    stream = kubernetes.watch.Watch().stream(
        core.list_namespaced_config_map, namespace, timeout_seconds=1, _request_timeout=10
    )
    assert [(e["type"], e["object"].metadata.name) for e in stream] == [("ADDED", "now")]


# ---------------------------------------------------------------------------------------------------
# kopf

OPERATOR = """
import kopf


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.watching.server_timeout = 5
    settings.watching.client_timeout = 10


@kopf.on.create("example.dev", "v1alpha1", "widgets")
def created(spec, patch, body, **_):
    patch.status["phase"] = f"Created-{spec['size']}"
    kopf.info(body, reason="Created", message="widget seen")


@kopf.on.delete("example.dev", "v1alpha1", "widgets")
def deleted(**_):
    pass
"""


def wait_until(condition, seconds: float = 20.0, step: float = 0.2):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {seconds} s")


def test_kopf_operator_handles_create_and_delete(
    kubectl, kubectl_env, apiserver, namespace, widget_crd, tmp_path
):
    (tmp_path / "operator.py").write_text(textwrap.dedent(OPERATOR))
    log = (tmp_path / "kopf.log").open("w")
    command = [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", namespace, "operator.py"]
    kopf = subprocess.Popen(command, cwd=tmp_path, env=kubectl_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        kubectl("apply", "-f", "-", input=widget("op", namespace, size=2))
        found = wait_until(lambda: apiserver.get("widgets", "op", namespace).get("status", {}).get("phase"))
        assert found == "Created-2"
        assert apiserver.get("widgets", "op", namespace)["metadata"]["finalizers"]  # kopf's deletion guard
        assert wait_until(lambda: apiserver.objects("events", namespace, group=""))[0]["reason"] == "Created"
        kubectl(
            "delete", "-n", namespace, "wg", "op", "--timeout=20s"
        )  # waits until kopf drops its finalizer
        assert apiserver.objects("widgets", namespace) == []
    finally:
        kopf.send_signal(signal.SIGINT)
        try:
            kopf.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kopf.kill()
            kopf.wait()
        log.close()
    text = (tmp_path / "kopf.log").read_text()
    assert "Traceback" not in text, text


# ---------------------------------------------------------------------------------------------------
# Authentication, RBAC and owner-reference admission

ROBOT = "system:serviceaccount:team:robot"


@pytest.fixture()
def rbac_server(tmp_path):
    """A server of its own (cluster-wide bindings would leak into the shared one), with namespaces `team`
    and `other` and a ServiceAccount team/robot; yields (server, an admin's kubeconfig, tmp_path)."""
    with FakeApiServer() as server:
        for name in ("team", "other"):
            server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        server.apply(
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "robot", "namespace": "team"}}
        )
        admin = server.write_kubeconfig(tmp_path / "admin", namespace="team")
        yield server, admin, tmp_path


def robot_kubeconfig(server, tmp_path, admin) -> str:
    """The robot's kubeconfig, its token from `kubectl create token`. For the python client: kubectl sends
    no credentials to a plain-HTTP server (client-go reads them only for TLS), so kubectl stays admin."""
    token = subprocess.run(
        ["kubectl", "create", "token", "robot", "-n", "team"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": str(admin)},
    ).stdout.strip()
    return str(server.write_kubeconfig(tmp_path / "robot", namespace="team", token=token))


def grant(server, kind: str, name: str, rules: list[dict], namespace: str | None = None) -> None:
    """A Role or ClusterRole `name` and a binding of it to the robot (a RoleBinding in `namespace`, else a
    ClusterRoleBinding)."""
    meta = {"name": name, **({"namespace": namespace} if kind == "Role" else {})}
    server.apply(
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "rules": rules}
    )
    server.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding" if namespace else "ClusterRoleBinding",
            "metadata": {"name": name, **({"namespace": namespace} if namespace else {})},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": "team"}],
        }
    )


def status_of(call) -> tuple[int, dict]:
    try:
        call()
    except kubernetes.client.ApiException as error:
        return error.status, json.loads(error.body)
    return 200, {}


def test_request_attributes_as_the_apiserver_derives_them():
    def attrs(method, path, **query):
        a = request_attributes(method, path, query)
        return (
            (a.verb, a.group, a.combined_resource, a.namespace, a.name)
            if a.resource_request
            else (a.verb, a.path)
        )

    assert attrs("GET", "/api/v1/namespaces/ns/pods") == ("list", "", "pods", "ns", "")
    assert attrs("GET", "/api/v1/namespaces/ns/pods", watch="true") == ("watch", "", "pods", "ns", "")
    assert attrs("GET", "/api/v1/namespaces/ns/pods", watch="false") == ("list", "", "pods", "ns", "")
    assert attrs("GET", "/api/v1/watch/namespaces/ns/pods") == ("watch", "", "pods", "ns", "")
    assert attrs("GET", "/api/v1/pods", fieldSelector="metadata.name=p") == ("list", "", "pods", "", "p")
    assert attrs("GET", "/api/v1/namespaces/ns/pods/p/log") == ("get", "", "pods/log", "ns", "p")
    assert attrs("PATCH", "/apis/ttt.dev/v1alpha1/namespaces/ns/tttjobs/j/status") == (
        "patch", "ttt.dev", "tttjobs/status", "ns", "j"
    )  # fmt: skip
    assert attrs("PUT", "/apis/ttt.dev/v1alpha1/namespaces/ns/tttjobs/j") == (
        "update",
        "ttt.dev",
        "tttjobs",
        "ns",
        "j",
    )
    assert attrs("DELETE", "/api/v1/namespaces/ns/configmaps") == (
        "deletecollection",
        "",
        "configmaps",
        "ns",
        "",
    )
    assert attrs("POST", "/api/v1/namespaces/ns/serviceaccounts/sa/token") == (
        "create", "", "serviceaccounts/token", "ns", "sa"
    )  # fmt: skip
    # The Namespace object is in its own namespace (a RoleBinding there can grant reading it).
    assert attrs("GET", "/api/v1/namespaces/ns") == ("get", "", "namespaces", "ns", "ns")
    assert attrs("PUT", "/api/v1/namespaces/ns/finalize") == ("update", "", "namespaces/finalize", "ns", "ns")
    assert attrs("GET", "/api/v1/namespaces") == ("list", "", "namespaces", "", "")
    for path in ("/version", "/api", "/api/v1", "/apis/ray.io", "/apis/ray.io/v1", "/openapi/v3"):
        assert attrs("GET", path) == ("get", path)


def test_a_service_account_gets_what_its_roles_grant_and_403_otherwise(rbac_server):
    server, admin, tmp_path = rbac_server
    robot = kubernetes.config.new_client_from_config(robot_kubeconfig(server, tmp_path, admin))
    core = kubernetes.client.CoreV1Api(robot)
    code, body = status_of(lambda: core.list_namespaced_config_map("team"))
    assert (code, body["reason"], body["message"]) == (
        403,
        "Forbidden",
        'configmaps is forbidden: User "system:serviceaccount:team:robot" cannot list resource "configmaps" '
        'in API group "" in the namespace "team"',
    )
    assert kubernetes.client.VersionApi(robot).get_code()  # discovery is open to every authenticated user
    assert kubernetes.client.CoreApi(robot).get_api_versions()
    rules = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]
    grant(server, "Role", "reader", rules, "team")
    assert status_of(lambda: core.list_namespaced_config_map("team"))[0] == 200
    assert (
        'in the namespace "other"'
        in status_of(lambda: core.list_namespaced_config_map("other"))[1]["message"]
    )
    _, body = status_of(lambda: core.create_namespaced_config_map("team", {"metadata": {"name": "x"}}))
    assert 'cannot create resource "configmaps"' in body["message"]
    _, body = status_of(core.list_config_map_for_all_namespaces)
    assert body["message"].endswith('cannot list resource "configmaps" in API group "" at the cluster scope')
    # A ClusterRole bound by a RoleBinding grants in that namespace; by a ClusterRoleBinding, everywhere.
    rules = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]
    grant(server, "ClusterRole", "secrets", rules, "other")
    assert status_of(lambda: core.list_namespaced_secret("other"))[0] == 200
    assert status_of(lambda: core.list_namespaced_secret("team"))[0] == 403
    grant(server, "ClusterRole", "all-pods", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}])
    assert status_of(core.list_pod_for_all_namespaces)[0] == 200
    assert server.decisions(ROBOT)[("list", "", "configmaps", "other")] == (0, 1)


def test_rules_match_subresources_names_and_wildcards(rbac_server, tmp_path):
    server, admin, _ = rbac_server
    core = kubernetes.client.CoreV1Api(
        kubernetes.config.new_client_from_config(robot_kubeconfig(server, tmp_path, admin))
    )
    server.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mine", "namespace": "team"}})
    server.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "theirs", "namespace": "team"}}
    )
    rules = [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["get", "list"],
            "resourceNames": ["mine"],
        },
        {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]},
    ]
    grant(server, "Role", "narrow", rules, "team")
    assert status_of(lambda: core.read_namespaced_config_map("mine", "team"))[0] == 200
    code, body = status_of(lambda: core.read_namespaced_config_map("theirs", "team"))
    assert (code, body["reason"]) == (403, "Forbidden")
    assert body["message"].startswith('configmaps "theirs" is forbidden: User')
    assert body["details"] == {"name": "theirs", "kind": "configmaps"}
    # resourceNames grant no list of all (it has no name), only one of that name.
    assert status_of(lambda: core.list_namespaced_config_map("team"))[0] == 403
    assert (
        status_of(lambda: core.list_namespaced_config_map("team", field_selector="metadata.name=mine"))[0]
        == 200
    )
    server.load_crd(WIDGET_CRD)
    server.apply(yaml.safe_load(widget("w", "team")))
    custom = kubernetes.client.CustomObjectsApi(core.api_client)
    widgets = ("example.dev", "v1alpha1", "team", "widgets", "w")
    assert status_of(lambda: custom.get_namespaced_custom_object_status(*widgets))[0] == 200  # */status
    assert status_of(lambda: custom.get_namespaced_custom_object(*widgets))[0] == 403
    assert status_of(lambda: core.read_namespace("team"))[0] == 403


def test_tokens_are_bound_to_their_service_account(rbac_server, tmp_path):
    server, admin, _ = rbac_server
    robot = robot_kubeconfig(server, tmp_path, admin)
    version = kubernetes.client.VersionApi(kubernetes.config.new_client_from_config(robot))
    assert version.get_code().git_version.startswith("v1.")
    forged = kubernetes.client.VersionApi(
        kubernetes.config.new_client_from_config(
            str(server.write_kubeconfig(tmp_path / "forged", token="forged"))
        )
    )
    code, body = status_of(forged.get_code)
    assert (code, body["reason"], body["message"]) == (401, "Unauthorized", "Unauthorized")
    server.cluster.delete(server.cluster.find("serviceaccounts"), "team", "robot")
    server.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "robot", "namespace": "team"}}
    )
    assert status_of(version.get_code)[0] == 401  # the account of the same name is another one


def test_a_binding_to_a_missing_role_is_named_in_the_denial(rbac_server, tmp_path):
    server, admin, _ = rbac_server
    core = kubernetes.client.CoreV1Api(
        kubernetes.config.new_client_from_config(robot_kubeconfig(server, tmp_path, admin))
    )
    grant(server, "Role", "ghost", [], "team")
    server.cluster.delete(server.cluster.find("roles"), "team", "ghost")
    _, body = status_of(lambda: core.list_namespaced_config_map("team"))
    assert body["message"].endswith(': RBAC: role.rbac.authorization.k8s.io "ghost" not found')


def test_owner_references_need_delete_and_blocking_ones_the_owners_finalizers(rbac_server, tmp_path):
    """OwnerReferencesPermissionEnforcement, the admission plugin behind the chart's finalizers rule."""
    server, admin, _ = rbac_server
    core = kubernetes.client.CoreV1Api(
        kubernetes.config.new_client_from_config(robot_kubeconfig(server, tmp_path, admin))
    )
    owner = server.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "namespace": "team"}}
    )
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    grant(
        server,
        "Role",
        "writer",
        [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch"]}],
        "team",
    )

    def child(name: str, **extra) -> dict:
        return {"metadata": {"name": name, "ownerReferences": [{**ref, **extra}]}}

    def create(name: str, **extra) -> tuple[int, dict]:
        return status_of(lambda: core.create_namespaced_config_map("team", child(name, **extra)))

    assert create("free")[0] == 200
    code, body = create("held", blockOwnerDeletion=True)
    assert (code, body["message"]) == (
        403,
        'configmaps "held" is forbidden: cannot set blockOwnerDeletion if an ownerReference refers to a '
        "resource you can't set finalizers on: , <nil>",
    )
    assert server.decisions(ROBOT)[("update", "", "configmaps/finalizers", "team")] == (0, 1)
    # Changing the references of an existing object needs delete on it.
    code, body = status_of(
        lambda: core.patch_namespaced_config_map("free", "team", {"metadata": {"ownerReferences": None}})
    )
    assert code == 403 and "cannot set an ownerRef on a resource you can't delete" in body["message"]
    assert status_of(lambda: core.patch_namespaced_config_map("free", "team", {"data": {"a": "b"}}))[0] == 200
    rules = [{"apiGroups": [""], "resources": ["configmaps/finalizers"], "verbs": ["update"]}]
    grant(server, "Role", "finalizers", rules, "team")
    assert create("held", blockOwnerDeletion=True)[0] == 200


# ---------------------------------------------------------------------------------------------------
# Pieces without a server


def test_crdschema_admission_as_a_pure_function():
    crd = yaml.safe_load(WIDGET_CRD.read_text())
    obj = {
        "apiVersion": "example.dev/v1alpha1",
        "kind": "Widget",
        "metadata": {"name": "p"},
        "spec": {"size": 2},
    }
    assert crdschema.apply_defaults(crd, obj)["spec"] == {"size": 2, "color": "red"}
    assert crdschema.validate(crd, obj) == []
    bad = {**obj, "spec": {"size": "2", "color": "pink", "labels": {"a": 1}}}
    assert crdschema.validate(crd, bad) == [
        'spec.color: Unsupported value: "pink": supported values: "red", "green", "blue"',
        'spec.labels.a: Invalid value: "integer": spec.labels.a in body must be of type string: "integer"',
        'spec.size: Invalid value: "string": spec.size in body must be of type integer: "string"',
    ]
    assert crdschema.validate(crd, {**obj, "spec": {}}) == ["spec.size: Required value"]
    assert crdschema.unknown_fields(crd, {**obj, "spec": {"size": 1, "x": 1}}) == ["spec.x"]
    assert crdschema.validate(crd, {**obj, "metadata": {"name": "Bad_Name"}})[0].startswith(
        'metadata.name: Invalid value: "Bad_Name": a lowercase RFC 1123 subdomain'
    )
    # A root schema may restrict metadata.name; other metadata is the apiserver's own.
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["metadata"] = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 3}},
    }
    assert crdschema.validate(crd, {**obj, "metadata": {"name": "four", "labels": {"a": "b"}}}) == [
        "metadata.name: Too long: may not be more than 3 bytes"
    ]


def test_crdschema_cel_rules_like_kubernetes():
    rules = [
        {"rule": "self.rate > 0 && self.steps >= 1", "message": "rate and steps must be positive"},
        {"rule": "size(self.name) <= 5", "messageExpression": "'name too long: ' + self.name"},
        {"rule": "self.steps == oldSelf.steps", "message": "steps is immutable", "fieldPath": ".steps"},
    ]
    schema = {
        "type": "object",
        "x-kubernetes-validations": rules,
        "properties": {"rate": {"type": "number"}, "steps": {"type": "integer"}, "name": {"type": "string"}},
    }
    # A `number` holding 1 is a double; comparing it with the int literal 0 is allowed, as in Kubernetes.
    assert crdschema.cel_errors(schema, {"rate": 1, "steps": 2, "name": "ok"}) == []
    assert crdschema.cel_errors(schema, {"rate": 0.0, "steps": 2, "name": "toolong"}) == [
        '<nil>: Invalid value: "object": rate and steps must be positive',
        '<nil>: Invalid value: "object": name too long: toolong',
    ]
    # Transition rules run only on updates.
    old = {"rate": 1, "steps": 2, "name": "a"}
    assert crdschema.cel_errors(schema, {**old, "steps": 3}, old=old) == [
        'steps: Invalid value: "object": steps is immutable'
    ]


def test_small_helpers():
    assert [human_duration(s) for s in (5, 119, 150, 600, 7200, 90000, 200 * 86400)] == [
        "5s", "119s", "2m30s", "10m", "120m", "25h", "200d"
    ]  # fmt: skip
    doc = {"status": {"conditions": [{"type": "A", "status": "x"}, {"type": "Ready", "status": "True"}]}}
    assert jsonpath(doc, '.status.conditions[?(@.type=="Ready")].status') == ["True"]
    assert jsonpath(doc, ".status.conditions[0].type") == ["A"]
    assert jsonpath(doc, ".status.missing") == []
    assert parse_label_selector("a=b, c notin (d,e),!f") == [
        ("=", "a", ["b"]),
        ("notin", "c", ["d", "e"]),
        ("!", "f", []),
    ]
