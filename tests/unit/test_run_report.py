"""The operator's reading of a run from MLflow (ttt_operator.run_report): how each way a run ends maps to
the report the reconcile logic reads (the same shape as progress.json)."""

from __future__ import annotations

import pytest
from mlflow.entities import Metric, Run, RunData, RunInfo, RunTag

from ttt_operator.reconcile import was_preempted
from ttt_operator.run_report import as_report


def mlflow_run(status: str, tags: dict[str, str], metrics: list[Metric]) -> Run:
    info = RunInfo(
        run_id="r1", experiment_id="1", user_id="u", status=status, start_time=0, end_time=None,
        lifecycle_stage="active", run_name="job-1234abcd",
    )  # fmt: skip
    return Run(info, RunData(metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()]))


LOSS = [Metric("train/loss", 2.5, 1_700_000_000_000, 39), Metric("val/loss", 2.4, 1_700_000_000_000, 40)]


@pytest.mark.parametrize(
    ("status", "tags", "state"),
    [
        ("RUNNING", {}, "running"),
        ("FINISHED", {}, "succeeded"),
        ("FAILED", {}, "failed"),
        ("KILLED", {"ttt.stopped": "SIGTERM after step 40"}, "preempted"),
        ("KILLED", {}, "killed"),  # stopped at once (a second signal): not a clean stop
    ],
)
def test_each_end_of_a_run_maps_to_its_report_state(status, tags, state):
    report = as_report(mlflow_run(status, {"ttt.attempt": "3", **tags}, LOSS), "http://mlflow", 100)
    assert report["state"] == state and report["attempt"] == 3 and report["step"] == 40
    assert was_preempted(report, 3) is (state == "preempted") and not was_preempted(report, 2)
    assert ("metrics" in report) is (state == "succeeded")  # final metrics only from a finished run


def test_the_checkpoint_tag_gives_the_last_checkpoint_and_its_step():
    tags = {"ttt.checkpoint": "s3://b/runs/job/checkpoints/step-00000040.pt"}
    report = as_report(mlflow_run("FINISHED", tags, LOSS), "http://mlflow", 40)
    assert report["last_checkpoint"] == {"uri": tags["ttt.checkpoint"], "step": 40}
    assert report["metrics"] == {"val/loss": 2.4} and report["loss"] == 2.5
