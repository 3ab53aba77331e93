"""The operator's RBAC grants exactly what the operator uses: nothing it needs is missing, nothing it never
uses is granted.

Three sources, each of which can fail the comparison:

1. Enforcement. Every kube test runs the operator as the chart's ServiceAccount, under the ClusterRoles,
   Roles and bindings `helm template` renders, and the local API server answers 403 to whatever they do
   not grant (`drive.Operator`, `apiserver.RBAC`): a missing grant fails the scenario that needs it.
2. A static derivation from the code, complete for paths no scenario runs. The operator's Kubernetes calls
   all go through `ttt_operator.cluster.Cluster` (checked below: no other module touches the client's API
   classes). Each client method is mapped to (verb, group, resource) through the endpoint it requests (its
   HTTP method and path, read from the client's source) by the same RequestInfo rules the API server
   authorizes with; the custom resources a Cluster method is called for come from its call sites (kind
   literals) and, for methods given an object, from the kinds of the objects the operator builds. kopf's
   part comes from its handler registry: list and watch of every handled resource, patch of those with
   change handlers (its annotation progress and diff-base storage), plus what its cluster observation
   reads (list and watch of CRDs, and of namespaces when it serves given ones) and the Events it posts.
   OwnerReferencesPermissionEnforcement adds update on `<owner>/finalizers` for each owner kind the
   operator references with blockOwnerDeletion.
3. A dynamic record: every (verb, group, resource) the operator's identity was authorized for, allowed or
   denied, in this test session (a short scenario of this module's own, and after the other kube tests,
   theirs too). It must lie within the static derivation: a call the derivation does not model (a new
   client path, something kopf started doing) fails here rather than passing unnoticed.

The chart's rules, with the default values (ClusterRoles) and with the multi-namespace CI values (a Role per
namespace), must equal the derivation plus PENDING_GRANTS (grants for code being written), both ways.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from kubernetes import client as kube_client_module

import ttt_operator
from tests.helpers import ROOT
from tests.kube.apiserver import FakeApiServer, request_attributes
from tests.kube.drive import (
    CRD,
    OPERATOR_USER,
    RAYJOB_CRD,
    SWEEP_CRD,
    Operator,
    chart_rbac,
    eventually,
    get,
    kubectl,
    operator_env,
    phase_is,
    prepare,
    set_rayjob_status,
    tttjob,
)
from ttt_operator.cluster import CUSTOM

PACKAGE = Path(ttt_operator.__file__).parent
NAMESPACE = "rbac"
Triple = tuple[str, str, str]  # (verb, API group, resource[/subresource])

# Grants the chart may carry ahead of operator code being written that will use them, each with why. An
# entry leaves this set once the derivation finds its call in the code (until then
# test_pending_grants_are_not_yet_derived passes; after, it fails). Empty: all that is granted is called.
PENDING_GRANTS: set[Triple] = set()
# What kopf's cluster observation reads whatever the handlers (kopf/_core/reactor/observation.py): the CRDs
# (watched, so that a resource installed later, KubeRay's RayJob, is served without a restart) and, when it
# serves given namespaces rather than all, the namespaces (which of them exist).
KOPF_OBSERVES_CRDS: set[Triple] = {
    ("list", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
}
KOPF_OBSERVES_NAMESPACES: set[Triple] = {("list", "", "namespaces"), ("watch", "", "namespaces")}
KOPF_POSTING: set[Triple] = {("create", "", "events")}  # kopf posts v1 Events for its warnings and errors
CLUSTER_SCOPED = {"namespaces", "customresourcedefinitions"}


# -- the static derivation ----------------------------------------------------------------------------


def _trees() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def _value(node: ast.AST, module: str) -> Any:
    """A constant, or a module-level name or attribute (KIND, sweeps.SWEEP_KIND) of `module`; else None."""
    if isinstance(node, ast.Constant):
        return node.value
    if not isinstance(node, ast.Name | ast.Attribute):
        return None
    try:
        return eval(ast.unparse(node), vars(importlib.import_module(f"ttt_operator.{module}")))
    except Exception:
        return None


def _dicts(trees: dict[str, ast.Module]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every dict display of the package: (module, {constant key: value node})."""
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = [k.value if isinstance(k, ast.Constant) else None for k in node.keys]
                yield module, dict(zip(keys, node.values, strict=True))


