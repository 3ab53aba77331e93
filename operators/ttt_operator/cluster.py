"""The few API calls the operator makes, through the official Kubernetes client."""

from __future__ import annotations

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
}


def load_credentials() -> None:
    """In a pod: its service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class KubeRayMissing(Exception):
    """The API server does not serve ray.io/v1 RayJobs."""


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

    def rayjobs(self, namespace: str, job: str) -> list[dict[str, Any]]:
        try:
            return self.list("RayJob", namespace, f"{LABEL_JOB}={job}")
        except ApiException as exc:
            if exc.status == 404:
                raise KubeRayMissing(
                    "the API server does not serve ray.io/v1 RayJobs: install KubeRay"
                ) from None
            raise

    def create(self, body: dict[str, Any]) -> bool:
        """Create a ConfigMap or custom resource; False if it already exists (an earlier pass made it)."""
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
            if exc.status == 409:
                return False
            raise
        return True

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
