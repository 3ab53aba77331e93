"""A fake Kubernetes API server on 127.0.0.1 that real `kubectl`, `kopf` and the `kubernetes` client accept.

Our own small aiohttp server rather than a kmock wrapper: kmock 0.8 needs a dozen fixes before real clients
work (see docs/environment.md), and CRD admission, tables, generations, finalizers, cascade deletion and
resumable watches are all additions, so a store with Kubernetes semantics is smaller than the patches.

What it does: legacy discovery, JSON only (protobuf requests get 415), CRDs that become served when created,
CR admission through `tests.kube.crdschema` (defaults, pruning, schema and CEL rules, 422 `Invalid`), a
status subresource, `meta.k8s.io/v1` Tables from printer columns, merge / strategic / JSON / apply patches,
finalizers, ownerReference garbage collection, namespace termination and watches that resume from a
resourceVersion and honour `timeoutSeconds`. Requests without credentials have full access; a
ServiceAccount's token (TokenRequest API, `kubectl create token`) is held to RBAC over the stored Roles,
ClusterRoles and bindings, with the OwnerReferencesPermissionEnforcement admission plugin. No admission
webhooks, conversion or pagination; server-side apply is a plain merge.

    with FakeApiServer() as server:
        server.write_kubeconfig(path)          # then: KUBECONFIG=path kubectl apply --validate=false -f ...
        server.load_crd("tests/data/widgets.example.dev.yaml")
        server.objects("widgets", namespace="default")

Foreground, for transcripts: `python -m tests.kube.apiserver --port 8001 --crd FILE ... --kubeconfig PATH`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import datetime as dt
import json
import logging
import random
import re
import secrets
import socket
import string
import threading
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import yaml
from aiohttp import web

from tests.kube import crdschema

KUBE_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
RBAC_GROUP = "rbac.authorization.k8s.io"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the KubeRay CRD is 1.4 MB of YAML
EVENT_LOG_SIZE = 20000  # watch events kept for resuming; older resourceVersions answer 410 Gone


# ---------------------------------------------------------------------------------------------------
# Errors in the apiserver's Status format


class ApiError(Exception):
    """An error answered as a `v1 Status` (kubectl, kopf and the python client all parse `reason`)."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def body(self) -> dict:
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status


def _not_found(res: Resource, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{res.qualified_plural} "{name}" not found',
        {"name": name, "group": res.group, "kind": res.plural},
    )


def _unknown_path() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _invalid(res: Resource, name: str, messages: list[str]) -> ApiError:
    body = messages[0] if len(messages) == 1 else "[" + ", ".join(messages) + "]"
    causes = []
    for message in messages:
        field, _, detail = message.partition(": ")
        causes.append({"reason": "FieldValueInvalid", "message": detail, "field": field})
    return ApiError(
        422,
        "Invalid",
        f'{res.qualified_kind} "{name}" is invalid: {body}',
        {"name": name, "group": res.group, "kind": res.kind, "causes": causes},
    )


def _conflict(res: Resource, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {res.qualified_plural} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        {"name": name, "group": res.group, "kind": res.plural},
    )


# ---------------------------------------------------------------------------------------------------
# Resource types


@dataclasses.dataclass
class Resource:
    """One served resource type: a built-in or one registered by a CRD."""

    group: str
    versions: list[str]  # served versions, preferred first
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: list[str] = dataclasses.field(default_factory=list)
    categories: list[str] = dataclasses.field(default_factory=list)
    subresources: set[str] = dataclasses.field(default_factory=set)
    crd: dict | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def qualified_plural(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def api_version(self, version: str | None = None) -> str:
        version = version or self.versions[0]
        return f"{self.group}/{version}" if self.group else version

    def printer_columns(self, version: str) -> list[dict]:
        """The CRD's printer columns for `version`, or the apiserver's default Age column."""
        if self.crd is not None:
            columns = crdschema.crd_version(self.crd, version).get("additionalPrinterColumns")
            if columns:
                return columns
        if self.key == ("", "namespaces"):
            return [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}, _AGE_COLUMN]
        return [_AGE_COLUMN]


_AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _builtin(group: str, version: str, plural: str, kind: str, namespaced: bool, *short: str) -> Resource:
    categories = ["all"] if plural in ("pods", "services", "deployments", "jobs") else []  # `kubectl get all`
    return Resource(group, [version], plural, kind, namespaced, kind.lower(), list(short), categories)


