"""The `ttt` command: real subprocesses, exit codes, and no tracebacks for user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.helpers import GOLDEN


def ttt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ttt", *args], capture_output=True, text=True, timeout=300)


def test_parity_on_the_golden_file_exits_zero():
    proc = ttt("parity", str(GOLDEN))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["checks"]["grad"]["max_rel"] < 1e-4


def test_parity_fails_on_a_perturbed_reference(tmp_path):
    with np.load(GOLDEN) as data:
        entries = {k: data[k] for k in data.files}
    entries["meta/loss_per_chunk"] = entries["meta/loss_per_chunk"] + np.float32(1e-3)
    bad = tmp_path / "perturbed.npz"
    np.savez(bad, **entries)
    proc = ttt("parity", str(bad), "--output", str(tmp_path / "report.json"))
    assert proc.returncode == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["ok"] and not report["checks"]["meta/loss_per_chunk"]["ok"]
    assert report["checks"]["meta/token_nll"]["ok"]


def test_parity_on_a_file_that_is_not_a_dump(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    proc = ttt("parity", str(junk))
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_config_is_a_one_line_error():
    proc = ttt("config", "tiny", "--set", "train.seq_len=100")
    assert proc.returncode == 2
    assert "train.seq_len" in proc.stderr and "Traceback" not in proc.stderr


def test_config_prints_resolved_yaml_and_counts():
    proc = ttt("config", "tiny", "--set", "model.window_size=32")
    assert proc.returncode == 0 and "window_size: 32" in proc.stdout
    counts = json.loads(ttt("config", "125m", "--counts").stdout)
    assert counts["params"]["total"] == 184_363_776
