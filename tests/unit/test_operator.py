"""The operator's pure parts: TTTJob → job config, ConfigMap and RayJob (checked against KubeRay's CRD);
RayJob status → TTTJob status; the reconcile decision in every situation a job meets."""

from __future__ import annotations

import copy
import dataclasses
import functools

import jsonschema
import pytest
import yaml

from tests.helpers import DATA, ROOT
from ttt import config as cfgmod
from ttt.errors import UserError
from ttt_operator import builders, sweeps
from ttt_operator.builders import SpecError
from ttt_operator.reconcile import blocked, by_attempt, plan
from ttt_operator.settings import Settings
from ttt_operator.status import Outcome, outcome, phase_conditions, progress_status, set_condition

EXAMPLES = ROOT / "jobs" / "examples"
SETTINGS = Settings(
    default_image="registry.example/ttt:test",
    mlflow_tracking_uri="http://mlflow.ttt.svc:5000",
    storage_uri="/runs",
    runs_pvc="ttt-runs",
    s3_endpoint_url="http://minio.storage.svc:9000",
    s3_secret="s3-credentials",
)
UID = "0a1b2c3d-0000-4000-8000-000000000001"


def example(name: str, **spec) -> dict:
    job = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    job["metadata"].update(namespace="research", uid=UID, generation=1)
    job["spec"].update(spec)
    return job