def _endpoint(api: type, method: str) -> tuple[str, str]:
    """(HTTP method, path template) a kubernetes client method requests."""
    source = inspect.getsource(getattr(api, f"_{method}_serialize"))
    http = re.search(r"method='(\w+)'", source)
    path = re.search(r"resource_path='([^']+)'", source)
    assert http and path, f"cannot read the endpoint of {api.__name__}.{method}"
    return http.group(1), path.group(1)


def _triple(http: str, path: str, watch: bool) -> Triple:
    attrs = request_attributes(http, re.sub(r"\{(\w+)\}", r"\1", path), {"watch": "true"} if watch else {})
    assert attrs.resource_request, path
    return (attrs.verb, attrs.group, attrs.combined_resource)


def client_calls() -> set[Triple]:
    """What the methods of `Cluster` call, each custom-object call for the kinds it is used with."""
    trees = _trees()
    cls = next(n for n in trees["cluster"].body if isinstance(n, ast.ClassDef) and n.name == "Cluster")
    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    apis: dict[str, type] = {}  # self.<attribute> = client.<SomeApi>(...) in __init__
    for node in ast.walk(methods["__init__"]):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.BoolOp | ast.Call):
            for call in ast.walk(node.value):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
                    api = getattr(kube_client_module, call.func.attr, None)
                    if inspect.isclass(api) and call.func.attr.endswith("Api"):
                        apis[node.targets[0].attr] = api  # type: ignore[attr-defined]
    built = {  # kinds of the objects the operator builds (and so creates, or checks the owner of)
        _value(entries["kind"], module)
        for module, entries in _dicts(trees)
        if {"apiVersion", "kind", "metadata"} <= entries.keys()
    }
    assert {"ConfigMap", "RayJob", "TTTJob"} <= built, built
    known = set(CUSTOM) | built
    kinds: dict[str, set[str]] = {name: set() for name in methods}
    for name, function in methods.items():
        params = [a.arg for a in function.args.args]
        if params[1:2] == ["body"]:
            kinds[name] |= built
    for (
        module,
        tree,
    ) in trees.items():  # call sites naming a kind: api.get("TTTJob", ...), self.list("RayJob", ...)
        for call in ast.walk(tree):
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr in methods
                and call.args
                and _value(call.args[0], module) in known
            ):
                kinds[call.func.attr].add(_value(call.args[0], module))
    passes = []  # (caller, callee): the caller hands its own object on (self.get(body["kind"], ...))
    for name, function in methods.items():
        params = [a.arg for a in function.args.args]
        for call in ast.walk(function):
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Name)
                and call.func.value.id == "self"
                and call.func.attr in methods
                and call.args
                and any(isinstance(n, ast.Name) and n.id in params[1:2] for n in ast.walk(call.args[0]))
            ):
                passes.append((name, call.func.attr))
    for _ in methods:
        for caller, callee in passes:
            kinds[callee] |= kinds[caller]
    used: set[Triple] = set()
    for name, function in methods.items():
        for call in ast.walk(function):
            if not (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Attribute)
                and call.func.value.attr in apis
            ):
                continue
            http, path = _endpoint(apis[call.func.value.attr], call.func.attr)
            watch = any(k.arg == "watch" for k in call.keywords)
            if "{plural}" not in path:
                used.add(_triple(http, path, watch))
                continue
            for kind in kinds[name] & set(CUSTOM):
                group, version, plural = CUSTOM[kind]
                concrete = path.replace("{group}", group).replace("{version}", version)
                used.add(_triple(http, concrete.replace("{plural}", plural), watch))
    return used


def owner_finalizers() -> set[Triple]:
    """OwnerReferencesPermissionEnforcement: update on the finalizers of each owner kind referenced with
    blockOwnerDeletion."""
    out = set()
    for module, entries in _dicts(_trees()):
        if "blockOwnerDeletion" in entries and _value(entries["blockOwnerDeletion"], module) is True:
            kind = _value(entries["kind"], module)
            assert kind in CUSTOM, f"an owner reference to a {kind} in {module}.py"
            group, _, plural = CUSTOM[kind]
            out.add(("update", group, f"{plural}/finalizers"))
    return out


