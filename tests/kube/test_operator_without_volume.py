"""The operator without the runs volume (the chart's default: many clusters have no ReadWriteMany claim to
give it): a run directory it cannot see is read from the run's MLflow run, so that the TTTJob's status,
and the metrics sweeps rank trials by, still come from the run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml

from tests.kube.apiserver import FakeApiServer
from tests.kube.drive import (
    Operator,
    eventually,
    get,
    kubectl,
    operator_env,
    phase_is,
    prepare,
    set_rayjob_status,
    tttjob,
)
from ttt import config as cfgmod
from ttt.train.report import ATTEMPT_ENV
from ttt.train.trainer import Trainer

NAMESPACE = "no-volume"


@pytest.fixture(scope="module")
def drill(
    apiserver: FakeApiServer, tmp_path_factory: pytest.TempPathFactory, mlflow_server
) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("no-volume")
    kubeconfig = prepare(apiserver, base, [NAMESPACE])
    mount = base / "runs-volume"  # where Ray pods mount the claim; absent in the operator's pod
    env = operator_env(
        kubeconfig,
        NAMESPACE,
        mount / "team",
        TTT_RUNS_PVC="ttt-runs",
        TTT_RUNS_MOUNT=str(mount),
        TTT_MLFLOW_TRACKING_URI=mlflow_server,
    )
    operator = Operator(env, base / "operator.log")
    operator.start()
    yield {"k": kubectl(kubeconfig), "base": base, "mount": mount}
    operator.stop()


def test_status_and_final_metrics_come_from_mlflow_when_the_run_directory_is_out_of_reach(
    drill, tmp_path, monkeypatch
):
    k = drill["k"]
    steps = [
        "train.total_steps=6",
        "optim.warmup_steps=1",
        "train.eval_sequences=4",
        "train.checkpoint_every=3",
    ]
    k("apply", "-f", "-", stdin=tttjob("unmounted", overrides=steps))
    cm = eventually(lambda: get(k, "configmap", "unmounted-a1"), "ConfigMap unmounted-a1")
    rendered = cfgmod.from_yaml(cm["data"]["job.yaml"])
    assert rendered.storage.shared and rendered.storage.root.startswith(str(drill["mount"]))

    # The attempt's trainer, as in its pod: it writes to the volume's path, which the operator cannot see
    # (here a folder elsewhere stands for the claim), and logs to MLflow.
    volume = tmp_path / "claim"
    job = cfgmod.apply_overrides(rendered, ["scale.ray_address=null", f"storage.root={volume}"])
    monkeypatch.setenv(ATTEMPT_ENV, "1")
    set_rayjob_status(k, "unmounted-a1", jobDeploymentStatus="Running", jobStatus="RUNNING")
    result = Trainer(job, rendered.tracking.run_name, progress=False).fit()
    set_rayjob_status(k, "unmounted-a1", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")

    done = eventually(phase_is(k, "unmounted", "Succeeded"), "phase Succeeded", 60)["status"]
    assert not drill["mount"].exists()  # the operator really had no run directory to read
    assert done["mlflowRunId"] == result.mlflow_run_id
    assert done["progress"]["stepOfTotal"] == "6/6"
    assert done["metrics"]["val/loss"] == pytest.approx(result.final_eval.loss)
    assert done["lastCheckpoint"] == {"step": 6, "uri": result.last_checkpoint}
    print("\n" + yaml.safe_dump({"status from MLflow": {k: done[k] for k in ("progress", "metrics")}}))