@functools.cache
def rayjob_schema() -> dict:
    crd = yaml.safe_load((DATA / "kuberay" / "ray.io_rayjobs.yaml").read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


# -- builders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "workers", "gpus", "nodes"),
    [("tiny-cpu", 1, 0, 1), ("125m-pretrain-8k", 8, 8, 1), ("760m-ext-32k", 32, 8, 4)],
)
def test_examples_render_to_valid_rayjobs(name, workers, gpus, nodes):
    job = example(name)
    cfg = builders.render_config(job, SETTINGS)
    rayjob = builders.ray_job(job, 3, cfg, SETTINGS)
    jsonschema.validate(rayjob, rayjob_schema())

    assert rayjob["metadata"]["name"] == f"{job['metadata']['name']}-a3"
    assert rayjob["metadata"]["labels"]["ttt.dev/attempt"] == "3"
    for key, value in (job["spec"].get("labels") or {}).items():
        assert rayjob["metadata"]["labels"][key] == value
    owner = rayjob["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("TTTJob", UID, True)

    cluster = rayjob["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == nodes
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for container in (head, worker):
        assert container["image"] == job["spec"].get("image", SETTINGS.default_image)
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/etc/ttt", "/dev/shm"}
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        assert {"name": "AWS_ENDPOINT_URL", "value": SETTINGS.s3_endpoint_url} in container["env"]

    assert cfg.scale.workers == workers
    assert cfg.scale.gpus_per_worker == (1.0 if gpus else 0.0)
    assert cfg.scale.ray_address == "auto"
    assert cfg.tracking.run_name == f"{job['metadata']['name']}-0a1b2c3d"
    assert rayjob["spec"]["entrypoint"] == (
        f"python -m ttt train /etc/ttt/job.yaml --run-name {cfg.tracking.run_name} --no-progress"
    )
    assert cfg.model.window_size == job["spec"]["ttt"]["windowSize"]
    assert cfg.ttt.mini_batch_size == job["spec"]["ttt"]["miniBatchSize"]


def test_ray_pods_stop_within_their_grace_period():
    """Every Ray pod: the grace period of the spec, a preStop hook that asks the pod's training processes
    to stop and waits for them, the stop folder on a volume of its own, and the attempt in the env."""
    job = example("tiny-cpu", terminationGracePeriodSeconds=90)
    cfg = builders.render_config(job, SETTINGS)
    assert cfg.train.stop_grace_s == 90 - builders.STOP_MARGIN_S
    cluster = builders.ray_job(job, 2, cfg, SETTINGS)["spec"]["rayClusterSpec"]
    for pod in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert pod["spec"]["terminationGracePeriodSeconds"] == 90
        (container,) = pod["spec"]["containers"]
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:2] == ["sh", "-c"] and "/run/ttt-stop/stop" in hook[2] and "-lt 88 " in hook[2]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        assert env["TTT_ATTEMPT"] == "2" and env["TTT_STOP_DIR"] == builders.STOP_DIR
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert "emptyDir" in volumes[mounts[builders.STOP_DIR]]
    default = builders.render_config(example("tiny-cpu"), SETTINGS)
    assert default.train.stop_grace_s == builders.DEFAULT_GRACE_S - builders.STOP_MARGIN_S


def test_config_map_holds_the_rendered_config():
    job = example("tiny-cpu")
    cfg = builders.render_config(job, SETTINGS)
    cm = builders.config_map(job, 1, cfg)
    assert cm["metadata"]["name"] == "tiny-cpu-a1"
    assert cfgmod.from_yaml(cm["data"]["job.yaml"]) == cfg
    assert cfg.storage.root == "/runs" and cfg.tracking.uri == SETTINGS.mlflow_tracking_uri
    assert cfg.tracking.experiment == "ttt-tiny"


def test_runs_volume_only_for_path_storage():
    on_pvc = builders.ray_job(
        example("tiny-cpu"), 1, builders.render_config(example("tiny-cpu"), SETTINGS), SETTINGS
    )
    volumes = on_pvc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": "ttt-runs"}} in volumes
    s3_job = example("125m-pretrain-8k")
    on_s3 = builders.ray_job(s3_job, 1, builders.render_config(s3_job, SETTINGS), SETTINGS)
    volumes = on_s3["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert "runs" not in {v["name"] for v in volumes}


def test_a_local_root_is_shared_only_on_the_runs_volume():
    """Every Ray pod mounts the runs volume: the launcher lets a run span nodes on it (storage.shared)."""
    job = example("tiny-cpu")
    assert builders.render_config(job, SETTINGS).storage.shared
    outside = dataclasses.replace(SETTINGS, storage_uri="/scratch/runs")
    assert not builders.render_config(job, outside).storage.shared
    assert not builders.render_config(job, dataclasses.replace(SETTINGS, runs_pvc=None)).storage.shared
    s3_job = example("125m-pretrain-8k")
    assert not builders.render_config(s3_job, SETTINGS).storage.shared


@pytest.mark.parametrize(
    "uri", ["/scratch/runs", "/", "/var", "/runsx/a", "/runs/../var", "/etc/../var/runs"]
)
def test_a_storage_path_outside_the_runs_mount_is_an_invalid_spec(uri):
    """Outside the runs volume a run writes to its container's own disk and is lost with the pod."""
    job = example("tiny-cpu", storageUri=uri)
    with pytest.raises(SpecError) as err:
        builders.render_config(job, SETTINGS)
    assert err.value.field == "spec.storageUri"
    assert f"'{uri}'" in err.value.message and f"'{SETTINGS.runs_mount}'" in err.value.message
    todo = decide(job, [], config=err.value)
    assert todo.create is None and todo.status["phase"] == "Failed"
    created = next(c for c in todo.status["conditions"] if c["type"] == "Created")
    assert (created["status"], created["reason"]) == ("False", "InvalidSpec")
    assert "spec.storageUri" in todo.status["message"]


@pytest.mark.parametrize("uri", ["/runs", "/runs/", "/runs/team-a", "/runs/a/../b", "s3://bucket/team-a"])
def test_a_storage_path_on_the_runs_mount_or_s3_is_taken(uri):
    job = example("tiny-cpu", storageUri=uri)
    cfg = builders.render_config(job, SETTINGS)
    assert cfg.storage.root == uri and cfg.storage.shared == (not uri.startswith("s3://"))


def test_the_runs_mount_is_the_operators_setting():
    elsewhere = dataclasses.replace(SETTINGS, runs_mount="/mnt/ttt")
    assert builders.render_config(example("tiny-cpu", storageUri="/mnt/ttt/a"), elsewhere).storage.shared
    with pytest.raises(SpecError, match="'/mnt/ttt'"):
        builders.render_config(example("tiny-cpu", storageUri="/runs/a"), elsewhere)
    # The operator's own default root is the chart's to check (helm refuses one outside the mount).
    default_elsewhere = dataclasses.replace(elsewhere, storage_uri="/x")
    assert not builders.render_config(example("tiny-cpu"), default_elsewhere).storage.shared


def test_spec_precedence_recipe_config_overrides_knobs():
    job = example(
        "tiny-cpu",
        config={"train": {"total_steps": 40}, "optim": {"warmup_steps": 4}},
        overrides=["train.total_steps=50", "model.window_size=32"],
        ttt={"windowSize": 128, "miniBatchSize": 64, "seqLen": 512},
        deepspeed={"stage": 1},
    )
    cfg = builders.render_config(job, SETTINGS)
    assert cfg.train.total_steps == 50  # overrides beat config
    assert cfg.optim.warmup_steps == 4  # config beats the recipe
    assert (cfg.model.window_size, cfg.ttt.mini_batch_size, cfg.train.seq_len) == (128, 64, 512)
    assert cfg.scale.zero_stage == 1


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"recipe": "tiny-gpu"}, "spec.recipe", "known: "),
        ({"config": {"model": {"windw_size": 3}}}, "spec.config.model.windw_size", "did you mean"),
        ({"config": {"train": {"total_steps": "many"}}}, "spec.config.train.total_steps", "integer"),
        ({"overrides": ["train.totl_steps=3"]}, "spec.overrides.train.totl_steps", "did you mean"),
        ({"ttt": {"miniBatchSize": 48}}, "spec.ttt.seqLen", "not divisible"),
        (
            {"config": {"train": {"global_batch_size": 3}}, "numNodes": 2},
            "spec.config.train.global_batch_size",
            "split",
        ),
    ],
)
def test_bad_specs_name_the_field(change, field, words):
    with pytest.raises(SpecError) as err:
        builders.render_config(example("tiny-cpu", **change), SETTINGS)
    assert err.value.field == field
    assert words in str(err.value)


