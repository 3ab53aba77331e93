"""Fixtures for Kubernetes tests: one fake apiserver per session, real kubectl pointed at it, and a fresh
namespace per test (deleted afterwards, so its objects go too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kube.apiserver import FakeApiServer

KUBECTL_TIMEOUT_S = 60  # per kubectl call: the fake answers in milliseconds, so this only stops hangs


@pytest.fixture(scope="session")
def apiserver() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture(scope="session")
def kubeconfig(apiserver: FakeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return apiserver.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(scope="session")
def kubectl_env(kubeconfig: Path) -> dict[str, str]:
    """Environment for child processes (kubectl, kopf) that talk to the fake: its kubeconfig, and a
    discovery cache of its own rather than the user's ~/.kube/cache."""
    env = dict(os.environ)
    env["KUBECONFIG"] = str(kubeconfig)
    env["KUBECACHEDIR"] = str(kubeconfig.parent / "cache")
    return env


KubectlRunner = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def kubectl(kubectl_env: dict[str, str]) -> KubectlRunner:
    """`kubectl(*args, input=None, check=True)` runs the real kubectl against the fake apiserver."""
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not on PATH")

    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        command = [binary, "--request-timeout=20s", *args]
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, env=kubectl_env, timeout=KUBECTL_TIMEOUT_S
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    return run


@pytest.fixture()
def namespace(apiserver: FakeApiServer) -> Iterator[str]:
    """A namespace of its own for one test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    apiserver.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    res = apiserver.cluster.find("namespaces")
    if any(ns["metadata"]["name"] == name for ns in apiserver.objects("namespaces")):
        apiserver.cluster.delete(res, None, name)


@pytest.fixture(scope="session")
def kube_client(kubeconfig: Path) -> Iterator[object]:
    """A `kubernetes.client.ApiClient` for the fake apiserver."""
    kubernetes = pytest.importorskip("kubernetes")
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig), persist_config=False)
    yield client
    client.close()
