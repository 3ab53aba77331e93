"""Running `ttt train` the way a pod runs it (a process of its own) and watching it from outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.integration.services import ROOT, TINY


def train_command(run_name: str, *overrides: str, source: str = "tiny") -> list[str]:
    sets = [arg for item in (*TINY, *overrides) for arg in ("--set", item)]
    return [sys.executable, "-m", "ttt", "train", source, *sets, "--run-name", run_name, "--no-progress"]


def start_training(run_name: str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        train_command(run_name, *overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def progress(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_until(probe, what: str, seconds: float = 120.0, proc: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := probe():
            return value
        if proc is not None and proc.poll() is not None:
            detail = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{detail}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def at_step(run_dir: Path, step: int):
    """A probe: the run has reported `step` (or more) and is still running."""
    return lambda: (p := progress(run_dir)).get("state") == "running" and p.get("step", 0) >= step and p


def finish(proc: subprocess.Popen, seconds: float = 240.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=seconds)
    return proc.returncode, out, err