def kopf_needs(clusterwide: bool) -> set[Triple]:
    """What kopf does for the handlers the operator registers, serving all namespaces or given ones."""
    importlib.import_module("ttt_operator.handlers")  # registers them
    registry = kopf.get_default_registry()
    out = KOPF_OBSERVES_CRDS | KOPF_POSTING | (set() if clusterwide else KOPF_OBSERVES_NAMESPACES)
    watching = [*registry._watching.get_all_handlers(), *registry._indexing.get_all_handlers()]
    storing = [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    for handler in watching + storing:
        selector = handler.selector
        assert selector is not None, f"a handler of no resource: {handler}"
        plural = _plural(selector.group, selector.plural or selector.any_name or selector.kind)
        out |= {("list", selector.group, plural), ("watch", selector.group, plural)}
        if handler in storing:
            out.add(("patch", selector.group, plural))
    return out


def _plural(group: str, name: str) -> str:
    """The plural of a resource a kopf handler names by plural, singular, kind or short name."""
    for path in (CRD, SWEEP_CRD, RAYJOB_CRD):
        crd = yaml.safe_load(path.read_text())
        names = crd["spec"]["names"]
        if crd["spec"]["group"] == group and name in (
            names["plural"],
            names.get("singular"),
            names["kind"],
            *names.get("shortNames", []),
        ):
            return names["plural"]
    raise AssertionError(f"a kopf handler of {name}.{group}, of no CRD the operator knows")


@functools.cache
def derived(clusterwide: bool = False) -> frozenset[Triple]:
    """Everything the operator may call, serving all namespaces (the chart's default) or given ones."""
    return frozenset(client_calls() | owner_finalizers() | kopf_needs(clusterwide))


# -- the chart ----------------------------------------------------------------------------------------


def rules(role: dict[str, Any]) -> set[Triple]:
    out = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"{role['metadata']['name']}: {rule}"
        out |= {(v, g, r) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def granted(namespaces: tuple[str, ...]) -> tuple[set[Triple], set[Triple]]:
    """(cluster-wide rules, rules of the work) of the chart rendered for `namespaces` (default values for
    none): the discovery ClusterRole, and the operator's ClusterRole or the Roles (all the same)."""
    objects = chart_rbac(namespaces)
    discovery = [
        o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"].endswith("-discovery")
    ]
    work = [o for o in objects if o["kind"] in ("ClusterRole", "Role") and o not in discovery]
    assert len(discovery) == 1 and work
    assert [o["kind"] for o in work] == (["Role"] * len(namespaces) if namespaces else ["ClusterRole"])
    work_rules = [rules(o) for o in work]
    assert all(r == work_rules[0] for r in work_rules)
    return rules(discovery[0]), work_rules[0]


# -- tests: static --------------------------------------------------------------------------------------


def test_only_cluster_py_calls_the_kubernetes_api():
    """The derivation reads Cluster's calls: another module using the client's APIs would escape it."""
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "cluster.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kubernetes"):
                names = {a.name for a in node.names}
                assert node.module == "kubernetes.client.exceptions" and names == {"ApiException"}, (
                    f"{path.name} imports {names} from {node.module}: call the API through Cluster"
                )
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("kubernetes") for a in node.names), path.name


def test_the_derivation_sees_the_calls_known_today():
    """A floor under the scanner: calls the operator is known to make must come out of it."""
    assert {
        ("create", "", "configmaps"),
        ("get", "", "configmaps"),
        ("create", "ray.io", "rayjobs"),
        ("list", "ray.io", "rayjobs"),
        ("delete", "ray.io", "rayjobs"),
        ("create", "ttt.dev", "tttjobs"),
        ("patch", "ttt.dev", "tttjobs/status"),
        ("patch", "ttt.dev", "tttsweeps/status"),
        ("create", "", "events"),
    } <= client_calls()
    assert owner_finalizers() == {
        ("update", "ttt.dev", "tttjobs/finalizers"),
        ("update", "ttt.dev", "tttsweeps/finalizers"),
    }
    assert {("watch", "ray.io", "rayjobs"), ("patch", "ttt.dev", "tttjobs")} <= kopf_needs(True)
    assert ("patch", "ray.io", "rayjobs") not in kopf_needs(True)  # event handlers store no progress


