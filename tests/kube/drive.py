"""Driving the operator end to end: a real `python -m ttt_operator` process, real kubectl against the local
API server, and the few moves of KubeRay's part (patching a RayJob's status). Shared by the operator's tests
and its restart drill.

The operator runs as the chart's ServiceAccount, under the RBAC the chart renders for the namespaces it
watches (see `Operator`): a call the chart does not grant fails the tests as it would fail in a cluster.
The tests' own kubectl has full access."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import DATA, ROOT
from tests.integration.services import free_port, stop, wait_for

CHART = ROOT / "charts" / "ttt-platform"
CRD = CHART / "crds" / "tttjobs.ttt.dev.yaml"
SWEEP_CRD = CHART / "crds" / "tttsweeps.ttt.dev.yaml"
MULTI_NAMESPACE_VALUES = CHART / "ci" / "external-values.yaml"  # S3 runs: any namespace may be watched
RAYJOB_CRD = DATA / "kuberay" / "ray.io_rayjobs.yaml"
TINY = ROOT / "jobs" / "examples" / "tiny-cpu.yaml"
IMAGE = "ttt-platform/ttt:e2e"
# The release as the chart's README installs it (`helm install ttt charts/ttt-platform -n ttt`).
RELEASE = RELEASE_NAMESPACE = "ttt"
OPERATOR_ACCOUNT = f"{RELEASE}-ttt-platform-operator"
OPERATOR_USER = f"system:serviceaccount:{RELEASE_NAMESPACE}:{OPERATOR_ACCOUNT}"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")

Kubectl = Callable[..., Any]


def eventually(probe: Callable[[], Any], what: str, seconds: float = 30.0) -> Any:
    """Poll until `probe()` is truthy (the operator reacts asynchronously)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def prepare(
    server: Any, base: Path, namespaces: list[str], crds: tuple[Path, ...] = (CRD, RAYJOB_CRD)
) -> Path:
    """The API server with `crds` and `namespaces` installed; returns a kubeconfig for the first namespace."""
    for crd in crds:
        server.load_crd(crd)
    for name in namespaces:
        server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return server.write_kubeconfig(base / "kubeconfig", namespace=namespaces[0])


def operator_env(kubeconfig: Path, namespace: str, runs: Path, **extra: str) -> dict[str, str]:
    """The environment the chart gives the operator, pointed at the test API server and `namespace`."""
    return {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "TTT_OPERATOR_NAMESPACES": namespace,
        "TTT_STORAGE_URI": str(runs),
        "TTT_DEFAULT_IMAGE": IMAGE,
        "TTT_POLL_SECONDS": "1",
        # A failed attempt's retry waits 1 s, 2 s, 4 s (the chart's default is 10 s, 20 s, ... up to 360 s).
        "TTT_RETRY_BACKOFF_SECONDS": "1",
        "TTT_RETRY_BACKOFF_CAP_SECONDS": "4",
        **extra,
    }


