"""The few API calls the operator makes, through the official Kubernetes client."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ttt_operator.builders import GROUP, LABEL_JOB, PLURAL, VERSION

TIMEOUT_S = 30
# kind → (group, version, plural) of the custom resources the operator reads or writes.
CUSTOM = {
    "TTTJob": (GROUP, VERSION, PLURAL),
    "TTTSweep": (GROUP, VERSION, "tttsweeps"),
    "RayJob": ("ray.io", "v1", "rayjobs"),
    "RayCluster": ("ray.io", "v1", "rayclusters"),
}
PODS_READ = 16  # a starting attempt's pods read to tell why it is stuck (the head and a few workers say it)


def load_credentials() -> None:
    """In a pod: its service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class KubeRayMissing(Exception):
    """The API server does not serve ray.io/v1 RayJobs."""


class NameTaken(Exception):
    """An object of the name to create exists but has another owner (say, the children of a deleted TTTJob
    of the same name, not yet garbage-collected): not ours to adopt."""


def owned_by(objects: list[dict[str, Any]], uid: str) -> list[dict[str, Any]]:
    """The objects with an owner reference to `uid`: labels name the owner, only the UID tells a re-created
    owner of the same name from the one before it."""
    return [
        o for o in objects if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])
    ]


class Cluster:
    def __init__(self, api: client.ApiClient | None = None):
        self.api = api or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        group, version, plural = CUSTOM[kind]
        try:
            return self.custom.get_namespaced_custom_object(
                group, version, namespace, plural, name, _request_timeout=TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        group, version, plural = CUSTOM[kind]
        found = self.custom.list_namespaced_custom_object(
            group, version, namespace, plural, label_selector=selector, _request_timeout=TIMEOUT_S
        )
        return found.get("items", [])

    def rayjobs(self, namespace: str, job: str, uid: str) -> list[dict[str, Any]]:
        """The RayJobs of TTTJob `job` whose owner is the one of `uid`."""
        try:
            return owned_by(self.list("RayJob", namespace, f"{LABEL_JOB}={job}"), uid)
        except ApiException as exc:
            if exc.status == 404:
                raise KubeRayMissing(
                    "the API server does not serve ray.io/v1 RayJobs: install KubeRay"
                ) from None
            raise

    def pods(self, namespace: str, ray_cluster: str) -> list[dict[str, Any]]:
        """The pods of a RayCluster (KubeRay labels each with ray.io/cluster), read-only."""
        found = self.core.list_namespaced_pod(
            namespace,
            label_selector=f"ray.io/cluster={ray_cluster}",
            limit=PODS_READ,
            _request_timeout=TIMEOUT_S,
            _preload_content=False,  # the JSON as served: no client-side model to refuse a partial status
        )
        return json.loads(found.data).get("items") or []

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The core/v1 Events about the object `name` in `namespace` (any kind), read-only."""
        found = self.core.list_namespaced_event(
            namespace,
            field_selector=f"involvedObject.name={name}",
            _request_timeout=TIMEOUT_S,
            _preload_content=False,
        )
        return json.loads(found.data).get("items") or []

    def create(self, body: dict[str, Any]) -> bool:
        """Create a ConfigMap or custom resource; False if it already exists with the same owner (an earlier
        pass made it); NameTaken if it exists with another."""
        namespace = body["metadata"]["namespace"]
        try:
            if body["kind"] == "ConfigMap":
                self.core.create_namespaced_config_map(namespace, body, _request_timeout=TIMEOUT_S)
            else:
                group, version, plural = CUSTOM[body["kind"]]
                self.custom.create_namespaced_custom_object(
                    group, version, namespace, plural, body, _request_timeout=TIMEOUT_S
                )
        except ApiException as exc:
            if exc.status != 409:
                raise
            self._check_owner(body)
            return False
        return True

    def _check_owner(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        owners = meta.get("ownerReferences") or []
        if not owners:
            return
        if body["kind"] == "ConfigMap":
            try:
                found = self.api.sanitize_for_serialization(
                    self.core.read_namespaced_config_map(
                        meta["name"], meta["namespace"], _request_timeout=TIMEOUT_S
                    )
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
                found = None
        else:
            found = self.get(body["kind"], meta["namespace"], meta["name"])
        if found is None or not owned_by([found], owners[0]["uid"]):
            kind = owners[0]["kind"]
            raise NameTaken(
                f"{body['kind']} {meta['name']} exists and is not this {kind}'s (one of a deleted {kind} of "
                "the same name?): waiting for it to go"
            )

    def delete(self, kind: str, namespace: str, name: str) -> None:
        group, version, plural = CUSTOM[kind]
        try:
            self.custom.delete_namespaced_custom_object(
                group,
                version,
                namespace,
                plural,
                name,
                propagation_policy="Background",
                _request_timeout=TIMEOUT_S,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def post_event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A v1 Event on `body` (as kopf.event would post it, but from any thread: the poll's too)."""
        meta = body["metadata"]
        now = datetime.now(timezone.utc).isoformat()
        event = {
            "metadata": {"namespace": meta["namespace"], "generateName": "ttt-event-"},
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "reportingComponent": "ttt-operator",
            "source": {"component": "ttt-operator"},  # the From column of `kubectl describe`
            "involvedObject": {
                "apiVersion": body["apiVersion"],
                "kind": body["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.core.create_namespaced_event(meta["namespace"], event, _request_timeout=TIMEOUT_S)

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        group, version, plural = CUSTOM[kind]
        self.custom.patch_namespaced_custom_object_status(
            group,
            version,
            namespace,
            plural,
            name,
            {"status": status},
            _content_type="application/merge-patch+json",
            _request_timeout=TIMEOUT_S,
        )