@pytest.mark.parametrize("namespaces", [(), ("team-a", "team-b")], ids=["cluster-wide", "per-namespace"])
def test_chart_grants_exactly_what_the_code_uses(namespaces):
    cluster_wide, work = granted(namespaces)
    needed = derived(clusterwide=not namespaces)
    assert cluster_wide == {t for t in needed if t[2] in CLUSTER_SCOPED}, "the discovery ClusterRole"
    expected = {t for t in needed if t[2] not in CLUSTER_SCOPED} | PENDING_GRANTS
    assert sorted(work - expected) == [], "granted, but the operator never uses it"
    assert sorted(expected - work) == [], "used (or pending), but not granted"


def test_pending_grants_are_not_yet_derived():
    """Once the code that needs a pending grant lands, the derivation finds it: take it off the list."""
    assert sorted(PENDING_GRANTS & derived(clusterwide=False)) == []


# -- tests: dynamic -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario(apiserver: FakeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The operator as the chart's ServiceAccount through the calls of its main paths: a sweep and its
    trials, names taken by objects of another owner, a suspension, an attempt starting with a Ray cluster."""
    base = tmp_path_factory.mktemp("rbac")
    kubeconfig = prepare(apiserver, base, [NAMESPACE], (CRD, SWEEP_CRD, RAYJOB_CRD))
    operator = Operator(operator_env(kubeconfig, NAMESPACE, base / "runs"), base / "operator.log")
    operator.start()
    k = kubectl(kubeconfig)
    try:
        sweep = yaml.safe_load((ROOT / "jobs" / "examples" / "sweep-tiny-cpu.yaml").read_text())
        k("apply", "-f", "-", stdin=yaml.safe_dump(sweep))
        first = f"{sweep['metadata']['name']}-t0-a1"
        eventually(lambda: get(k, "rayjob", first), f"the first trial's RayJob {first}")
        # Names held by objects of no TTTJob: the operator reads them to tell (a ConfigMap, then a RayJob).
        apiserver.apply(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm-a1", "namespace": NAMESPACE}}
        )
        apiserver.apply(
            {
                "apiVersion": "ray.io/v1",
                "kind": "RayJob",
                "metadata": {"name": "rj-a1", "namespace": NAMESPACE},
                "spec": {"entrypoint": "true"},
            }
        )
        for name in ("cm", "rj"):
            k("apply", "-f", "-", stdin=tttjob(name))
            eventually(lambda n=name: _reason(k, n) == "NameInUse", f"{name} waiting for its name")
        k("apply", "-f", "-", stdin=tttjob("pause"))
        eventually(lambda: get(k, "rayjob", "pause-a1"), "RayJob pause-a1")
        set_rayjob_status(
            k, "pause-a1", jobDeploymentStatus="Initializing", rayClusterName="pause-raycluster"
        )
        time.sleep(3)  # three polls of a starting attempt
        k("patch", "tj", "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
        eventually(phase_is(k, "pause", "Suspended"), "phase Suspended")
        eventually(lambda: get(k, "rayjob", "pause-a1") is None, "the suspended attempt's RayJob deleted")
        yield apiserver
    finally:
        operator.stop()


def _reason(k: Any, name: str) -> str | None:
    return ((get(k, "tttjob", name) or {}).get("status") or {}).get("reason")


def test_what_the_operator_did_lies_within_the_derivation(scenario):
    asked = scenario.decisions(OPERATOR_USER)
    seen = {(verb, group, resource) for verb, group, resource, _ in asked if not resource.startswith("/")}
    # The scenario's own calls, so that the comparison below is not vacuous.
    assert {
        ("create", "ttt.dev", "tttjobs"),
        ("update", "ttt.dev", "tttsweeps/finalizers"),
        ("get", "", "configmaps"),
        ("get", "ray.io", "rayjobs"),
        ("delete", "ray.io", "rayjobs"),
        ("patch", "ttt.dev", "tttjobs"),
    } <= seen
    unknown = {
        key: counts
        for key, counts in asked.items()
        if key[:3] not in derived() and not key[2].startswith("/")
    }
    assert unknown == {}, (
        "calls the derivation does not know of: (verb, group, resource, namespace): (allowed, denied)"
    )
    cluster_wide, work = granted((NAMESPACE,))
    assert seen <= cluster_wide | work
