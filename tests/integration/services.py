"""Helpers for the integration tests: a tiny job, free ports, starting and stopping servers."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# A tiny job that trains in about a second: T=64 > W=16, four inner steps of b=16.
TINY = [
    "train.seq_len=64",
    "model.window_size=16",
    "ttt.mini_batch_size=16",
    "train.global_batch_size=2",
    "train.total_steps=6",
    "optim.warmup_steps=1",
    "ttt.inner_lr_warmup_steps=2",
    "train.eval_sequences=4",
    "train.eval_batch_size=4",
    "train.checkpoint_every=3",
    "ttt.checkpoint=false",
    "tracking.system_metrics=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)
