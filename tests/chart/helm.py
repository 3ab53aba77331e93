"""helm run offline for the chart tests (`lint`, `template`, `install --dry-run=client`), its home folders
in a temp dir and no kubeconfig: nothing here may reach a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "ttt-platform"
RELEASE, NAMESPACE = "demo", "ttt"
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


@dataclass
class Helm:
    binary: Path
    env: dict[str, str]

    @classmethod
    def offline(cls, home: Path) -> Helm:
        """The venv's helm (infra/install-helm.sh puts it there), with its home folders under `home`."""
        binary = Path(sys.executable).parent / "helm"
        if not binary.is_file():
            raise FileNotFoundError(
                f"no helm next to {sys.executable}: run `make install` "
                "(or `infra/install-helm.sh .venv` in a venv installed before the script existed)"
            )
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": str(home / "no-kubeconfig"),
        }
        return cls(binary, env)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args], env=self.env, capture_output=True, text=True, timeout=60, check=False
        )

    def render(self, *value_args: str, crds: bool = False) -> list[dict[str, Any]]:
        """`helm template` → the rendered objects; fails the test with helm's message if rendering fails."""
        extra = ["--include-crds"] if crds else []
        result = self.run(
            "template",
            RELEASE,
            str(CHART),
            "-n",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSIONS[0],
            *extra,
            *value_args,
        )
        assert result.returncode == 0, f"helm template {' '.join(value_args)} failed:\n{result.stderr}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def error(self, *value_args: str) -> str:
        """`helm template` that must be refused: helm's message."""
        result = self.run("template", RELEASE, str(CHART), "-n", NAMESPACE, *value_args)
        assert result.returncode != 0, f"helm template {' '.join(value_args)} was accepted"
        return result.stderr

    def template_error(self, values: dict[str, Any], tmp_path: Path, *args: str) -> str:
        """Render with a values file that must be rejected; return helm's message."""
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        return self.error("-f", str(values_file), *args)

    def notes(self, *value_args: str) -> str:
        result = self.run("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", *value_args)
        assert result.returncode == 0, result.stderr
        return result.stdout.split("NOTES:", 1)[1]
