"""Driving the operator end to end: a real `python -m ttt_operator` process, real kubectl against the local
API server, and the few moves of KubeRay's part (patching a RayJob's status). Shared by the operator's tests
and its restart drill."""

from __future__ import annotations

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

CRD = ROOT / "charts" / "ttt-platform" / "crds" / "tttjobs.ttt.dev.yaml"
SWEEP_CRD = ROOT / "charts" / "ttt-platform" / "crds" / "tttsweeps.ttt.dev.yaml"
RAYJOB_CRD = DATA / "kuberay" / "ray.io_rayjobs.yaml"
TINY = ROOT / "jobs" / "examples" / "tiny-cpu.yaml"
IMAGE = "ttt-platform/ttt:e2e"

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
        **extra,
    }


class Operator:
    """`python -m ttt_operator` as the Deployment runs it, configured through its environment."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env, self.log, self.proc = env, log, None

    def start(self) -> None:
        port = free_port()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ttt_operator", "--liveness", f"http://127.0.0.1:{port}/healthz"],
                env=self.env,
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