def test_config_without_recipe_may_start_from_a_preset():
    job = example("tiny-cpu")
    del job["spec"]["recipe"]
    job["spec"]["config"] = {"preset": "tiny", "train": {"total_steps": 7}, "optim": {"warmup_steps": 1}}
    cfg = builders.render_config(job, SETTINGS)
    assert cfg.train.total_steps == 7 and cfg.model == cfgmod.preset("tiny").model


# -- status -----------------------------------------------------------------------------------------


def rayjob(attempt: int, deployment: str = "", job_status: str = "", **status) -> dict:
    body = {
        "metadata": {"name": f"tiny-cpu-a{attempt}", "labels": {"ttt.dev/attempt": str(attempt)}},
        "status": {"jobDeploymentStatus": deployment, "jobStatus": job_status, **status},
    }
    return body


@pytest.mark.parametrize(
    ("deployment", "job_status", "extra", "expected"),
    [
        ("", "", {}, Outcome.STARTING),
        ("Initializing", "", {}, Outcome.STARTING),
        ("Running", "PENDING", {}, Outcome.STARTING),
        ("Running", "RUNNING", {}, Outcome.RUNNING),
        ("Complete", "SUCCEEDED", {}, Outcome.SUCCEEDED),
        ("Complete", "FAILED", {}, Outcome.FAILED),
        ("Complete", "STOPPED", {}, Outcome.FAILED),
        ("Failed", "", {"reason": "SubmissionFailed"}, Outcome.FAILED),
        ("ValidationFailed", "", {}, Outcome.FAILED),
        ("Failed", "RUNNING", {"reason": "DeadlineExceeded"}, Outcome.TIMED_OUT),
        ("Suspended", "", {}, Outcome.QUEUED),
    ],
)
def test_rayjob_outcome(deployment, job_status, extra, expected):
    assert outcome(rayjob(1, deployment, job_status, **extra)) is expected


