"""The operator end to end: a real `python -m ttt_operator` process and real kubectl against the local API
server, with KubeRay's RayJob CRD installed; the test plays KubeRay's part by patching RayJob status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jsonschema
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import ROOT
from tests.kube.apiserver import FakeApiServer
from tests.kube.drive import (
    CRD,
    IMAGE,
    RAYJOB_CRD,
    SWEEP_CRD,
    TINY,
    Operator,
    eventually,
    get,
    kubectl,
    operator_env,
    phase_is,
    phase_is_kind,
    prepare,
    set_rayjob_status,
    tttjob,
)
from ttt import config as cfgmod
from ttt.storage import open_storage
from ttt.tracking.logger import CURVE_ARTIFACT
from ttt.train.report import ProgressReport

NAMESPACE = "research"


@pytest.fixture(scope="module")
def cluster(apiserver, tmp_path_factory, mlflow_server):
    """The API server with both CRDs and a namespace; the operator watching that namespace."""
    base = tmp_path_factory.mktemp("operator")
    kubeconfig = prepare(apiserver, base, [NAMESPACE], (CRD, SWEEP_CRD, RAYJOB_CRD))
    env = operator_env(kubeconfig, NAMESPACE, base / "runs", TTT_MLFLOW_TRACKING_URI=mlflow_server)
    operator = Operator(env, base / "operator.log")
    operator.start()
    yield {"operator": operator, "kubeconfig": kubeconfig, "base": base, "mlflow": mlflow_server}
    operator.stop()


@pytest.fixture()
def k(cluster):
    """kubectl in the test namespace; returns stdout, or parsed JSON for `-o json`."""
    return kubectl(cluster["kubeconfig"])


def rayjob_schema() -> dict:
    crd = yaml.safe_load(RAYJOB_CRD.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


# -- tests ------------------------------------------------------------------------------------------


def test_apply_creates_config_map_and_a_valid_rayjob(k):
    k("apply", "-f", str(TINY))
    job = eventually(lambda: get(k, "tj", "tiny-cpu"), "the TTTJob")
    rayjob = eventually(lambda: get(k, "rayjob", "tiny-cpu-a1"), "RayJob tiny-cpu-a1")
    jsonschema.validate(rayjob, rayjob_schema())

    owner = rayjob["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("TTTJob", "tiny-cpu", job["metadata"]["uid"])
    assert owner["controller"] is True
    cluster = rayjob["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == job["spec"]["numNodes"] == 1
    pods = [cluster["headGroupSpec"]["template"], workers["template"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["image"] == IMAGE
        assert "nvidia.com/gpu" not in container["resources"]["limits"]  # gpusPerNode: 0
    run_name = f"tiny-cpu-{job['metadata']['uid'].replace('-', '')[:8]}"
    assert rayjob["spec"]["entrypoint"] == (
        f"python -m ttt train /etc/ttt/job.yaml --run-name {run_name} --no-progress"
    )

    cm = get(k, "configmap", "tiny-cpu-a1")
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    rendered = cfgmod.from_yaml(cm["data"]["job.yaml"])
    assert (rendered.model.window_size, rendered.ttt.mini_batch_size) == (64, 32)
    assert rendered.tracking.run_name == run_name and rendered.scale.workers == 1

    job = eventually(phase_is(k, "tiny-cpu", "Pending"), "phase Pending")
    assert job["status"]["rayJobName"] == "tiny-cpu-a1" and job["status"]["attempt"] == 1
    assert job["status"]["config"] == {"windowSize": 64, "miniBatchSize": 32, "seqLen": 256, "workers": 1}
    created = next(c for c in job["status"]["conditions"] if c["type"] == "Created")
    assert created["status"] == "True" and created["observedGeneration"] == job["metadata"]["generation"]


def test_status_progress_retry_and_restart(k, cluster):
    k("apply", "-f", "-", stdin=tttjob("retry-me", backoffLimit=1))
    eventually(lambda: get(k, "rayjob", "retry-me-a1"), "RayJob retry-me-a1")

    set_rayjob_status(k, "retry-me-a1", jobDeploymentStatus="Running", jobStatus="RUNNING")
    job = eventually(phase_is(k, "retry-me", "Running"), "phase Running")
    running = next(c for c in job["status"]["conditions"] if c["type"] == "Running")
    assert running["status"] == "True" and job["status"]["startTime"]

    # The run reports progress into its run directory; the operator's timer copies it into the status.
    report = ProgressReport(open_storage(job["status"]["storagePath"]), total_steps=300, every_s=0)
    report.start(0, "mlflow-run-1", "sqlite:///x", None)
    report.step(12, 3.25, 850.0)
    report.checkpoint(10, job["status"]["storagePath"] + "/checkpoints/step-00000010")
    job = eventually(
        lambda: (j := get(k, "tj", "retry-me")) and j["status"].get("progress", {}).get("step") == 12 and j,
        "progress in the status",
    )
    assert job["status"]["progress"]["stepOfTotal"] == "12/300" and job["status"]["progress"]["loss"] == 3.25
    assert job["status"]["mlflowRunId"] == "mlflow-run-1" and job["status"]["lastCheckpoint"]["step"] == 10

    # Attempt 1 fails: within the backoff limit, attempt 2 continues the same run.
    set_rayjob_status(k, "retry-me-a1", jobDeploymentStatus="Complete", jobStatus="FAILED", message="OOM")
    second = eventually(lambda: get(k, "rayjob", "retry-me-a2"), "RayJob retry-me-a2")
    first_cfg = cfgmod.from_yaml(get(k, "configmap", "retry-me-a1")["data"]["job.yaml"])
    second_cfg = cfgmod.from_yaml(get(k, "configmap", "retry-me-a2")["data"]["job.yaml"])
    assert second_cfg.storage.root == first_cfg.storage.root
    assert second_cfg.tracking.run_name == first_cfg.tracking.run_name
    assert second_cfg.tracking.uri == first_cfg.tracking.uri
    assert second["spec"]["entrypoint"] == get(k, "rayjob", "retry-me-a1")["spec"]["entrypoint"]
    job = eventually(
        lambda: (j := get(k, "tj", "retry-me")) and j["status"].get("attempt") == 2 and j, "attempt 2"
    )
    assert job["status"]["failedAttempts"] == 1 and job["status"]["mlflowRunId"] == "mlflow-run-1"

    # The operator restarts, and its last status update was lost: it must adopt attempt 2, not add one.
    cluster["operator"].stop()
    k("patch", "tj", "retry-me", "--subresource=status", "--type=merge", "-p", '{"status":{"attempt":1}}')
    cluster["operator"].start()
    eventually(lambda: (j := get(k, "tj", "retry-me")) and j["status"].get("attempt") == 2, "re-adoption", 20)
    time.sleep(2)  # a few timer ticks: nothing new may appear
    names = sorted(r["metadata"]["name"] for r in k("get", "rayjobs", "-o", "json")["items"])
    assert [n for n in names if n.startswith("retry-me")] == ["retry-me-a1", "retry-me-a2"]

    set_rayjob_status(k, "retry-me-a2", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    job = eventually(phase_is(k, "retry-me", "Succeeded"), "phase Succeeded")
    assert job["status"]["completionTime"]
    reasons = [
        e["reason"]
        for e in k("get", "events", "-o", "json")["items"]
        if e["involvedObject"]["name"] == "retry-me"
    ]
    for reason in ("Created", "Running", "AttemptFailed", "Retrying", "Succeeded"):
        assert reason in reasons, reasons
    assert reasons.count("AttemptFailed") == reasons.count("Retrying") == 1, reasons  # not again on restart


def test_a_preempted_attempt_is_retried_even_with_backoff_limit_zero(k, monkeypatch):
    k("apply", "-f", "-", stdin=tttjob("preempt-me", backoffLimit=0))
    first = eventually(lambda: get(k, "rayjob", "preempt-me-a1"), "RayJob preempt-me-a1")
    for group in (
        first["spec"]["rayClusterSpec"]["headGroupSpec"],
        *first["spec"]["rayClusterSpec"]["workerGroupSpecs"],
    ):
        pod = group["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 30  # the CRD's default
        assert "preStop" in pod["containers"][0]["lifecycle"]
    set_rayjob_status(k, "preempt-me-a1", jobDeploymentStatus="Running", jobStatus="RUNNING")
    job = eventually(phase_is(k, "preempt-me", "Running"), "phase Running")

    # The pod is preempted: attempt 1's trainer saves, reports it and exits 75; KubeRay fails the RayJob.
    monkeypatch.setenv("TTT_ATTEMPT", "1")  # as the operator sets it in the attempt's pods
    report = ProgressReport(open_storage(job["status"]["storagePath"]), total_steps=300, every_s=0)
    report.start(0, "mlflow-run-p", "sqlite:///x", None)
    report.step(41, 2.5, 900.0)
    report.checkpoint(41, job["status"]["storagePath"] + "/checkpoints/step-00000041.pt")
    report.finish("preempted", "stopped after step 41 (SIGTERM) in 2.0 s")
    set_rayjob_status(k, "preempt-me-a1", jobDeploymentStatus="Failed", jobStatus="FAILED", message="exit 75")

    eventually(lambda: get(k, "rayjob", "preempt-me-a2"), "RayJob preempt-me-a2 despite backoffLimit 0")
    job = eventually(
        lambda: (j := get(k, "tj", "preempt-me")) and j["status"].get("attempt") == 2 and j, "attempt 2"
    )
    assert job["status"]["failedAttempts"] == 0 and job["status"]["preemptedAttempts"] == [1]
    running = next(c for c in job["status"]["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "Preempted")
    assert "stopped after step 41" in running["message"]
    set_rayjob_status(k, "preempt-me-a2", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    eventually(phase_is(k, "preempt-me", "Succeeded"), "phase Succeeded")
    reasons = [
        e["reason"]
        for e in k("get", "events", "-o", "json")["items"]
        if e["involvedObject"]["name"] == "preempt-me"
    ]
    assert "Preempted" in reasons and "AttemptFailed" not in reasons, reasons


def test_backoff_limit_and_suspend(k):
    k("apply", "-f", "-", stdin=tttjob("no-retry", backoffLimit=0))
    eventually(lambda: get(k, "rayjob", "no-retry-a1"), "RayJob no-retry-a1")
    set_rayjob_status(k, "no-retry-a1", jobDeploymentStatus="Failed", reason="AppFailed", message="boom")
    job = eventually(phase_is(k, "no-retry", "Failed"), "phase Failed")
    assert "backoffLimit 0" in job["status"]["message"] and "boom" in job["status"]["message"]
    assert get(k, "rayjob", "no-retry-a2") is None

    k("apply", "-f", "-", stdin=tttjob("pausable"))
    eventually(lambda: get(k, "rayjob", "pausable-a1"), "RayJob pausable-a1")
    k("patch", "tj", "pausable", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    eventually(phase_is(k, "pausable", "Suspended"), "phase Suspended")
    eventually(lambda: get(k, "rayjob", "pausable-a1") is None, "the suspended attempt's RayJob deleted")
    k("patch", "tj", "pausable", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    eventually(lambda: get(k, "rayjob", "pausable-a2"), "a new attempt after resume")


def test_kubectl_get_shows_the_printer_columns(k):
    k("apply", "-f", "-", stdin=tttjob("columns"))
    eventually(lambda: get(k, "rayjob", "columns-a1"), "RayJob columns-a1")
    set_rayjob_status(k, "columns-a1", jobDeploymentStatus="Running", jobStatus="RUNNING")
    eventually(phase_is(k, "columns", "Running"), "phase Running")
    out = k("get", "tttjobs", "columns")
    header, row = out.splitlines()[:2]
    assert header.split() == [
        "NAME",
        "PHASE",
        "WINDOW",
        "MINIBATCH",
        "NODES",
        "STEP",
        "LOSS",
        "MLFLOW",
        "AGE",
    ]
    assert row.split()[:5] == ["columns", "Running", "64", "32", "1"]
    header, row = k("get", "tj", "columns", "-o", "wide").splitlines()[:2]
    assert header.split()[-4:] == ["ATTEMPT", "RAYJOB", "REASON", "MESSAGE"]
    reason = row[header.index("REASON") : header.index("MESSAGE")].strip()
    assert reason == "Running"


def test_bad_tttjobs_are_rejected_by_the_api_server_naming_the_field(k):
    cases = {
        "numNodes": {"numNodes": 0},
        "gpusPerNode": {"gpusPerNode": 17},
        "terminationGracePeriodSeconds": {"terminationGracePeriodSeconds": 3},
        "seqLen must be a multiple of miniBatchSize": {
            "ttt": {"windowSize": 64, "miniBatchSize": 48, "seqLen": 100}
        },
    }
    for field, change in cases.items():
        proc = k("apply", "-f", "-", stdin=tttjob("bad", **change), check=False)
        assert proc.returncode != 0 and field in proc.stderr, proc.stderr
    assert get(k, "tj", "bad") is None


def test_deleting_the_tttjob_deletes_what_it_owns(k):
    k("apply", "-f", "-", stdin=tttjob("short-lived"))
    eventually(lambda: get(k, "rayjob", "short-lived-a1"), "RayJob short-lived-a1")
    assert get(k, "configmap", "short-lived-a1") is not None
    k("delete", "tj", "short-lived")
    eventually(lambda: get(k, "rayjob", "short-lived-a1") is None, "the RayJob garbage-collected")
    assert get(k, "configmap", "short-lived-a1") is None


def test_rendered_config_runs_with_the_local_trainer(k, cluster, tmp_path):
    """What the cluster would run is runnable: the ConfigMap's config, trained here without Ray."""
    k("apply", "-f", "-", stdin=tttjob("runnable"))
    cm = eventually(lambda: get(k, "configmap", "runnable-a1"), "ConfigMap runnable-a1")
    path = tmp_path / "job.yaml"
    path.write_text(cm["data"]["job.yaml"])
    rendered = cfgmod.load(path)
    # Only what ties it to the cluster changes: no Ray cluster to join, and a local runs directory.
    overrides = ["scale.ray_address=null", f"storage.root={tmp_path / 'runs'}"]
    command = [sys.executable, "-m", "ttt", "train", str(path), "--run-name", rendered.tracking.run_name]
    command += ["--no-progress", *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "TTT_CACHE_DIR": str(tmp_path / "cache")}  # the bundled corpus is built there
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = rendered.train.total_steps
    assert f"run {rendered.tracking.run_name}: {steps} steps" in proc.stdout
    progress = json.loads((tmp_path / "runs" / rendered.tracking.run_name / "progress.json").read_text())
    assert (progress["state"], progress["step"], progress["total_steps"]) == ("succeeded", steps, steps)