BUILTINS = (
    _builtin("", "v1", "namespaces", "Namespace", False, "ns"),
    _builtin("", "v1", "configmaps", "ConfigMap", True, "cm"),
    _builtin("", "v1", "secrets", "Secret", True),
    _builtin("", "v1", "events", "Event", True, "ev"),
    _builtin("", "v1", "services", "Service", True, "svc"),
    _builtin("", "v1", "serviceaccounts", "ServiceAccount", True, "sa"),
    _builtin("", "v1", "pods", "Pod", True, "po"),
    _builtin("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, "pvc"),
    _builtin("apps", "v1", "deployments", "Deployment", True, "deploy"),
    _builtin("batch", "v1", "jobs", "Job", True),
    _builtin("coordination.k8s.io", "v1", "leases", "Lease", True),
    _builtin("events.k8s.io", "v1", "events", "Event", True, "ev"),
    _builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    _builtin("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    _builtin("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    _builtin("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    _builtin(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        "crd",
        "crds",
    ),
)
_CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")
_NAMESPACES = ("", "namespaces")


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version order: GA, then beta, then alpha; higher numbers first (v1 > v1beta2 > v1alpha1)."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, 0, 0)
    stage = {"alpha": 2, "beta": 1, None: 0}[match.group(2)]
    return (stage, -int(match.group(1)), -int(match.group(3) or 0))


def resource_from_crd(crd: dict) -> Resource:
    spec, names = crd["spec"], crd["spec"]["names"]
    served = [v for v in spec["versions"] if v.get("served", True)]
    subresources = set()
    for entry in served:
        subresources |= set((entry.get("subresources") or {}).keys())
    return Resource(
        group=spec["group"],
        versions=sorted((v["name"] for v in served), key=_version_priority),
        plural=names["plural"],
        kind=names["kind"],
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        singular=names.get("singular", names["kind"].lower()),
        short_names=list(names.get("shortNames", [])),
        categories=list(names.get("categories", [])),
        subresources=subresources,
        crd=crd,
    )


# ---------------------------------------------------------------------------------------------------
# Selectors and JSONPath


def parse_label_selector(text: str) -> list[tuple[str, str, list[str]]]:
    """`a=b,c!=d,e,!f,g in (h,i),j notin (k)` as (operator, key, values) terms."""
    terms: list[tuple[str, str, list[str]]] = []
    for part in re.split(r",(?![^()]*\))", text or ""):
        part = part.strip()
        if not part:
            continue
        if match := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", part):
            values = [v.strip() for v in match.group(3).split(",") if v.strip()]
            terms.append((match.group(2), match.group(1), values))
        elif match := re.fullmatch(r"([^=!\s]+)\s*(==|!=|=)\s*(\S*)", part):
            terms.append(("!=" if match.group(2) == "!=" else "=", match.group(1), [match.group(3)]))
        elif match := re.fullmatch(r"!\s*([^=!\s]+)", part):
            terms.append(("!", match.group(1), []))
        elif re.fullmatch(r"[^=!\s(),]+", part):
            terms.append(("exists", part, []))
        else:
            raise _bad_request(f"unable to parse requirement: {part!r}")
    return terms


def labels_match(terms: list[tuple[str, str, list[str]]], labels: dict[str, str]) -> bool:
    for operator, key, values in terms:
        value = labels.get(key)
        if operator == "=":
            ok = key in labels and value == values[0]
        elif operator == "!=":
            ok = value != values[0]
        elif operator == "in":
            ok = key in labels and value in values
        elif operator == "notin":
            ok = value not in values
        elif operator == "exists":
            ok = key in labels
        else:
            ok = key not in labels
        if not ok:
            return False
    return True


def parse_field_selector(text: str) -> list[tuple[str, str, str]]:
    """`metadata.name=x,status.phase!=Done` as (path, operator, value) terms."""
    terms = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        match = re.fullmatch(r"\s*([\w.]+)\s*(==|!=|=)\s*(.*?)\s*", part)
        if not match:
            raise _bad_request(f"invalid selector: {part!r}")
        terms.append((match.group(1), "!=" if match.group(2) == "!=" else "=", match.group(3)))
    return terms


def fields_match(terms: list[tuple[str, str, str]], obj: dict) -> bool:
    for path, operator, wanted in terms:
        value: Any = obj
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        if (text == wanted) != (operator == "="):
            return False
    return True


def _literal(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    try:
        return json.loads(text)
    except ValueError:
        return text


def jsonpath(obj: Any, path: str) -> list[Any]:
    """The values a printer column's JSONPath selects: `.a.b`, `['a']`, `[0]`, `[*]`, `[?(@.k=="v")]`."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    current, index = [obj], 0
    while index < len(path) and current:
        if path.startswith("[?(", index):
            end = path.index(")]", index)
            match = re.fullmatch(r"\s*@\.([\w.\-]+)\s*(==|!=)\s*(.+)", path[index + 3 : end])
            if not match:
                raise ValueError(f"unsupported JSONPath filter in {path!r}")
            field, operator, wanted = match.group(1), match.group(2), _literal(match.group(3))
            kept = []
            for item in (x for c in current if isinstance(c, list) for x in c):
                value = jsonpath(item, "." + field)
                if (bool(value) and value[0] == wanted) == (operator == "=="):
                    kept.append(item)
            current, index = kept, end + 2
        elif path.startswith("[*]", index) or path.startswith(".*", index):
            current = [x for c in current for x in (c if isinstance(c, list) else (c or {}).values())]
            index += 2 if path[index] == "." else 3
        elif path[index] == "[":
            end = path.index("]", index)
            inner, index = path[index + 1 : end], end + 1
            if inner.lstrip("-").isdigit():
                position = int(inner)
                current = [
                    c[position] for c in current if isinstance(c, list) and -len(c) <= position < len(c)
                ]
            else:
                key = _literal(inner)
                current = [c[key] for c in current if isinstance(c, dict) and key in c]
        elif path[index] == ".":
            match = re.match(r"\.([^.\[]+)", path[index:])
            if not match:
                index += 1
                continue
            key, index = match.group(1), index + match.end()
            current = [c[key] for c in current if isinstance(c, dict) and key in c]
        else:
            raise ValueError(f"unsupported JSONPath {path!r}")
    return current


# ---------------------------------------------------------------------------------------------------
# Patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# List fields of built-in types merged by key (patchMergeKey), as kubectl's strategic patches expect.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "conditions": "type",
}
_MERGED_PRIMITIVE_LISTS = {"finalizers"}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A strategic merge patch for the built-in types served here: a merge patch that honours the
    `$patch`, `$deleteFromPrimitiveList/` and `$setElementOrder/` directives and merges known lists by key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name) or [] if v not in value]
        elif key.startswith("$"):
            continue  # $setElementOrder/, $retainKeys, $patch: ordering and hints only
        elif value is None:
            result.pop(key, None)
        elif key in _MERGE_KEYS and isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, _MERGE_KEYS[key])
        elif key in _MERGED_PRIMITIVE_LISTS and isinstance(value, list):
            result[key] = [*(result.get(key) or []), *(v for v in value if v not in (result.get(key) or []))]
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _merge_list(current: list, patch: list, merge_key: str) -> list:
    merged = [copy.deepcopy(item) for item in current]
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            return copy.deepcopy(patch)
        position = next(
            (
                i
                for i, old in enumerate(merged)
                if isinstance(old, dict) and old.get(merge_key) == item[merge_key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if position is not None:
                merged.pop(position)
        elif position is None:
            merged.append(strategic_merge_patch({}, item))
        else:
            merged[position] = strategic_merge_patch(merged[position], item)
    return merged


# ---------------------------------------------------------------------------------------------------
# Time


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_duration(seconds: float) -> str:
    """Age as kubectl shows it (apimachinery's `duration.HumanDuration`)."""
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def _age(timestamp: Any) -> str | None:
    if not isinstance(timestamp, str):
        return None
    try:
        then = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return "<invalid>"
    return human_duration((dt.datetime.now(dt.timezone.utc) - then).total_seconds())


# ---------------------------------------------------------------------------------------------------
# The store


@dataclasses.dataclass(eq=False)
class Watcher:
    key: tuple[str, str]
    namespace: str | None
    labels: list[tuple[str, str, list[str]]]
    fields: list[tuple[str, str, str]]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def wants(self, key: tuple[str, str], obj: dict) -> bool:
        meta = obj.get("metadata", {})
        return (
            key == self.key
            and (self.namespace is None or meta.get("namespace") == self.namespace)
            and labels_match(self.labels, meta.get("labels") or {})
            and fields_match(self.fields, obj)
        )

    def send(self, event: tuple[str, dict] | None) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: that stream has ended anyway
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Cluster:
    """Objects with apiserver semantics. Thread-safe: the HTTP handlers and test code both call it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._resources: dict[tuple[str, str], Resource] = {r.key: r for r in BUILTINS}
        self._objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = {r.key: {} for r in BUILTINS}
        self._rv = 0
        self._log: deque[tuple[int, tuple[str, str], str, dict]] = deque(maxlen=EVENT_LOG_SIZE)
        self._watchers: set[Watcher] = set()
        # token -> (namespace, name, uid) of the ServiceAccount it was issued for
        self._tokens: dict[str, tuple[str, str, str]] = {}
        for name in DEFAULT_NAMESPACES:
            self.create(self._resources[_NAMESPACES], None, {"metadata": {"name": name}})
        for obj in DEFAULT_RBAC:
            self.create(self._resources[(RBAC_GROUP, obj["kind"].lower() + "s")], None, obj)

    # -- resource types ---------------------------------------------------------------------------

    def resources(self) -> list[Resource]:
        with self._lock:
            return list(self._resources.values())

    def resource(self, group: str, version: str, plural: str) -> Resource:
        with self._lock:
            res = self._resources.get((group, plural))
        if res is None or version not in res.versions:
            raise _unknown_path()
        return res

    def find(self, name: str, group: str | None = None) -> Resource:
        """A resource type by plural, singular, kind or short name (for tests and helpers)."""
        with self._lock:
            for res in self._resources.values():
                names = {res.plural, res.singular, res.kind.lower(), *res.short_names}
                if name.lower() in names and (group is None or res.group == group):
                    return res
        raise KeyError(f"no resource type {name!r}")

    def _register_crd(self, crd: dict) -> None:
        res = resource_from_crd(crd)
        self._resources[res.key] = res
        self._objects.setdefault(res.key, {})

    # -- reads -------------------------------------------------------------------------------------

    def get(self, res: Resource, namespace: str | None, name: str) -> dict:
        with self._lock:
            obj = self._objects[res.key].get((namespace or "", name))
            if obj is None:
                raise _not_found(res, name)
            return copy.deepcopy(obj)

    def list(
        self, res: Resource, namespace: str | None, label_selector: str = "", field_selector: str = ""
    ) -> tuple[list[dict], str]:
        labels, fields = parse_label_selector(label_selector), parse_field_selector(field_selector)
        with self._lock:
            items = [
                copy.deepcopy(obj)
                for (ns, _), obj in sorted(self._objects[res.key].items())
                if (namespace is None or ns == namespace)
                and labels_match(labels, obj["metadata"].get("labels") or {})
                and fields_match(fields, obj)
            ]
            return items, str(self._rv)

    def stored(self, key: tuple[str, str], namespace: str | None = None) -> list[dict]:
        """The stored objects of a type (in `namespace`, or all), uncopied: for reading only."""
        with self._lock:
            return [
                obj
                for (ns, _), obj in self._objects.get(key, {}).items()
                if namespace is None or ns == namespace
            ]

    def stored_one(self, key: tuple[str, str], namespace: str, name: str) -> dict | None:
        with self._lock:
            return self._objects.get(key, {}).get((namespace, name))

    # -- service account tokens --------------------------------------------------------------------

    def issue_token(self, namespace: str, name: str) -> str:
        """A token for a ServiceAccount (the TokenRequest API; an opaque string here, not a signed JWT)."""
        with self._lock:
            account = self._current(self._resources[("", "serviceaccounts")], namespace, name)
            token = secrets.token_urlsafe(24)
            self._tokens[token] = (namespace, name, account["metadata"]["uid"])
            return token

    def authenticate(self, token: str) -> User | None:
        """The ServiceAccount a token was issued for, while that account (the same one, by UID) exists:
        tokens are bound to the account and die with it."""
        with self._lock:
            namespace, name, uid = self._tokens.get(token, ("", "", ""))
            account = self._objects[("", "serviceaccounts")].get((namespace, name))
            if account is None or account["metadata"]["uid"] != uid:
                return None
            return service_account_user(namespace, name)

    # -- writes ------------------------------------------------------------------------------------

    def create(
        self, res: Resource, namespace: str | None, body: dict, dry_run: bool = False, strict: bool = False
    ) -> dict:
        """Create an object; `strict` (fieldValidation=Strict) rejects fields a CRD does not declare."""
        with self._lock:
            obj = copy.deepcopy(body)
            meta = obj.setdefault("metadata", {})
            if not isinstance(meta, dict):
                raise _bad_request("metadata must be an object")
            obj["kind"] = res.kind
            obj.setdefault("apiVersion", res.api_version())
            if res.namespaced:
                namespace = namespace or meta.get("namespace") or "default"
                if meta.get("namespace", namespace) != namespace:
                    raise _bad_request(
                        "the namespace of the provided object does not match the namespace sent "
                        "on the request"
                    )
                meta["namespace"] = namespace
                owner = self._objects[_NAMESPACES].get(("", namespace))
                if owner is None:
                    raise ApiError(
                        404,
                        "NotFound",
                        f'namespaces "{namespace}" not found',
                        {"name": namespace, "kind": "namespaces"},
                    )
                if owner["metadata"].get("deletionTimestamp"):
                    raise ApiError(
                        403,
                        "Forbidden",
                        f'{res.qualified_plural} "{meta.get("name", "")}" is forbidden: unable to create new '
                        f"content in namespace {namespace} because it is being terminated",
                    )
            else:
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
                meta["name"] = meta["generateName"] + suffix
            name = meta.get("name") or ""
            if res.group == RBAC_GROUP:
                # "The name of a Role or a ClusterRole object must be a valid path segment name"
                # (https://kubernetes.io/docs/reference/access-authn-authz/rbac/#api-overview): system:x too
                if not name or name in (".", "..") or "/" in name or "%" in name:
                    raise _invalid(
                        res, name, [f'metadata.name: Invalid value: "{name}": a valid path segment name']
                    )
            elif res.crd is None and (errors := crdschema.name_errors(meta)):
                raise _invalid(res, name, errors)  # (custom resources get the same check in admission)
            if (meta.get("namespace", ""), name) in self._objects[res.key]:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{res.qualified_plural} "{name}" already exists',
                    {"name": name, "group": res.group, "kind": res.plural},
                )
            if "status" in res.subresources:
                obj.pop("status", None)  # status is written through /status only
            for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
                meta.pop(field, None)
            obj = self._admit(res, obj, None, None, strict)
            obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            if res.key == _NAMESPACES:
                obj.setdefault("spec", {"finalizers": ["kubernetes"]})
                obj["status"] = {"phase": "Active"}
            if res.key == _CRDS:
                obj["status"] = self._crd_status(obj)
            if dry_run:
                return obj
            obj["metadata"]["resourceVersion"] = self._next_rv()
            self._objects[res.key][(obj["metadata"].get("namespace", ""), name)] = obj
            if res.key == _CRDS:
                self._register_crd(obj)
            self._emit(res, "ADDED", obj)
            return copy.deepcopy(obj)

    def replace(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        body: dict,
        subresource: str | None = None,
        dry_run: bool = False,
        strict: bool = False,
    ) -> dict:
        with self._lock:
            old = self._current(res, namespace, name)
            given = (body.get("metadata") or {}).get("name")
            if given and given != name:
                raise _bad_request(
                    f"the name of the object ({given}) does not match the name on the URL ({name})"
                )
            given_rv = (body.get("metadata") or {}).get("resourceVersion")
            if given_rv and given_rv != old["metadata"]["resourceVersion"]:
                raise _conflict(res, name)
            return self._update(res, old, copy.deepcopy(body), subresource, dry_run, strict)

    def patch(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        patch_type: str,
        patch: Any,
        subresource: str | None = None,
        dry_run: bool = False,
        strict: bool = False,
    ) -> tuple[dict, bool]:
        """Apply a patch; returns the object and whether it was created (server-side apply only)."""
        with self._lock:
            if patch_type == "apply":
                key = (namespace or "", name) if res.namespaced else ("", name)
                if key not in self._objects[res.key] and subresource is None:
                    body = copy.deepcopy(patch)
                    body.setdefault("metadata", {})["name"] = name
                    return self.create(res, namespace, body, dry_run, strict), True
            old = self._current(res, namespace, name)
            if patch_type == "json":
                if not isinstance(patch, list):
                    raise _bad_request("a JSON patch must be a list of operations")
                try:
                    new = jsonpatch.apply_patch(old, patch)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                    raise ApiError(422, "Invalid", f"the server rejected our request: {error}") from error
            elif patch_type == "strategic":
                if res.crd is not None:
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: "
                        "application/json-patch+json, application/merge-patch+json, "
                        "application/apply-patch+yaml",
                    )
                new = strategic_merge_patch(old, patch)
            else:  # merge, and server-side apply of an existing object (a merge, lists replaced)
                if not isinstance(patch, dict):
                    raise _bad_request("a merge patch must be a JSON object")
                new = merge_patch(old, patch)
            patched_rv = (new.get("metadata") or {}).get("resourceVersion")
            if patched_rv and patched_rv != old["metadata"]["resourceVersion"]:
                raise _conflict(res, name)  # a resourceVersion in the patch is a precondition
            return self._update(res, old, new, subresource, dry_run, strict), False

    def delete(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
        dry_run: bool = False,
        preconditions: dict | None = None,
    ) -> dict:
        with self._lock:
            obj = self._current(res, namespace, name)
            for field in ("uid", "resourceVersion"):
                if (preconditions or {}).get(field) not in (None, obj["metadata"].get(field)):
                    raise _conflict(res, name)
            if dry_run:
                return obj
            return copy.deepcopy(self._delete(res, obj, propagation))

    def delete_collection(
        self, res: Resource, namespace: str | None, label_selector: str = "", field_selector: str = ""
    ) -> list[dict]:
        with self._lock:
            items, _ = self.list(res, namespace, label_selector, field_selector)
            return [copy.deepcopy(self._delete(res, obj, "Background")) for obj in items]

    # -- watches -----------------------------------------------------------------------------------

    def open_watch(
        self,
        res: Resource,
        namespace: str | None,
        label_selector: str,
        field_selector: str,
        since: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[Watcher, list[tuple[str, dict]]]:
        """Register a watcher; returns it and the events it must send first (a replay from `since`, or
        ADDED for every current object when no resourceVersion is given)."""
        watcher = Watcher(
            res.key,
            namespace,
            parse_label_selector(label_selector),
            parse_field_selector(field_selector),
            loop,
            asyncio.Queue(),
        )
        with self._lock:
            if since in (None, "", "0"):
                items, _ = self.list(res, namespace, label_selector, field_selector)
                backlog = [("ADDED", obj) for obj in items]
            else:
                try:
                    start = int(since)
                except ValueError as error:
                    raise _bad_request(f"invalid resourceVersion {since!r}") from error
                if self._log and len(self._log) == self._log.maxlen and start < self._log[0][0] - 1:
                    raise ApiError(410, "Expired", f"too old resource version: {start} ({self._log[0][0]})")
                backlog = [
                    (kind, copy.deepcopy(obj))
                    for rv, key, kind, obj in self._log
                    if rv > start and watcher.wants(key, obj)
                ]
            self._watchers.add(watcher)
        return watcher, backlog

    def close_watch(self, watcher: Watcher) -> None:
        with self._lock:
            self._watchers.discard(watcher)

    def end_watches(self) -> None:
        """Close every open watch stream (server shutdown)."""
        with self._lock:
            for watcher in self._watchers:
                watcher.send(None)

    # -- internals ---------------------------------------------------------------------------------

    def _key(self, res: Resource, obj: dict) -> tuple[str, str]:
        return (obj["metadata"].get("namespace", "") if res.namespaced else "", obj["metadata"]["name"])

    def _current(self, res: Resource, namespace: str | None, name: str) -> dict:
        obj = self._objects[res.key].get(((namespace or "") if res.namespaced else "", name))
        if obj is None:
            raise _not_found(res, name)
        return copy.deepcopy(obj)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, res: Resource, kind: str, obj: dict) -> None:
        snapshot = copy.deepcopy(obj)
        self._log.append((self._rv, res.key, kind, snapshot))
        for watcher in self._watchers:
            if watcher.wants(res.key, snapshot):
                watcher.send((kind, snapshot))

    def _admit(
        self, res: Resource, obj: dict, old: dict | None, subresource: str | None, strict: bool = False
    ) -> dict:
        """Default, prune and validate a custom resource (the CRD's schema); built-ins pass as they are."""
        meta = obj["metadata"]
        for field in ("labels", "annotations", "finalizers", "ownerReferences"):
            if field in meta and not meta[field]:
                del meta[field]  # ObjectMeta omits empty fields, so `annotations: {}` is never stored
        name = obj["metadata"].get("name", "")
        if res.key == _CRDS:
            names = (obj.get("spec") or {}).get("names") or {}
            expected = f"{names.get('plural')}.{(obj.get('spec') or {}).get('group')}"
            if name != expected:
                raise _invalid(
                    res,
                    name,
                    [f'metadata.name: Invalid value: "{name}": must be spec.names.plural+"."+spec.group'],
                )
            return obj
        if res.crd is None:
            return obj
        unknown = crdschema.unknown_fields(res.crd, obj) if strict else []
        if unknown:
            version = obj.get("apiVersion", "").rsplit("/", 1)[-1]
            fields = ", ".join(f'unknown field "{path}"' for path in unknown)
            raise _bad_request(
                f'{res.kind} in version "{version}" cannot be handled as a {res.kind}: '
                f"strict decoding error: {fields}"
            )
        stored, messages = crdschema.admit(res.crd, obj, None, old)
        if "status" in res.subresources:
            in_status = [m for m in messages if m.startswith("status")]
            messages = in_status if subresource == "status" else [m for m in messages if m not in in_status]
        if messages:
            raise _invalid(res, name, messages)
        return stored

    def _update(
        self,
        res: Resource,
        old: dict,
        new: dict,
        subresource: str | None,
        dry_run: bool,
        strict: bool = False,
    ) -> dict:
        if subresource not in (None, "status") or (
            subresource == "status" and "status" not in res.subresources
        ):
            raise _unknown_path()
        if subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        else:
            if "status" in res.subresources:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            meta = new.setdefault("metadata", {})
            for field in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp", "generation"):
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
                else:
                    meta.pop(field, None)
            new["kind"] = old["kind"]
            new.setdefault("apiVersion", old["apiVersion"])
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        new = self._admit(res, new, old, subresource, strict)
        if new == old:
            return new  # a no-op write changes nothing, not even the resourceVersion
        if self._spec_part(res, new) != self._spec_part(res, old):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if res.key == _CRDS:
            new["status"] = self._crd_status(new)
        if dry_run:
            return new
        if old["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(res, new, "Background")  # the last finalizer is gone: deletion completes
            return copy.deepcopy(new)
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[res.key][self._key(res, new)] = new
        if res.key == _CRDS:
            self._register_crd(new)
        self._emit(res, "MODIFIED", new)
        return copy.deepcopy(new)

    @staticmethod
    def _spec_part(res: Resource, obj: dict) -> dict:
        """What `generation` counts: everything but metadata, and but status where status is separate
        (a status subresource, or a built-in type)."""
        skip = {"metadata", "apiVersion", "kind"}
        if "status" in res.subresources or res.crd is None:
            skip.add("status")
        return {k: v for k, v in obj.items() if k not in skip}

    def _delete(self, res: Resource, obj: dict, propagation: str) -> dict:
        meta = obj["metadata"]
        if res.key == _NAMESPACES:
            return self._delete_namespace(obj)
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = _now()
                meta["deletionGracePeriodSeconds"] = 0
                meta["resourceVersion"] = self._next_rv()
                self._objects[res.key][self._key(res, obj)] = copy.deepcopy(obj)
                self._emit(res, "MODIFIED", obj)
            return obj
        self._remove(res, obj, propagation)
        return obj

    def _remove(self, res: Resource, obj: dict, propagation: str) -> None:
        """Drop an object for good, then collect what depended on it."""
        self._objects[res.key].pop(self._key(res, obj), None)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(res, "DELETED", obj)
        if res.key == _CRDS:
            self._drop_crd(obj)
        self._collect_garbage(obj["metadata"]["uid"], orphan=propagation == "Orphan")
        namespace = obj["metadata"].get("namespace")
        if namespace:
            self._finish_namespace(namespace)

    def _drop_crd(self, crd: dict) -> None:
        key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
        res = self._resources.pop(key, None)
        if res is None:
            return
        for obj in list(self._objects.pop(key, {}).values()):
            obj["metadata"]["resourceVersion"] = self._next_rv()
            self._emit(res, "DELETED", obj)

    def _all(self) -> Iterator[tuple[Resource, dict]]:
        for key, objects in list(self._objects.items()):
            res = self._resources.get(key)
            if res is not None:
                for obj in list(objects.values()):
                    yield res, obj

    def _collect_garbage(self, owner_uid: str, orphan: bool) -> None:
        """The garbage collector: dependents whose every owner is gone are deleted (in turn honouring
        their finalizers); dependents with other live owners, or orphaned ones, just lose the reference."""
        live = {obj["metadata"]["uid"] for _, obj in self._all()}
        for res, obj in list(self._all()):
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in refs):
                continue
            others = [ref for ref in refs if ref.get("uid") != owner_uid]
            if orphan or any(ref.get("uid") in live for ref in others):
                updated = copy.deepcopy(obj)
                updated["metadata"]["ownerReferences"] = others
                if not others:
                    del updated["metadata"]["ownerReferences"]
                self._update(res, copy.deepcopy(obj), updated, None, False)
            elif (obj["metadata"].get("namespace", ""), obj["metadata"]["name"]) in self._objects[res.key]:
                self._delete(res, copy.deepcopy(obj), "Background")

    def _delete_namespace(self, namespace: dict) -> dict:
        """Namespaces terminate: their objects are deleted, and the namespace goes once none is left."""
        name = namespace["metadata"]["name"]
        if not namespace["metadata"].get("deletionTimestamp"):
            namespace["metadata"]["deletionTimestamp"] = _now()
            namespace["status"] = {"phase": "Terminating"}
            namespace["metadata"]["resourceVersion"] = self._next_rv()
            self._objects[_NAMESPACES][("", name)] = copy.deepcopy(namespace)
            self._emit(self._resources[_NAMESPACES], "MODIFIED", namespace)
        for res, obj in list(self._all()):
            if (
                res.namespaced
                and obj["metadata"].get("namespace") == name
                and self._key(res, obj) in self._objects[res.key]
            ):
                self._delete(res, copy.deepcopy(obj), "Background")
        self._finish_namespace(name)
        return namespace

    def _finish_namespace(self, name: str) -> None:
        namespace = self._objects[_NAMESPACES].get(("", name))
        if namespace is None or not namespace["metadata"].get("deletionTimestamp"):
            return
        if any(res.namespaced and obj["metadata"].get("namespace") == name for res, obj in self._all()):
            return
        del self._objects[_NAMESPACES][("", name)]
        namespace = copy.deepcopy(namespace)
        namespace["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(self._resources[_NAMESPACES], "DELETED", namespace)

    @staticmethod
    def _crd_status(crd: dict) -> dict:
        names = dict(crd["spec"]["names"])
        names.setdefault("singular", names["kind"].lower())
        names.setdefault("listKind", names["kind"] + "List")
        conditions = [
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": _now(),
            }
            for kind, reason, message in (
                ("NamesAccepted", "NoConflicts", "no conflicts found"),
                ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            )
        ]
        stored = [v["name"] for v in crd["spec"]["versions"] if v.get("storage")]
        return {"acceptedNames": names, "conditions": conditions, "storedVersions": stored}


# ---------------------------------------------------------------------------------------------------
# Authentication and RBAC authorization
#
# A request without credentials acts as a cluster admin (as a client certificate in system:masters would):
# the tests' kubectl and helpers. A bearer token issued by the TokenRequest API for a ServiceAccount is that
# ServiceAccount, and what it may do is decided by the RBAC authorizer over the stored Roles, ClusterRoles
# and bindings; any other token is refused 401.


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()


def service_account_user(namespace: str, name: str) -> User:
    """The user a ServiceAccount's token authenticates as, with the groups Kubernetes gives it
    (https://kubernetes.io/docs/reference/access-authn-authz/service-accounts-admin/)."""
    return User(
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
    )


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What the authorizer is asked about a request: the apiserver's RequestInfo."""

    verb: str
    path: str
    resource_request: bool = False
    group: str = ""
    version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def combined_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


_HTTP_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
_NAMESPACE_SUBRESOURCES = ("status", "finalize")


def _query_flag(query: Any, key: str) -> bool:
    """A boolean query parameter as the apiserver decodes it: present and not "0" or "false"."""
    return key in query and query[key] != "0" and query[key].lower() != "false"


def request_attributes(method: str, path: str, query: Any) -> Attributes:
    """(verb, API group, resource, subresource, namespace, name) of a request, following the apiserver's
    RequestInfoFactory (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go; the verbs are those of
    https://kubernetes.io/docs/reference/access-authn-authz/authorization/#determine-the-request-verb).
    Anything but /api/VERSION/... and /apis/GROUP/VERSION/... is a non-resource request whose verb is the
    lower-cased HTTP method."""
    parts = [part for part in path.split("/") if part]
    other = Attributes(verb=method.lower(), path=path)
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return other
    group, rest = "", parts[1:]
    if parts[0] == "apis":
        if len(rest) < 3:
            return other
        group, rest = rest[0], rest[1:]
    version, rest = rest[0], rest[1:]
    if rest[0] in ("watch", "proxy"):
        if len(rest) < 2:
            raise _unknown_path()
        verb, rest = rest[0], rest[1:]
    else:
        verb = _HTTP_VERBS.get(method, "")
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]  # also the namespace of a request on the Namespace object itself
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    subresource = rest[2] if len(rest) >= 3 and verb != "proxy" else ""
    name = rest[1] if len(rest) >= 2 else ""
    if not name and verb == "get":
        verb = "watch" if _query_flag(query, "watch") else "list"
        for field, operator, value in parse_field_selector(query.get("fieldSelector", "")):
            if field == "metadata.name" and operator == "=":
                name = value  # a list or watch of one name is authorized as one of that name
    if not name and verb == "delete":
        verb = "deletecollection"
    return Attributes(verb, path, True, group, version, rest[0], subresource, namespace, name)


def _forbidden(group: str, resource: str, name: str, why: str) -> ApiError:
    """A 403 as apimachinery's NewForbidden words it: `<resource>.<group> "<name>" is forbidden: <why>`."""
    qualified = f"{resource}.{group}" if group else resource
    if not qualified:
        message = f"forbidden: {why}"
    else:
        message = f'{qualified} "{name}" is forbidden: {why}' if name else f"{qualified} is forbidden: {why}"
    details = {key: value for key, value in (("name", name), ("group", group), ("kind", resource)) if value}
    return ApiError(403, "Forbidden", message, details)


def denial(user: User, attrs: Attributes, reason: str = "") -> ApiError:
    """The 403 of a request the authorizer did not allow, worded as the apiserver words it."""
    if attrs.resource_request:
        scope = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
        why = (
            f'User "{user.name}" cannot {attrs.verb} resource "{attrs.combined_resource}" '
            f'in API group "{attrs.group}" {scope}'
        )
    else:
        why = f'User "{user.name}" cannot {attrs.verb} path "{attrs.path}"'
    if reason:
        why += f": {reason}"
    if not attrs.resource_request:
        return _forbidden("", "", "", why)  # "forbidden: User ... cannot get path ..."
    return _forbidden(attrs.group, attrs.resource, attrs.name, why)


def _rule_allows(rule: dict, attrs: Attributes) -> bool:
    """One PolicyRule (k8s.io/kubernetes/pkg/registry/rbac/validation: RuleAllows)."""
    verbs = rule.get("verbs") or []
    if "*" not in verbs and attrs.verb not in verbs:
        return False
    if not attrs.resource_request:
        return any(
            url == "*" or url == attrs.path or (url.endswith("*") and attrs.path.startswith(url[:-1]))
            for url in rule.get("nonResourceURLs") or []
        )
    groups = rule.get("apiGroups") or []
    if "*" not in groups and attrs.group not in groups:
        return False
    resources = rule.get("resources") or []
    if not any(
        resource in ("*", attrs.combined_resource)
        or (attrs.subresource and resource == f"*/{attrs.subresource}")
        for resource in resources
    ):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


def _subject_is(subject: dict, user: User, binding_namespace: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return user.name == name
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return bool(namespace) and user.name == f"system:serviceaccount:{namespace}:{name}"
    return False


class RBAC:
    """The RBAC authorizer (https://kubernetes.io/docs/reference/access-authn-authz/rbac/) over the objects
    of `cluster`: ClusterRoleBindings grant their ClusterRole everywhere, a RoleBinding grants its Role (or a
    ClusterRole) in its own namespace only; rules only add, nothing denies. Not modelled: aggregated
    ClusterRoles, escalation checks on writing roles, impersonation."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def authorize(self, user: User, attrs: Attributes) -> tuple[bool, str]:
        """(allowed, reason): a denial's reason names bindings whose role is missing, as RBAC's does."""
        errors = []
        places = [("clusterrolebindings", None)] + (
            [("rolebindings", attrs.namespace)] if attrs.namespace else []
        )
        for plural, namespace in places:
            for binding in self.cluster.stored((RBAC_GROUP, plural), namespace):
                binding_namespace = binding["metadata"].get("namespace", "")
                if not any(_subject_is(s, user, binding_namespace) for s in binding.get("subjects") or []):
                    continue
                ref = binding.get("roleRef") or {}
                role_plural = "roles" if ref.get("kind") == "Role" else "clusterroles"
                role_namespace = binding_namespace if role_plural == "roles" else ""
                role = self.cluster.stored_one((RBAC_GROUP, role_plural), role_namespace, ref.get("name", ""))
                if role is None:
                    errors.append(
                        f'{role_plural[:-1]}.rbac.authorization.k8s.io "{ref.get("name")}" not found'
                    )
                    continue
                if any(_rule_allows(rule, attrs) for rule in role.get("rules") or []):
                    return True, ""
        if not errors:
            return False, ""
        return False, "RBAC: " + (errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]")


# The default discovery roles every authenticated user has
# (https://kubernetes.io/docs/reference/access-authn-authz/rbac/#default-roles-and-role-bindings).
_PUBLIC_INFO = ["/healthz", "/livez", "/readyz", "/version", "/version/"]
DEFAULT_RBAC = [
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "system:discovery"},
        "rules": [
            {
                "nonResourceURLs": [
                    "/api",
                    "/api/*",
                    "/apis",
                    "/apis/*",
                    "/openapi",
                    "/openapi/*",
                    *_PUBLIC_INFO,
                ],
                "verbs": ["get"],
            }
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "system:public-info-viewer"},
        "rules": [{"nonResourceURLs": _PUBLIC_INFO, "verbs": ["get"]}],
    },
    *(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}
            ],
        }
        for role in ("system:discovery", "system:public-info-viewer")
    ),
]


def _blocking_refs(new: dict, old: dict | None) -> list[dict]:
    """Owner references of `new` that block their owner's deletion and did not in `old`."""
    before = {ref.get("uid"): ref for ref in ((old or {}).get("metadata") or {}).get("ownerReferences") or []}
    return [
        ref
        for ref in (new.get("metadata") or {}).get("ownerReferences") or []
        if ref.get("blockOwnerDeletion") and not before.get(ref.get("uid"), {}).get("blockOwnerDeletion")
    ]


# ---------------------------------------------------------------------------------------------------
# HTTP


_PATCH_TYPES = {
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/json-patch+json": "json",
    "application/apply-patch+yaml": "apply",
    "application/apply-patch+json": "apply",
}


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(), status=status, content_type="application/json"
    )


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _discovery_entry(res: Resource) -> list[dict]:
    verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    entry = {
        "name": res.plural,
        "singularName": res.singular,
        "namespaced": res.namespaced,
        "kind": res.kind,
        "verbs": verbs,
    }
    if res.short_names:
        entry["shortNames"] = res.short_names
    if res.categories:
        entry["categories"] = res.categories
    subs = [
        {
            "name": f"{res.plural}/{sub}",
            "singularName": "",
            "namespaced": res.namespaced,
            "kind": res.kind,
            "verbs": ["get", "patch", "update"],
        }
        for sub in sorted(res.subresources)
    ]
    return [entry, *subs]


USER = web.RequestKey("user", object)  # the authenticated User of a request; None: no credentials


class Handlers:
    """aiohttp handlers: parse the URL, call the cluster, answer JSON (or a Table, or a watch stream)."""

    def __init__(self, cluster: Cluster, log_requests: bool = False) -> None:
        self.cluster = cluster
        self.address = "127.0.0.1"
        self.log_requests = log_requests
        self.rbac = RBAC(cluster)
        # (user, verb, group, resource[/subresource] or path, namespace, allowed) -> times asked
        self.decisions: Counter[tuple[str, str, str, str, str, bool]] = Counter()
        self._decisions_lock = threading.Lock()

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            # The filters before any handler, in the apiserver's order: authentication, then authorization.
            request[USER] = user = self._authenticate(request)
            if user is not None:
                self.check(user, request_attributes(request.method, request.path, request.query))
            response = await self._route(request)
        except ApiError as error:
            response = _json(error.body(), error.code)
        except Exception as error:  # a bug here: answer a Status that names it rather than a bare 500
            logging.getLogger(__name__).exception(
                "fake apiserver failed on %s %s", request.method, request.path_qs
            )
            response = _json(ApiError(500, "InternalError", f"fake apiserver bug: {error!r}").body(), 500)
        if self.log_requests:
            print(f"{request.method} {request.path_qs} -> {response.status}", flush=True)
        return response

    # -- authentication, authorization, admission --------------------------------------------------

    def _authenticate(self, request: web.Request) -> User | None:
        """None for a request without credentials (full access); the token's ServiceAccount; 401 for a
        token that is not (or no longer) valid."""
        header = request.headers.get("Authorization", "")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.cluster.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return user

    def check(self, user: User, attrs: Attributes, denied: Any = None) -> None:
        """Ask the authorizer; raise `denied(reason)` (by default the authorizer's 403) unless allowed."""
        allowed, reason = self.rbac.authorize(user, attrs)
        what = attrs.combined_resource if attrs.resource_request else attrs.path
        key = (user.name, attrs.verb, attrs.group, what, attrs.namespace, allowed)
        with self._decisions_lock:
            self.decisions[key] += 1
        if not allowed:
            raise denied(reason) if denied else denial(user, attrs, reason)

    def _admit_owners(
        self, user: User | None, res: Resource, namespace: str | None, old: dict | None, new: dict
    ) -> None:
        """The OwnerReferencesPermissionEnforcement admission plugin
        (https://kubernetes.io/docs/reference/access-authn-authz/admission-controllers/#ownerreferencespermissionenforcement):
        changing an object's ownerReferences needs `delete` on it (a new object may set them), and an owner
        reference with blockOwnerDeletion needs `update` on the owner's finalizers subresource."""
        refs_before = ((old or {}).get("metadata") or {}).get("ownerReferences") or []
        refs = (new.get("metadata") or {}).get("ownerReferences") or []
        if user is None or refs == refs_before:
            return
        name, namespace = (new.get("metadata") or {}).get("name", ""), namespace or ""
        version = (new.get("apiVersion") or res.api_version()).rpartition("/")[2]

        def refused(message: str) -> Any:
            return lambda reason: _forbidden(res.group, res.plural, name, f"{message}: {reason}, <nil>")

        if old is not None:
            attrs = Attributes(
                "delete", "", True, res.group, version, res.plural, namespace=namespace, name=name
            )
            self.check(user, attrs, refused("cannot set an ownerRef on a resource you can't delete"))
        for ref in _blocking_refs(new, old):
            group, _, ref_version = (ref.get("apiVersion") or "").rpartition("/")
            owner = next(
                (
                    r
                    for r in self.cluster.resources()
                    if r.kind == ref.get("kind") and r.group == group and ref_version in r.versions
                ),
                None,
            )
            if owner is None:
                missing = f'no matches for kind "{ref.get("kind")}" in version "{ref.get("apiVersion")}"'
                raise _forbidden(
                    res.group,
                    res.plural,
                    name,
                    "cannot set blockOwnerDeletion in this case because cannot find RESTMapping for "
                    f"APIVersion {ref.get('apiVersion')} Kind {ref.get('kind')}: {missing}",
                )
            attrs = Attributes(
                "update",
                "",
                True,
                group,
                ref_version,
                owner.plural,
                "finalizers",
                namespace,
                ref.get("name", ""),
            )
            message = (
                "cannot set blockOwnerDeletion if an ownerReference refers to a resource you can't set "
                "finalizers on"
            )
            self.check(user, attrs, refused(message))

    # -- discovery ---------------------------------------------------------------------------------

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = {}
        for res in self.cluster.resources():
            groups.setdefault(res.group, set()).update(res.versions)
        return {g: sorted(v, key=_version_priority) for g, v in groups.items()}

    def _group(self, name: str, versions: list[str]) -> dict:
        listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
        return {"name": name, "versions": listed, "preferredVersion": listed[0]}

    def _resource_list(self, group: str, version: str) -> dict:
        resources = [
            entry
            for res in sorted(self.cluster.resources(), key=lambda r: r.plural)
            if res.group == group and version in res.versions
            for entry in _discovery_entry(res)
        ]
        if not resources:
            raise _unknown_path()
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def _openapi(self, gv_path: str) -> dict:
        """An OpenAPI v3 document for one group/version, reduced to what kubectl 1.32 reads: PATCH operations
        tagged with their kind that accept `fieldValidation`, so `kubectl apply` (without --validate=false)
        leaves validation to the server instead of fetching schemas."""
        parts = gv_path.split("/")
        group, version = ("", parts[1]) if parts[0] == "api" and len(parts) == 2 else (parts[1], parts[-1])
        if parts[0] == "apis" and len(parts) != 3:
            raise _unknown_path()
        paths = {}
        for res in self.cluster.resources():
            if res.group != group or version not in res.versions:
                continue
            base = (
                f"/{gv_path}/namespaces/{{namespace}}/{res.plural}"
                if res.namespaced
                else f"/{gv_path}/{res.plural}"
            )
            gvk = {"group": group, "version": version, "kind": res.kind}
            parameters = [
                {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                for name in ("dryRun", "fieldManager", "fieldValidation", "force")
            ]
            paths[base + "/{name}"] = {
                "patch": {
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": parameters,
                    "responses": {"200": {"description": "OK"}},
                }
            }
        if not paths:
            raise _unknown_path()
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": KUBE_VERSION["gitVersion"]},
            "paths": paths,
            "components": {"schemas": {}},
        }

    # -- routing -----------------------------------------------------------------------------------

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.path.strip("/")
        if path == "/version":
            return _json(KUBE_VERSION)
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        if path == "/openapi/v3":
            paths = {
                _gv_path(g, v): {"serverRelativeURL": f"/openapi/v3/{_gv_path(g, v)}"}
                for g, versions in self._groups().items()
                for v in versions
            }
            return _json({"paths": paths})
        if path.startswith("/openapi/v3/"):
            return _json(self._openapi(path.removeprefix("/openapi/v3/")))
        if path == "/api":
            return _json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": self.address}
                    ],
                }
            )
        if path == "/apis":
            groups = [self._group(g, v) for g, v in sorted(self._groups().items()) if g]
            return _json({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 2:
            if len(parts) == 2:
                versions = self._groups().get(parts[1])
                if not versions:
                    raise _unknown_path()
                return _json({"kind": "APIGroup", "apiVersion": "v1", **self._group(parts[1], versions)})
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _unknown_path()
        if not rest:
            return _json(self._resource_list(group, version))
        watch = _query_flag(request.query, "watch")
        if rest[0] == "watch":  # the deprecated /watch/ prefix
            watch, rest = True, rest[1:]
        namespace = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (group == "" and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise _unknown_path()
        plural, name, sub = [*rest, None, None][:3]
        res = self.cluster.resource(group, version, plural)
        if namespace is not None and not res.namespaced:
            raise _unknown_path()
        if res.namespaced and name is not None and namespace is None:
            raise _unknown_path()
        return await self._serve(request, res, version, namespace, name, sub, watch)

    async def _body(self, request: web.Request) -> Any:
        content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if "protobuf" in content_type or "cbor" in content_type:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f'application/json, application/yaml (got "{content_type}")',
            )
        raw = await request.read()
        if not raw:
            return {}
        try:
            if content_type.endswith("yaml"):
                return yaml.load(raw, Loader=_YAML_LOADER)
            return json.loads(raw)
        except ValueError as error:
            raise _bad_request(f"the request body is not valid JSON or YAML: {error}") from error

    async def _serve(
        self,
        request: web.Request,
        res: Resource,
        version: str,
        namespace: str | None,
        name: str | None,
        sub: str | None,
        watch: bool,
    ) -> web.StreamResponse:
        query, method = request.query, request.method
        dry_run = "All" in query.getall("dryRun", [])
        strict = query.get("fieldValidation") == "Strict"
        wants_table = "as=Table" in request.headers.get("Accept", "")
        if method == "GET" and watch:
            selector = query.get("fieldSelector", "")
            if name is not None:
                selector = ",".join(filter(None, [selector, f"metadata.name={name}"]))
            return await self._watch(request, res, version, namespace, selector, wants_table)
        if method == "GET" and name is None:
            items, rv = self.cluster.list(
                res, namespace, query.get("labelSelector", ""), query.get("fieldSelector", "")
            )
            items = [self._out(res, version, obj) for obj in items]
            if wants_table:
                return _json(self._table(res, version, items, rv, query.get("includeObject", "Metadata")))
            return _json(
                {
                    "kind": f"{res.kind}List",
                    "apiVersion": res.api_version(version),
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                }
            )
        if method == "GET":
            if sub not in (None, *res.subresources):
                raise _unknown_path()
            obj = self._out(res, version, self.cluster.get(res, namespace, name))
            if wants_table:
                rv = obj["metadata"]["resourceVersion"]
                return _json(self._table(res, version, [obj], rv, query.get("includeObject", "Metadata")))
            return _json(obj)
        user = request.get(USER)
        if method == "POST" and res.key == ("", "serviceaccounts") and name is not None and sub == "token":
            return _json(self._token_request(namespace or "", name), 201)
        if method == "POST" and name is None:
            body = await self._body(request)
            self._check_kind(res, body)
            self._admit_owners(user, res, namespace, None, body)
            obj = self.cluster.create(res, namespace, body, dry_run, strict)
            return _json(self._out(res, version, obj), 201)
        if method == "PUT" and name is not None:
            body = await self._body(request)
            self._check_kind(res, body)
            if user is not None:
                new = self.cluster.replace(res, namespace, name, body, sub, True, strict)
                self._admit_owners(user, res, namespace, self.cluster.get(res, namespace, name), new)
            return _json(
                self._out(
                    res, version, self.cluster.replace(res, namespace, name, body, sub, dry_run, strict)
                )
            )
        if method == "PATCH" and name is not None:
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            patch_type = _PATCH_TYPES.get(content_type)
            if patch_type is None:
                raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
            body = await self._body(request)
            if user is not None:  # admission sees the patched object: patch without storing, first
                new, created = self.cluster.patch(res, namespace, name, patch_type, body, sub, True, strict)
                old = None if created else self.cluster.get(res, namespace, name)
                self._admit_owners(user, res, namespace, old, new)
            obj, created = self.cluster.patch(res, namespace, name, patch_type, body, sub, dry_run, strict)
            return _json(self._out(res, version, obj), 201 if created else 200)
        if method == "DELETE":
            body = await self._body(request)
            policy = body.get("propagationPolicy") or query.get("propagationPolicy") or "Background"
            if body.get("orphanDependents") is True:
                policy = "Orphan"
            if name is None:
                deleted = self.cluster.delete_collection(
                    res, namespace, query.get("labelSelector", ""), query.get("fieldSelector", "")
                )
                items = [self._out(res, version, obj) for obj in deleted]
                return _json(
                    {
                        "kind": f"{res.kind}List",
                        "apiVersion": res.api_version(version),
                        "metadata": {},
                        "items": items,
                    }
                )
            obj = self.cluster.delete(res, namespace, name, policy, dry_run, body.get("preconditions"))
            return _json(self._out(res, version, obj))
        raise ApiError(
            405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
        )

    def _token_request(self, namespace: str, name: str) -> dict:
        """The TokenRequest API, what `kubectl create token` calls
        (https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/token-request-v1/)."""
        token = self.cluster.issue_token(namespace, name)
        expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None},
            "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600},
            "status": {"token": token, "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
        }

    @staticmethod
    def _check_kind(res: Resource, body: Any) -> None:
        if not isinstance(body, dict):
            raise _bad_request("the request body must be a JSON object")
        if body.get("kind") not in (None, res.kind):
            raise _bad_request(f"the kind of the object ({body['kind']}) does not match the URL ({res.kind})")

    @staticmethod
    def _out(res: Resource, version: str, obj: dict) -> dict:
        """Objects are stored once and served in any version (no conversion: the schemas must agree)."""
        obj["apiVersion"] = res.api_version(version)
        obj["kind"] = res.kind
        return obj

    # -- tables ------------------------------------------------------------------------------------

    def _table(
        self, res: Resource, version: str, objs: list[dict], rv: str, include: str, headers: bool = True
    ) -> dict:
        """A `meta.k8s.io/v1 Table` as the apiserver builds it from printer columns: Name first, dates
        humanised, missing values null (kubectl prints them blank)."""
        columns = res.printer_columns(version)
        definitions = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "description": "Name of the object",
                "priority": 0,
            }
        ] + [
            {
                "name": column["name"],
                "type": column.get("type", "string"),
                "format": column.get("format", ""),
                "description": column.get(
                    "description", f"Custom resource definition column: {column['jsonPath']}"
                ),
                "priority": column.get("priority", 0),
            }
            for column in columns
        ]
        rows = []
        for obj in objs:
            cells: list[Any] = [obj["metadata"]["name"]]
            for column in columns:
                try:
                    found = jsonpath(obj, column["jsonPath"])
                except ValueError:
                    found = []
                cells.append(_cell(column.get("type", "string"), found[0] if found else None))
            row: dict[str, Any] = {"cells": cells}
            if include == "Object":
                row["object"] = obj
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                }
            rows.append(row)
        table = {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": rv},
            "rows": rows,
        }
        if headers:
            table["columnDefinitions"] = definitions
        return table

    # -- watches -----------------------------------------------------------------------------------

    async def _watch(
        self,
        request: web.Request,
        res: Resource,
        version: str,
        namespace: str | None,
        fields: str,
        table: bool,
    ) -> web.StreamResponse:
        query = request.query
        loop = asyncio.get_running_loop()
        watcher, backlog = self.cluster.open_watch(
            res, namespace, query.get("labelSelector", ""), fields, query.get("resourceVersion"), loop
        )
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        deadline = loop.time() + timeout if timeout else None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        first = True

        async def send(kind: str, obj: dict) -> None:
            nonlocal first
            obj = self._out(res, version, copy.deepcopy(obj))
            if table:
                rv = obj["metadata"]["resourceVersion"]
                obj = self._table(
                    res, version, [obj], rv, query.get("includeObject", "Metadata"), headers=first
                )
            first = False
            await response.write(
                json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"
            )

        try:
            await response.prepare(request)
            for kind, obj in backlog:
                await send(kind, obj)
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                if event is None:
                    break
                await send(*event)
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            self.cluster.close_watch(watcher)
        return response