def test_condition_transition_time_moves_only_on_change():
    first = set_condition([], "Running", True, "Running", "m", 1, "2026-01-01T00:00:00Z")
    again = set_condition(first, "Running", True, "Running", "m2", 2, "2026-01-02T00:00:00Z")
    flipped = set_condition(again, "Running", False, "Done", "m3", 2, "2026-01-03T00:00:00Z")
    assert again[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and again[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "2026-01-03T00:00:00Z" and flipped[0]["status"] == "False"


def test_exactly_one_phase_condition_is_true():
    conds = phase_conditions([], "Running", "Running", "m", 1, "t0", "job-a1")
    conds = phase_conditions(conds, "Succeeded", "Succeeded", "m", 1, "t1", "job-a1")
    true = {c["type"] for c in conds if c["status"] == "True"}
    assert true == {"Created", "Succeeded"}
    assert next(c for c in conds if c["type"] == "Running")["status"] == "False"
    created = next(c for c in conds if c["type"] == "Created")
    assert (created["reason"], created["lastTransitionTime"]) == ("RayJobCreated", "t0")
    suspended = phase_conditions(conds, "Suspended", "Suspended", "m", 2, "t2", None)
    assert next(c for c in suspended if c["type"] == "Created")["status"] == "False"


def test_progress_status_from_report():
    report = {
        "state": "running",
        "step": 12,
        "total_steps": 300,
        "loss": 2.123456,
        "tokens_per_second": 1234.56,
        "mlflow_run_id": "abc",
        "last_checkpoint": {"step": 10, "uri": "/runs/x/checkpoints/step-10"},
        "updated": "2026-11-29T10:00:00+00:00",
    }
    out = progress_status(report)
    assert out["progress"] == {
        "step": 12,
        "totalSteps": 300,
        "stepOfTotal": "12/300",
        "loss": 2.1235,
        "tokensPerSecond": 1234.6,
        "updated": "2026-11-29T10:00:00Z",
    }
    assert out["mlflowRunId"] == "abc" and out["lastCheckpoint"]["step"] == 10
    assert progress_status(None) == {} and progress_status({"state": "starting"}) == {}
    assert "metrics" not in out  # only a finished run's metrics are final
    done = progress_status({**report, "state": "succeeded", "metrics": {"val/loss": 1.5}})
    assert done["metrics"] == {"val/loss": 1.5, "train/loss": 2.123456}


# -- the reconcile decision -------------------------------------------------------------------------


def decide(job, rayjobs, report=None, config=None):
    config = config if config is not None else builders.render_config(job, SETTINGS)
    run = (builders.run_name(job), builders.storage_path(job, SETTINGS))
    return plan(job, by_attempt(rayjobs), report, config, run, "2026-11-29T12:00:00Z")


def with_status(job, todo):
    job = copy.deepcopy(job)
    job["status"] = {k: v for k, v in todo.status.items() if v is not None}
    return job


def test_first_pass_creates_attempt_one():
    job = example("tiny-cpu")
    todo = decide(job, [])
    assert todo.create == 1 and not todo.delete
    assert todo.status["phase"] == "Pending" and todo.status["rayJobName"] == "tiny-cpu-a1"
    assert todo.status["storagePath"] == "/runs/tiny-cpu-0a1b2c3d"
    assert todo.status["config"] == {"windowSize": 64, "miniBatchSize": 32, "seqLen": 256, "workers": 1}
    assert ("Normal", "Created", "RayJob tiny-cpu-a1 created") in todo.events


def test_same_state_twice_creates_nothing_twice():
    job = example("tiny-cpu")
    job = with_status(job, decide(job, []))
    todo = decide(job, [rayjob(1)])  # the attempt exists: follow it
    assert todo.create is None and todo.status["phase"] == "Pending"
    restarted = example("tiny-cpu")  # an operator that lost the status update still sees attempt 1
    assert decide(restarted, [rayjob(1, "Running", "RUNNING")]).create is None


def test_running_then_succeeded():
    job = example("tiny-cpu")
    running = decide(job, [rayjob(1, "Running", "RUNNING")])
    assert running.status["phase"] == "Running" and running.status["startTime"]
    assert ("Normal", "Running", "attempt 1 training on 1 workers") in running.events
    job = with_status(job, running)
    done = decide(job, [rayjob(1, "Complete", "SUCCEEDED")], report={"step": 300, "total_steps": 300})
    assert done.status["phase"] == "Succeeded" and done.status["completionTime"]
    assert done.status["progress"]["stepOfTotal"] == "300/300"
    assert done.status["startTime"] == job["status"]["startTime"]


def test_failed_attempts_retry_up_to_the_backoff_limit():
    job = example("tiny-cpu", backoffLimit=2)
    failed1 = rayjob(1, "Complete", "FAILED", message="worker died")
    retry = decide(job, [failed1])
    assert retry.create == 2 and retry.status["failedAttempts"] == 1
    assert retry.status["phase"] == "Pending" and retry.status["message"].endswith("(retry 1 of 2)")
    created = retry.status["conditions"][0]
    assert created["type"] == "Created" and "tiny-cpu-a2" in created["message"]
    assert any(kind == "Warning" and reason == "AttemptFailed" for kind, reason, _ in retry.events)
    failed2 = rayjob(2, "Failed", "", reason="AppFailed")
    assert decide(with_status(job, retry), [failed1, failed2]).create == 3
    failed3 = rayjob(3, "Complete", "FAILED")
    final = decide(job, [failed1, failed2, failed3])
    assert final.create is None and final.status["phase"] == "Failed"
    failed = next(c for c in final.status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "BackoffLimitExceeded")
    assert "3 failed attempts" in final.status["message"]


def test_a_preempted_attempt_is_retried_without_counting_against_the_backoff_limit():
    job = example("tiny-cpu", backoffLimit=0)
    stopped = rayjob(1, "Failed", "FAILED", reason="AppFailed", message="exit 75")
    report = {
        "state": "preempted",
        "attempt": 1,
        "step": 41,
        "total_steps": 300,
        "message": "stopped after step 41 (SIGTERM) in 3.2 s; checkpoint: /runs/x/step-00000041.pt",
    }
    retry = decide(job, [stopped], report=report)
    assert retry.create == 2 and retry.status["failedAttempts"] == 0
    assert retry.status["preemptedAttempts"] == [1]
    assert "attempt 1 was stopped after step 41" in retry.status["message"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in retry.status["conditions"]}
    assert conditions["Running"] == ("False", "Preempted") and conditions["Created"][0] == "True"
    assert "Failed" not in conditions
    assert [reason for _, reason, _ in retry.events] == ["Preempted"]  # not AttemptFailed

    # Later the report is the next attempt's; the record of attempt 1 stays in the status.
    job = with_status(job, retry)
    running = {**report, "state": "running", "attempt": 2}
    todo = decide(job, [stopped, rayjob(2, "Running", "RUNNING")], report=running)
    assert todo.status["phase"] == "Running" and todo.status["preemptedAttempts"] == [1]
    # A real failure of attempt 2 still counts: backoffLimit 0 ends the job.
    failed = decide(job, [stopped, rayjob(2, "Complete", "FAILED")], report={**running, "state": "failed"})
    assert (failed.status["phase"], failed.status["failedAttempts"], failed.create) == ("Failed", 1, None)
    # A report of another attempt does not make a failure a preemption.
    stale = decide(example("tiny-cpu", backoffLimit=0), [stopped], report={**report, "attempt": 7})
    assert stale.status["phase"] == "Failed" and stale.create is None


def test_deadline_is_final():
    job = example("tiny-cpu", backoffLimit=5)
    todo = decide(job, [rayjob(1, "Failed", "RUNNING", reason="DeadlineExceeded")])
    assert todo.create is None and todo.status["phase"] == "Failed"


def test_suspend_deletes_the_attempt_and_resume_starts_a_new_one():
    job = example("tiny-cpu", suspend=True)
    running = rayjob(1, "Running", "RUNNING")
    todo = decide(job, [running])
    assert todo.delete == ["tiny-cpu-a1"] and todo.create is None and todo.status["phase"] == "Suspended"
    job = with_status(job, todo)
    job["spec"]["suspend"] = False
    resumed = decide(job, [])
    assert resumed.create == 2 and resumed.status["failedAttempts"] == 0
    assert ("Normal", "Resumed", "RayJob tiny-cpu-a2 created") in resumed.events


def test_invalid_spec_fails_without_creating_and_recovers_when_fixed():
    job = example("tiny-cpu", ttt={"windowSize": 64, "miniBatchSize": 48})
    with pytest.raises(SpecError) as err:
        builders.render_config(job, SETTINGS)
    todo = decide(job, [], config=err.value)
    assert todo.create is None and todo.status["phase"] == "Failed"
    assert "spec.ttt.seqLen" in todo.status["message"] and "config" not in todo.status
    created = next(c for c in todo.status["conditions"] if c["type"] == "Created")
    assert (created["status"], created["reason"]) == ("False", "InvalidSpec")
    job = with_status(job, todo)
    job["spec"]["ttt"]["miniBatchSize"] = 32
    assert decide(job, []).create == 1


def test_a_refused_attempt_keeps_the_attempt_count():
    job = example("tiny-cpu")
    job = with_status(job, decide(job, []))
    job["status"]["attempt"] = 1
    todo = decide(job, [rayjob(1, "Complete", "FAILED")])
    assert todo.create == 2
    status = blocked(job, todo.status, "Failed", "RayJobRejected", "refused: bad label", "t")
    assert (status["phase"], status["attempt"], status["rayJobName"]) == ("Failed", 1, "tiny-cpu-a1")
    created = next(c for c in status["conditions"] if c["type"] == "Created")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert created["status"] == "False" and (failed["status"], failed["reason"]) == ("True", "RayJobRejected")


def test_settings_from_the_environment():
    env = {
        "TTT_OPERATOR_NAMESPACES": " team-a, team-b ,",
        "TTT_STORAGE_URI": "s3://runs/x",
        "TTT_S3_SECRET": "creds",
        "TTT_POLL_SECONDS": "2.5",
        "TTT_RUNS_PVC": "",
    }
    s = Settings.from_env(env)
    assert s.namespaces == ("team-a", "team-b") and s.storage_uri == "s3://runs/x"
    assert (s.s3_secret, s.runs_pvc, s.poll_seconds, s.mlflow_tracking_uri) == ("creds", None, 2.5, None)
    assert Settings.from_env({}).namespaces == ()
    for bad in ("soon", "0"):
        with pytest.raises(UserError, match="TTT_POLL_SECONDS"):
            Settings.from_env({"TTT_POLL_SECONDS": bad})


# -- sweeps -----------------------------------------------------------------------------------------


def tiny_sweep(**spec) -> dict:
    sweep = yaml.safe_load((EXAMPLES / "sweep-tiny-cpu.yaml").read_text())
    sweep["metadata"].update(namespace="research", uid="sweep-uid", generation=1)
    sweep["spec"].update(spec)
    return sweep


def child(index: int, phase: str, objective: float | None = None) -> dict:
    status = {"phase": phase, "mlflowRunId": f"r{index}"}
    if objective is not None:
        status["metrics"] = {"val/loss_past_window": objective, "val/loss": objective + 1}
    return {
        "metadata": {"name": f"tiny-w-b-t{index}", "labels": {"ttt.dev/trial": str(index)}},
        "status": status,
    }


def test_sweep_fills_parallelism_then_waits():
    first = sweeps.plan_sweep(tiny_sweep(parallelism=3), {}, "t")
    assert [j["metadata"]["name"] for j in first.create] == ["tiny-w-b-t0", "tiny-w-b-t1", "tiny-w-b-t2"]
    running = {i: child(i, "Running") for i in range(3)}
    assert sweeps.plan_sweep(tiny_sweep(parallelism=3), running, "t").create == []
    running[1] = child(1, "Failed")
    refill = sweeps.plan_sweep(tiny_sweep(parallelism=3), running, "t")
    assert [j["metadata"]["name"] for j in refill.create] == ["tiny-w-b-t3"]
    assert (refill.status["failed"], refill.status["phase"]) == (1, "Running")


def test_sweep_best_follows_the_goal_and_ignores_failures():
    done = {
        0: child(0, "Succeeded", 2.0),
        1: child(1, "Succeeded", 1.5),
        2: child(2, "Failed"),
        3: child(3, "Succeeded", 3.0),
    }
    low = sweeps.plan_sweep(tiny_sweep(), done, "t").status
    assert (low["phase"], low["best"]["index"], low["succeeded"], low["failed"]) == ("Succeeded", 1, 3, 1)
    high = sweeps.plan_sweep(
        tiny_sweep(objective={"metric": "val/loss", "goal": "maximize"}), done, "t"
    ).status
    assert (high["best"]["index"], high["best"]["objective"], high["best"]["metric"]) == (3, 4.0, "val/loss")
    failed = sweeps.plan_sweep(tiny_sweep(), {i: child(i, "Failed") for i in range(4)}, "t").status
    assert failed["phase"] == "Failed" and failed["best"] is None


def test_sweep_trial_spec_uses_knobs_and_overrides():
    sweep = tiny_sweep(
        parameters=[{"name": "model.window_size", "values": [64]}, {"name": "optim.lr", "values": [0.002]}]
    )
    (job,) = sweeps.plan_sweep(sweep, {}, "t").create
    assert job["spec"]["ttt"]["windowSize"] == 64 and job["spec"]["overrides"][-1] == "optim.lr=0.002"
    assert job["metadata"]["ownerReferences"][0] == {
        "apiVersion": "ttt.dev/v1alpha1",
        "kind": "TTTSweep",
        "name": "tiny-w-b",
        "uid": "sweep-uid",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    cfg = builders.render_config({**job, "metadata": {**job["metadata"], "uid": UID}}, SETTINGS)
    assert (cfg.model.window_size, cfg.optim.lr, cfg.train.total_steps) == (64, 0.002, 150)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"parameters": [{"name": "model.windw_size", "values": [1]}]}, "spec.parameters[0].name"),
        ({"maxTrials": 2}, "spec.maxTrials"),
        ({"template": {"recipe": "tiny-cpu", "ttt": {"seqLen": 100}}}, "spec.template.ttt.seqLen"),
    ],
)
def test_invalid_sweep_fails_naming_the_field(change, words):
    out = sweeps.plan_sweep(tiny_sweep(**change), {}, "t")
    assert out.create == [] and out.status["phase"] == "Failed"
    assert out.status["message"].startswith(words), out.status["message"]