@functools.cache
def chart_rbac(namespaces: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    """The operator's ServiceAccount, ClusterRoles, Roles and bindings as `helm template` renders them: with
    the default values (cluster-wide) for no `namespaces`, else with the chart's multi-namespace CI values
    watching `namespaces` (a Role and RoleBinding in each)."""
    helm = Path(sys.executable).parent / "helm"
    if not helm.is_file():
        raise RuntimeError(f"no helm next to {sys.executable}: run `make install` (infra/install-helm.sh)")
    args = [str(helm), "template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE]
    if namespaces:
        watched = "{" + ",".join(namespaces) + "}"
        args += ["-f", str(MULTI_NAMESPACE_VALUES), "--set", f"operator.watchNamespaces={watched}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode:
        raise RuntimeError(f"helm template failed:\n{proc.stderr}")
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] in RBAC_KINDS]
    accounts = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    assert accounts == [OPERATOR_ACCOUNT], f"the chart renders ServiceAccounts {accounts}"
    return tuple(docs)


def as_operator(kubeconfig: Path, namespaces: tuple[str, ...] = ()) -> Path:
    """Install the chart's RBAC for an operator watching `namespaces` (all when empty) with `kubeconfig`
    (full access), as `helm install` would, and return a kubeconfig beside it that authenticates as the
    chart's ServiceAccount (a token from the TokenRequest API, as a pod's projected token would be)."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NAMESPACE}}
    admin = kubectl(kubeconfig)
    objects = yaml.safe_dump_all([namespace, *chart_rbac(namespaces)])
    admin("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=objects)
    token = admin("create", "token", OPERATOR_ACCOUNT, "-n", RELEASE_NAMESPACE).strip()
    config = yaml.safe_load(kubeconfig.read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    for user in config["users"]:
        if user["name"] == context["context"]["user"]:
            user["user"] = {"token": token}
    path = kubeconfig.with_name(kubeconfig.name + "-operator")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Operator:
    """`python -m ttt_operator` as the Deployment runs it, configured through its environment, and by
    default with the chart's identity: its first start installs the chart's RBAC for the namespaces of
    TTT_OPERATOR_NAMESPACES with env's KUBECONFIG (an admin's) and gives the operator a kubeconfig of the
    chart's ServiceAccount instead (`as_operator`). `admin=True` runs it with env's KUBECONFIG as it is."""

    def __init__(self, env: dict[str, str], log: Path, admin: bool = False):
        self.env, self.log, self.proc, self.admin = env, log, None, admin
        self._run_env: dict[str, str] | None = None

    def run_env(self) -> dict[str, str]:
        """The environment the process gets: env, with the operator's kubeconfig unless `admin`."""
        if self._run_env is None:
            self._run_env = dict(self.env)
            if not self.admin:
                watched = self.env.get("TTT_OPERATOR_NAMESPACES", "").split(",")
                namespaces = tuple(n.strip() for n in watched if n.strip())
                self._run_env["KUBECONFIG"] = str(as_operator(Path(self.env["KUBECONFIG"]), namespaces))
        return self._run_env

    def start(self) -> None:
        port = free_port()
        env = self.run_env()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ttt_operator", "--liveness", f"http://127.0.0.1:{port}/healthz"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(f"http://127.0.0.1:{port}/healthz", self.proc, seconds=60)
        except RuntimeError:
            raise RuntimeError(f"operator did not start:\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a node loss or the OOM killer ends it: no cleanup, no last write."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=15)
            self.proc = None


def kubectl(kubeconfig: Path) -> Kubectl:
    """kubectl against `kubeconfig`; returns stdout, or parsed JSON for `-o json`."""

    def run(*args: str, stdin: str | None = None, check: bool = True) -> Any:
        proc = subprocess.run(
            ["kubectl", "--request-timeout=20s", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            timeout=60,
        )
        if check and proc.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        if "-o" in args and args[args.index("-o") + 1] == "json" and proc.returncode == 0:
            return json.loads(proc.stdout)
        return proc if not check else proc.stdout

    return run


def tttjob(name: str, **spec: Any) -> str:
    job = yaml.safe_load(TINY.read_text())
    job["metadata"]["name"] = name
    job["spec"].update(spec)
    return yaml.safe_dump(job)


def get(k: Kubectl, kind: str, name: str) -> dict | None:
    proc = k("get", kind, name, "-o", "json", check=False)
    return proc if isinstance(proc, dict) else None


def phase_is_kind(k: Kubectl, kind: str, name: str, phase: str) -> Callable[[], dict | None]:
    def probe() -> dict | None:
        obj = get(k, kind, name)
        return obj if obj and obj.get("status", {}).get("phase") == phase else None

    return probe


def phase_is(k: Kubectl, name: str, phase: str) -> Callable[[], dict | None]:
    return phase_is_kind(k, "tttjob", name, phase)


def set_rayjob_status(k: Kubectl, name: str, **status: str) -> None:
    k("patch", "rayjob", name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))