def finish_trial(k, name: str, objective: float) -> str:
    """What the trainer and KubeRay would do for a trial, from the config the operator rendered for it:
    an MLflow run (a child of the sweep's) with metrics and a loss curve, the run's report, and a RayJob
    that succeeds. Returns the trial's MLflow run id."""
    job = eventually(lambda: (j := get(k, "tj", name)) and j.get("status", {}).get("storagePath") and j, name)
    cfg = cfgmod.from_yaml(
        eventually(lambda: get(k, "configmap", f"{name}-a1"), "config")["data"]["job.yaml"]
    )
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
    )
    run = client.create_run(
        experiment_id, run_name=name, tags={"mlflow.parentRunId": cfg.tracking.parent_run_id or ""}
    )
    metrics = {"val/loss": objective + 0.05, "val/loss_past_window": objective}
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    curve = [3.0 - objective * i / 255 for i in range(256)]
    client.log_dict(
        run.info.run_id, {"loss_by_position": curve, "window": cfg.model.window_size}, CURVE_ARTIFACT
    )
    client.set_terminated(run.info.run_id)

    report = ProgressReport(open_storage(job["status"]["storagePath"]), total_steps=150, every_s=0)
    report.start(0, run.info.run_id, cfg.tracking.uri, None)
    report.step(150, objective + 0.1, 1000.0)
    report.final_metrics(metrics)
    report.finish("succeeded")
    set_rayjob_status(k, f"{name}-a1", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    return run.info.run_id


def test_sweep_runs_trials_within_parallelism_and_finds_the_best(k, cluster):
    example = ROOT / "jobs" / "examples" / "sweep-tiny-cpu.yaml"
    k("apply", "-f", str(example))
    eventually(lambda: get(k, "tj", "tiny-w-b-t1"), "the first two trials")
    sweep = eventually(
        lambda: (s := get(k, "tsw", "tiny-w-b")) and s.get("status", {}).get("created") == 2 and s, "status"
    )
    assert sweep["status"]["total"] == 4 and get(k, "tj", "tiny-w-b-t2") is None  # parallelism 2
    trial = get(k, "tj", "tiny-w-b-t0")
    assert trial["metadata"]["ownerReferences"][0]["uid"] == sweep["metadata"]["uid"]
    assert trial["spec"]["ttt"] == {"windowSize": 32, "miniBatchSize": 16}  # the knobs carry W and b
    assert trial["spec"]["recipe"] == "tiny-cpu" and "train.total_steps=150" in trial["spec"]["overrides"]

    objectives = {0: 1.90, 1: 1.70, 2: 2.00, 3: 1.80}
    runs = {0: finish_trial(k, "tiny-w-b-t0", objectives[0])}
    eventually(lambda: get(k, "tj", "tiny-w-b-t2"), "trial 2 once trial 0 succeeded")
    assert get(k, "tj", "tiny-w-b-t3") is None
    runs[1] = finish_trial(k, "tiny-w-b-t1", objectives[1])
    eventually(lambda: get(k, "tj", "tiny-w-b-t3"), "trial 3 once trial 1 succeeded")
    runs[2] = finish_trial(k, "tiny-w-b-t2", objectives[2])
    runs[3] = finish_trial(k, "tiny-w-b-t3", objectives[3])

    sweep = eventually(phase_is_kind(k, "tsw", "tiny-w-b", "Succeeded"), "the sweep to succeed")
    status = sweep["status"]
    assert (status["total"], status["succeeded"], status["running"], status["failed"]) == (4, 4, 0, 0)
    assert {t["index"]: t["objective"] for t in status["trials"]} == objectives
    best = min(objectives, key=objectives.get)
    assert status["best"]["index"] == best and status["best"]["objective"] == objectives[best]
    assert status["best"]["parameters"] == {"model.window_size": 32, "ttt.mini_batch_size": 32}
    assert status["best"]["mlflowRunId"] == runs[best]

    # MLflow: a parent run with the four trials as children, the best trial and the sweep's files.
    sweep = eventually(
        lambda: (s := get(k, "tsw", "tiny-w-b")) and s["status"].get("mlflowLogged") and s, "MLflow"
    )
    client = MlflowClient(cluster["mlflow"])
    parent = client.get_run(sweep["status"]["mlflowRunId"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny-w-b"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_id for r in children) == sorted(runs.values())
    assert parent.data.metrics["best/val/loss_past_window"] == objectives[best]
    assert parent.data.tags["ttt.sweep.best_run_id"] == runs[best]
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/results.csv", "sweep/heatmap.png", "sweep/loss_by_position.png"} <= files

    header, row = k("get", "tttsweeps").splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "TRIALS", "RUNNING", "SUCCEEDED", "BEST", "AGE"]
    assert row.split()[:5] == ["tiny-w-b", "Succeeded", "4", "0", "4"] and "1.7000" in row

    k("delete", "tsw", "tiny-w-b")
    eventually(
        lambda: (
            not [
                j
                for j in k("get", "tj", "-o", "json")["items"]
                if j["metadata"]["name"].startswith("tiny-w-b")
            ]
        ),
        "trials deleted with the sweep",
    )


def test_invalid_sweep_fails_before_any_trial(k):
    sweep = yaml.safe_load((ROOT / "jobs" / "examples" / "sweep-tiny-cpu.yaml").read_text())
    sweep["metadata"]["name"] = "bad-sweep"
    sweep["spec"]["parameters"][1]["values"] = [16, 128]  # b = 128 > W for every window
    k("apply", "-f", "-", stdin=yaml.safe_dump(sweep))
    status = eventually(phase_is_kind(k, "tsw", "bad-sweep", "Failed"), "the sweep to fail")["status"]
    assert status["message"].startswith("spec.parameters: 2 combination(s) are invalid"), status["message"]
    assert "skip_invalid" in status["message"] or "skipInvalid" in status["message"]
    time.sleep(1)
    assert not [
        j for j in k("get", "tj", "-o", "json")["items"] if j["metadata"]["name"].startswith("bad-sweep")
    ]


def test_without_kuberay_the_job_waits_and_says_why(tmp_path):
    """A cluster where KubeRay is not installed yet: a clear condition, then the job starts once it is."""
    with FakeApiServer() as server:
        server.load_crd(CRD)
        server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "TTT_OPERATOR_NAMESPACES": NAMESPACE}
        env |= {"TTT_STORAGE_URI": str(tmp_path / "runs"), "TTT_POLL_SECONDS": "1"}
        operator = Operator(env, tmp_path / "operator.log")
        operator.start()
        try:
            server.apply(
                yaml.safe_load(tttjob("early")) | {"metadata": {"name": "early", "namespace": NAMESPACE}}
            )

            def waiting() -> dict | None:
                status = server.get("tttjobs", "early", NAMESPACE).get("status", {})
                created = next((c for c in status.get("conditions", []) if c["type"] == "Created"), {})
                return status if created.get("reason") == "KubeRayMissing" else None

            status = eventually(waiting, "the KubeRayMissing condition")
            assert status["phase"] == "Pending" and "install KubeRay" in status["message"]
            server.load_crd(RAYJOB_CRD)
            eventually(
                lambda: server.objects("rayjobs", NAMESPACE, "ray.io"), "a RayJob once KubeRay is there"
            )
        finally:
            operator.stop()