def _cell(kind: str, value: Any) -> Any:
    """A table cell typed by its column, as apiextensions' table convertor makes it."""
    if value is None:
        return None
    if kind == "date":
        return _age(value)
    if kind == "integer":
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    if kind == "number":
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return crdschema.render_value(value)
    return json.dumps(value, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------------
# Running it


class FakeApiServer:
    """The fake apiserver on 127.0.0.1, served from a background thread with its own event loop."""

    def __init__(self, port: int = 0, log_requests: bool = False) -> None:
        self.cluster = Cluster()
        self._port = port
        self._handlers = Handlers(self.cluster, log_requests)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeApiServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self.port = sock.getsockname()[1]
        self._handlers.address = f"127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application(client_max_size=64 * 2**20)
            app.router.add_route("*", "/{tail:.*}", self._handlers.dispatch)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-apiserver", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the fake apiserver did not start within 30 s")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self.cluster.end_watches()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- conveniences for tests --------------------------------------------------------------------

    def write_kubeconfig(
        self, path: str | Path, namespace: str = "default", token: str | None = None
    ) -> Path:
        """A kubeconfig whose current context is this server (plain HTTP); without a `token`, no credentials
        (full access), with one, that token's ServiceAccount (under RBAC) for the python client and kopf.
        kubectl sends no credentials over plain HTTP (client-go reads them for TLS only): it stays admin."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": token} if token else {}}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
            ],
            "current-context": "fake",
            "preferences": {},
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def token(self, namespace: str, service_account: str) -> str:
        """A bearer token for an existing ServiceAccount (what `kubectl create token` asks for)."""
        return self.cluster.issue_token(namespace, service_account)

    def decisions(self, user: str) -> dict[tuple[str, str, str, str], tuple[int, int]]:
        """What the authorizer was asked for `user` (a name such as system:serviceaccount:NS:SA), by
        (verb, API group, resource[/subresource] or the path of a non-resource request, namespace): (times
        allowed, times denied)."""
        with self._handlers._decisions_lock:
            asked = list(self._handlers.decisions.items())
        out: dict[tuple[str, str, str, str], tuple[int, int]] = {}
        for (name, verb, group, resource, namespace, allowed), count in asked:
            if name == user:
                yes, no = out.get((verb, group, resource, namespace), (0, 0))
                out[(verb, group, resource, namespace)] = (yes + count, no) if allowed else (yes, no + count)
        return out

    def apply(self, obj: dict) -> dict:
        """Create `obj`, or replace the object of that name (a CRD becomes served at once)."""
        group, _, _ = obj["apiVersion"].rpartition("/")
        res = self.cluster.find(obj["kind"], group)
        namespace = obj.get("metadata", {}).get("namespace") if res.namespaced else None
        try:
            return self.cluster.create(res, namespace, obj)
        except ApiError as error:
            if error.reason != "AlreadyExists":
                raise
            return self.cluster.replace(res, namespace, obj["metadata"]["name"], obj)

    def load_crd(self, path: str | Path) -> list[dict]:
        """Apply every CRD in a YAML file."""
        documents = [d for d in yaml.load_all(Path(path).read_text(), Loader=_YAML_LOADER) if d]
        return [self.apply(d) for d in documents]

    def objects(self, resource: str, namespace: str | None = None, group: str | None = None) -> list[dict]:
        """Stored objects of one type (by plural, singular, kind or short name), for inspection."""
        return self.cluster.list(self.cluster.find(resource, group), namespace)[0]

    def get(self, resource: str, name: str, namespace: str | None = None, group: str | None = None) -> dict:
        return self.cluster.get(self.cluster.find(resource, group), namespace, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake Kubernetes API server in the foreground.")
    parser.add_argument("--port", type=int, default=8001, help="port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument("--crd", action="append", default=[], help="a CRD YAML file to serve (repeatable)")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for this server to this path")
    parser.add_argument("--log-requests", action="store_true", help="print every request and its status")
    args = parser.parse_args(argv)
    server = FakeApiServer(args.port, args.log_requests).start()
    try:
        for path in args.crd:
            server.load_crd(path)
        if args.kubeconfig:
            server.write_kubeconfig(args.kubeconfig)
        print(f"fake apiserver at {server.url} (Ctrl-C stops it)", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
