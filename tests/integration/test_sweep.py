"""`ttt sweep`: trials under Ray Tune against a real `mlflow server`, with parent and child runs, the three
artifacts, and the best trial printed as MLflow holds it; bad sweeps refused before anything starts.

The sweeps run in this process (`run_sweep`, the CLI's one call) on one Ray cluster for the module;
the command line itself is checked where it needs no Ray: the dry run and the errors."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.integration.services import TINY
from ttt.config import resolve
from ttt.sweep.local import run_sweep
from ttt.sweep.spec import from_dict

GRID = [
    {"name": "model.window_size", "values": [16, 32]},
    {"name": "ttt.mini_batch_size", "values": [8, 16]},
]
METRIC = "val/loss_past_window"


def base_config(text_dataset: str, experiment: str, *extra: str):
    return resolve("tiny", [*TINY, f"data.path={text_dataset}", f"tracking.experiment={experiment}", *extra])


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {run.info.run_id: run for run in runs}


def test_grid_sweep_tracks_parent_children_artifacts_and_the_best(
    ray_cluster, mlflow_server, text_dataset, tmp_path, capsys
):
    spec = from_dict({"name": "grid", "parameters": GRID, "objective": {"metric": METRIC}, "parallelism": 2})
    base = base_config(text_dataset, "sweep-grid")
    result = run_sweep(spec, base, root=str(tmp_path / "sweeps"), tracking_uri=mlflow_server)
    out = capsys.readouterr().out

    assert [t.status for t in result.trials] == ["completed"] * 4, out
    # a line as each trial ends, before the sorted table
    live, _, final = out.partition("all trials, best first")
    assert len(re.findall(r"^\s+\d\s+\d+\s+\d+\s+completed\s+\d\.\d{4}\s+6\s+\d+s$", live, re.M)) == 4, out

    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.run_name == "grid" and parent.info.status == "FINISHED"
    assert parent.data.tags["ttt.sweep"] == "grid"
    assert parent.data.params["model.window_size"] == "[16, 32]"
    assert parent.data.params["sweep.objective"] == f"{METRIC} (minimize)"
    runs = children(client, result.parent_run_id)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs.values())
    assert sorted(r.data.tags["ttt.trial"] for r in runs.values()) == ["0", "1", "2", "3"]

    names = {a.path for a in client.list_artifacts(result.parent_run_id, "sweep")}
    assert {"sweep/results.csv", "sweep/heatmap.png", "sweep/loss_by_position.png"} <= names
    folder = client.download_artifacts(result.parent_run_id, "sweep", str(tmp_path / "artifacts"))
    for png in ("heatmap.png", "loss_by_position.png"):
        assert matplotlib.image.imread(f"{folder}/{png}").shape[0] > 200

    rows = list(csv.DictReader(io.StringIO(Path(folder, "results.csv").read_text())))
    assert len(rows) == 4
    for row in rows:
        run = runs[row["mlflow_run_id"]]
        assert row["run_name"] == run.info.run_name and row["status"] == "completed"
        assert row["model.window_size"] == run.data.params["model.window_size"]
        assert row["ttt.mini_batch_size"] == run.data.params["ttt.mini_batch_size"]
        assert float(row["objective"]) == run.data.metrics[METRIC]
        assert float(row["val/loss"]) == run.data.metrics["val/loss"]
        assert int(row["steps"]) == 6 and float(row["seconds"]) > 0

    # The best trial printed is the child run MLflow ranks first.
    best_run = min(runs.values(), key=lambda r: r.data.metrics[METRIC])
    match = re.search(rf"best: trial (\d) \((.*)\) {METRIC}=(\d\.\d+)  mlflow run (\w+)", final)
    assert match, final
    assert match.group(4) == best_run.info.run_id
    assert match.group(1) == best_run.data.tags["ttt.trial"]
    assert float(match.group(3)) == pytest.approx(best_run.data.metrics[METRIC], abs=5e-5)
    assert parent.data.tags["ttt.sweep.best_run_id"] == best_run.info.run_id
    assert parent.data.metrics[f"best/{METRIC}"] == best_run.data.metrics[METRIC]


def test_asha_stops_the_worse_trial_and_the_sweep_completes(
    ray_cluster, mlflow_server, text_dataset, tmp_path, capsys
):
    # One at a time, so that the good trial sets the bar at the first rung (2 updates) and the one that
    # barely learns (lr 1e-6) falls below it there.
    spec = from_dict(
        {
            "name": "asha",
            "parameters": [{"name": "optim.lr", "values": [1e-2, 1e-6]}],
            "overrides": ["train.eval_every=2"],
            "objective": {"metric": "val/loss"},
            "early_stopping": {"method": "asha", "grace_period": 1},
            "parallelism": 1,
        }
    )
    base = base_config(text_dataset, "sweep-asha")
    result = run_sweep(spec, base, root=str(tmp_path / "sweeps"), tracking_uri=mlflow_server)
    out = capsys.readouterr().out

    good, slow = result.trials
    assert (good.status, good.steps) == ("completed", 6), out
    assert (slow.status, slow.steps) == ("stopped", 2), out
    assert result.best is good and "best: trial 0 (lr=0.01)" in out
    client = MlflowClient(mlflow_server)
    runs = children(client, result.parent_run_id)
    assert runs[good.mlflow_run_id].info.status == "FINISHED"
    stopped = runs[slow.mlflow_run_id]
    assert stopped.info.status == "KILLED" and stopped.data.tags["ttt.sweep.status"] == "stopped"
    rows = list(csv.DictReader(io.StringIO(Path(result.root, "sweep", "results.csv").read_text())))
    assert [r["status"] for r in rows] == ["completed", "stopped"]


def test_a_failing_trial_is_reported_and_the_others_still_count(
    ray_cluster, mlflow_server, text_dataset, tmp_path, capsys
):
    spec = from_dict(
        {
            "name": "fails",
            "parameters": [{"name": "train.fail_at_step", "values": [None, 2]}],
            "parallelism": 2,
        }
    )
    base = base_config(text_dataset, "sweep-fails")
    result = run_sweep(spec, base, root=str(tmp_path / "sweeps"), tracking_uri=mlflow_server)
    out = capsys.readouterr().out

    ok, failed = result.trials
    assert ok.status == "completed" and result.best is ok and result.failed == [failed]
    assert failed.status == "failed" and "failing on purpose before update 2" in failed.error, out
    assert re.search(r"^\s+1\s+2\s+failed .*failing on purpose", out, re.M), out
    run = MlflowClient(mlflow_server).get_run(failed.mlflow_run_id)  # found through progress.json
    assert run.info.status == "FAILED" and run.data.tags["ttt.sweep.status"] == "failed"


# -- the command line, without Ray -------------------------------------------------------------------


def ttt(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_LOGGING_LEVEL="WARNING")
    return subprocess.run(
        [sys.executable, "-m", "ttt", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_dry_run_lists_trials_and_skipped_combinations(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "dry",
                "base": "tiny-cpu",
                "parameters": [
                    {"name": "model.window_size", "values": [32, 64]},
                    {"name": "ttt.mini_batch_size", "values": [32, 64]},
                ],
                "skip_invalid": True,
            }
        )
    )
    proc = ttt("sweep", str(path), "--dry-run", "--root", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    assert "3 trials (grid)" in proc.stdout and "trial 2: window_size=64, mini_batch_size=64" in proc.stdout
    assert "skipped window_size=32, mini_batch_size=64: ttt.mini_batch_size" in proc.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("sweep", "words"),
    [
        ({"colour": "red"}, "unknown key"),
        ({"parameters": [{"name": "model.window_size", "values": []}]}, "parameters[0].values"),
        (
            {"parameters": [{"name": "optim.lr", "min": 0.1, "max": 0.01, "num": 2}]},
            "parameters[0].min: 0.1 is greater than max 0.01",
        ),
        ({"objective": {"metric": "val/accuracy"}}, "objective.metric: 'val/accuracy' is not logged"),
        ({"early_stopping": {"method": "asha"}}, "early_stopping: needs evaluations during training"),
    ],
)
def test_bad_sweeps_fail_with_one_line_before_any_trial(tmp_path, sweep, words):
    data = {
        "name": "bad",
        "base": "tiny-cpu",
        "parameters": [{"name": "ttt.mini_batch_size", "values": [16]}],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**data, **sweep}))
    proc = ttt("sweep", str(path), "--root", str(tmp_path / "runs"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written
