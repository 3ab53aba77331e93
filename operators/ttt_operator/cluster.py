"""The few API calls the operator makes, through the official Kubernetes client."""

from __future__ import annotations

from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ttt_operator.builders import GROUP, LABEL_JOB, PLURAL, VERSION

TIMEOUT_S = 30


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

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def rayjobs(self, namespace: str, job: str) -> list[dict[str, Any]]:
        try:
            found = self._list_rayjobs(namespace, job)
        except ApiException as exc:
            if exc.status == 404:
                raise KubeRayMissing(
                    "the API server does not serve ray.io/v1 RayJobs: install KubeRay"
                ) from None
            raise
        return found.get("items", [])

    def _list_rayjobs(self, namespace: str, job: str) -> dict[str, Any]:
        return self.custom.list_namespaced_custom_object(
            "ray.io",
            "v1",
            namespace,
            "rayjobs",
            label_selector=f"{LABEL_JOB}={job}",
            _request_timeout=TIMEOUT_S,
        )

    def create(self, body: dict[str, Any]) -> bool:
        """Create a ConfigMap or RayJob; False if it already exists (an earlier pass made it)."""
        namespace = body["metadata"]["namespace"]
        try:
            if body["kind"] == "ConfigMap":
                self.core.create_namespaced_config_map(namespace, body, _request_timeout=TIMEOUT_S)
            else:
                group, version = body["apiVersion"].split("/")
                self.custom.create_namespaced_custom_object(
                    group, version, namespace, "rayjobs", body, _request_timeout=TIMEOUT_S
                )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete_rayjob(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                "ray.io",
                "v1",
                namespace,
                "rayjobs",
                name,
                propagation_policy="Background",
                _request_timeout=TIMEOUT_S,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            _content_type="application/merge-patch+json",
            _request_timeout=TIMEOUT_S,
        )
