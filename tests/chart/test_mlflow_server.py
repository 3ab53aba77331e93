"""The chart's MLflow server: every ci/ values file lints and renders into valid objects, SQLite under
parallel sweeps is warned about and impossible replica counts are refused, the db-upgrade initContainer
really migrates (an empty and an old database) before the real server starts, and basic-auth works as the
chart wires it.

The real-process tests run the commands the chart renders, with the venv's `mlflow`: the volume's mount
path is replaced by a temp folder, `$(VAR)` is expanded from the container's env as the kubelet does, and
the server binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.chart.helm import CHART, KUBE_VERSIONS, RELEASE, Helm

CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
POSTGRES_VALUES = CHART / "ci" / "postgres-values.yaml"
AUTH_VALUES = CHART / "ci" / "auth-values.yaml"
MLFLOW = f"{RELEASE}-ttt-platform-mlflow"
VENV_BIN = Path(sys.executable).parent
# An MLflow schema many migrations old: MLflow's own initial tables and migrations up to the first trace
# tables, which is what a release of that time created.
OLD_REVISION = "867495a8f9d4"
OLD_RUN = "0123456789abcdef0123456789abcdef"
SQLITE_WARNING = "SQLite takes one writer at a time"


def the(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def mlflow_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return the(objects, "Deployment", MLFLOW)["spec"]["template"]["spec"]


def arg_after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# ---------- the ci/ values files ----------


def test_a_ci_values_file_keeps_mlflow_runs_in_postgresql() -> None:
    backends = {
        path.name: (yaml.safe_load(path.read_text()).get("mlflow") or {}).get("backendStore") or {}
        for path in CI_VALUES
    }
    assert backends["postgres-values.yaml"]["existingSecret"] == "mlflow-db"
    # The file says how to make the Secret, with a postgresql:// URI.
    assert "--from-literal=uri='postgresql://" in POSTGRES_VALUES.read_text()


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda path: path.stem)
def test_ci_values_lint_strict_and_match_the_schema(helm: Helm, values: Path) -> None:
    result = helm.run("lint", str(CHART), "--strict", "-f", str(values))
    assert result.returncode == 0 and "0 chart(s) failed" in result.stdout, result.stdout + result.stderr
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load(values.read_text()))


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda path: path.stem)
def test_ci_values_render_objects_that_pass_kubernetes_schemas(
    helm: Helm, values: Path, kube_version: str
) -> None:
    for obj in helm.render("-f", str(values), "--include-crds"):
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(
                f"{values.name}: {obj['kind']} {obj['metadata']['name']} ({kube_version}): {error.message}"
            )


def test_postgres_values_wire_the_secret_into_server_and_migration(helm: Helm) -> None:
    pod = mlflow_pod(helm.render("-f", str(POSTGRES_VALUES)))
    (server,) = pod["containers"]
    (upgrade,) = pod["initContainers"]
    secret = {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}
    for container in (server, upgrade):
        env = {var["name"]: var for var in container["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"] == secret
    assert arg_after(server["command"], "--backend-store-uri") == "$(MLFLOW_BACKEND_STORE_URI)"
    assert upgrade["command"] == ["mlflow", "db", "upgrade", "$(MLFLOW_BACKEND_STORE_URI)"]
    assert arg_after(server["command"], "--workers") == "4"
    # Artifacts stay on the volume; the database does not need it, so the migration does not mount it.
    assert {"name": "data", "mountPath": "/mlflow"} in server["volumeMounts"]
    assert [mount["name"] for mount in upgrade["volumeMounts"]] == ["tmp"]


# ---------- SQLite under parallel sweeps ----------


def test_notes_warn_about_sqlite_under_parallel_sweeps(helm: Helm) -> None:
    default = helm.notes()
    assert SQLITE_WARNING in default
    assert "The server's 2 workers write to it concurrently" in default
    assert '"database is locked"' in default
    assert "mlflow.backendStore.existingSecret" in default and "ci/postgres-values.yaml" in default
    one_worker = helm.notes("--set", "mlflow.workers=1")
    assert SQLITE_WARNING in one_worker and "workers write" not in one_worker
    for values in (POSTGRES_VALUES, AUTH_VALUES):
        assert SQLITE_WARNING not in helm.notes("-f", str(values))
    external = (
        "--set",
        "mlflow.enabled=false",
        "--set",
        "mlflow.external.trackingUri=https://mlflow.example.com",
    )
    assert SQLITE_WARNING not in helm.notes(*external)


def test_values_yaml_warns_about_sqlite_next_to_the_settings() -> None:
    text = (CHART / "values.yaml").read_text()
    workers = text[: text.index("  workers:")].rsplit("\n  # --", 1)[1]
    backend = text[: text.index("  backendStore:")].rsplit("\n  # Database", 1)[1]
    for comment in (workers, backend):
        assert '"database is locked"' in comment, comment


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "mlflow.replicas=2"], "mlflow.replicas=2: the default backend store is one sqlite file"),
        (
            ["-f", str(AUTH_VALUES), "--set", "mlflow.replicas=3"],
            "mlflow.replicas=3 with mlflow.auth.enabled: the basic-auth users are a sqlite file",
        ),
        (
            ["-f", str(POSTGRES_VALUES), "--set", "mlflow.replicas=2"],
            "mlflow.replicas=2: every replica mounts the MLflow volume for local artifacts, and a "
            "ReadWriteOnce volume cannot be mounted on several nodes",
        ),
        (
            ["--set", "mlflow.auth.enabled=true"],
            "mlflow.auth.existingSecret is required when mlflow.auth.enabled is true",
        ),
    ],
    ids=["sqlite", "auth-users-in-sqlite", "local-artifacts-rwo", "auth-without-secret"],
)
def test_mlflow_settings_that_cannot_work_fail(helm: Helm, values: list[str], message: str) -> None:
    assert message in helm.error(*values)


@pytest.mark.parametrize(
    "values",
    [
        ["-f", str(CHART / "ci" / "external-values.yaml"), "--set", "mlflow.replicas=3"],
        [
            "-f",
            str(POSTGRES_VALUES),
            "--set",
            "mlflow.replicas=2",
            "--set",
            "mlflow.persistence.accessMode=ReadWriteMany",
        ],
    ],
    ids=["postgres-and-s3", "postgres-and-rwx-volume"],
)
def test_several_mlflow_replicas_with_postgresql(helm: Helm, values: list[str]) -> None:
    objects = helm.render(*values)
    deployment = the(objects, "Deployment", MLFLOW)
    assert deployment["spec"]["replicas"] > 1
    # No server of the old image runs while the new pods migrate the schema.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)


# ---------- the db-upgrade initContainer ----------


@pytest.mark.parametrize(
    "values", [[], ["-f", str(CHART / "ci" / "external-values.yaml")]], ids=["sqlite", "external"]
)
def test_db_upgrade_runs_the_servers_image_on_the_servers_database(helm: Helm, values: list[str]) -> None:
    pod = mlflow_pod(helm.render(*values))
    (server,) = pod["containers"]
    (upgrade,) = pod["initContainers"]
    assert upgrade["name"] == "db-upgrade"
    assert (upgrade["image"], upgrade["imagePullPolicy"]) == (server["image"], server["imagePullPolicy"])
    assert upgrade["command"][:3] == ["mlflow", "db", "upgrade"]
    assert upgrade["command"][3] == arg_after(server["command"], "--backend-store-uri")
    assert upgrade["securityContext"] == server["securityContext"]
    server_mounts = {mount["name"]: mount for mount in server["volumeMounts"]}
    for mount in upgrade["volumeMounts"]:
        assert server_mounts[mount["name"]] == mount
    if not values:
        assert {"name": "data", "mountPath": "/mlflow"} in upgrade["volumeMounts"]


def test_db_upgrade_can_be_turned_off(helm: Helm) -> None:
    pod = mlflow_pod(helm.render("--set", "mlflow.backendStore.upgradeSchema=false"))
    assert "initContainers" not in pod


# ---------- running what the chart renders ----------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Local:
    """A rendered container's command and environment, made runnable here."""

    command: list[str]
    env: dict[str, str]


def localize(
    container: dict[str, Any], paths: dict[str, Path], secrets: dict[tuple[str, str], str], home: Path
) -> Local:
    """Mount paths → temp folders, Secret keys → the given values, `$(VAR)` expanded as the kubelet does,
    `mlflow` → the venv's."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
        else:
            env[var["name"]] = var["value"]
    env["HOME"] = str(home)

    def local(text: str) -> str:
        for mount, folder in paths.items():
            text = text.replace(f"{mount}/", f"{folder}/")
        return text

    env = {name: local(value) for name, value in env.items()}
    command = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], local(arg)) for arg in container["command"]]
    assert command[0] == "mlflow"
    command[0] = str(VENV_BIN / "mlflow")
    base = {name: os.environ[name] for name in ("PATH", "LANG", "PYTHONPATH") if name in os.environ}
    return Local(command, {**base, "TMPDIR": str(home), **env})


def run_db_upgrade(pod: dict[str, Any], paths, secrets, home: Path) -> subprocess.CompletedProcess[str]:
    (upgrade,) = pod["initContainers"]
    local = localize(upgrade, paths, secrets, home)
    result = subprocess.run(
        local.command, env=local.env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


class Server:
    """The rendered `mlflow server` command on 127.0.0.1 and a free port, stopped by its process group."""

    def __init__(self, pod: dict[str, Any], paths, secrets, home: Path) -> None:
        (container,) = pod["containers"]
        local = localize(container, paths, secrets, home)
        command = local.command
        self.port = free_port()
        command[command.index("--host") + 1] = "127.0.0.1"
        command[command.index("--port") + 1] = str(self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "server.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, env=local.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_healthy(self, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"mlflow server exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"mlflow server did not answer /health in {seconds} s:\n{self.log.read_text()[-3000:]}")

    def call(self, method: str, path: str, body: dict | None = None, auth: tuple[str, str] | None = None):
        """(status, decoded JSON or text) of one REST call."""
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"},
        )
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def stop(self) -> None:
        """SIGTERM to the server's process group, then SIGKILL to what is left of it (workers, job
        consumers)."""
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def servers():
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def test_rendered_db_upgrade_creates_a_fresh_sqlite_database_and_the_server_answers(
    helm: Helm, tmp_path: Path, servers: list[Server]
) -> None:
    pod = mlflow_pod(helm.render())
    volume = tmp_path / "volume"
    volume.mkdir()
    paths = {"/mlflow": volume}
    result = run_db_upgrade(pod, paths, {}, tmp_path)
    # `mlflow db upgrade` on a file that does not exist yet: it creates every table.
    assert "Creating initial MLflow database tables" in result.stderr, result.stderr
    assert (volume / "mlflow.db").is_file()

    server = Server(pod, paths, {}, tmp_path)
    servers.append(server)
    server.wait_healthy()
    status, body = server.call("POST", "/api/2.0/mlflow/experiments/create", {"name": "sweep"})
    assert status == 200, body
    status, body = server.call(
        "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": body["experiment_id"]}
    )
    assert status == 200, body
    run_id = body["run"]["info"]["run_id"]
    metric = {"run_id": run_id, "key": "loss", "value": 0.5, "timestamp": 1, "step": 3}
    assert server.call("POST", "/api/2.0/mlflow/runs/log-metric", metric)[0] == 200
    status, body = server.call("GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}")
    assert body["run"]["data"]["metrics"] == [{"key": "loss", "value": 0.5, "timestamp": 1, "step": 3}]
    # The server found the schema the initContainer made: it did not create or migrate tables itself.
    assert "Creating initial MLflow database tables" not in server.log.read_text()


OLD_SCHEMA = """
import sys
from pathlib import Path

import mlflow
import sqlalchemy
from alembic import command
from alembic.config import Config
from mlflow.store.tracking.dbmodels.initial_models import Base

url, revision = sys.argv[1:]
migrations = Path(mlflow.__file__).parent / "store" / "db_migrations"
engine = sqlalchemy.create_engine(url)
Base.metadata.create_all(engine)
config = Config(str(migrations / "alembic.ini"))
config.set_main_option("script_location", str(migrations))
config.set_main_option("sqlalchemy.url", url)
with engine.begin() as connection:
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
"""


def schema_head() -> str:
    import mlflow
    from alembic.script import ScriptDirectory

    (head,) = ScriptDirectory(str(Path(mlflow.__file__).parent / "store" / "db_migrations")).get_heads()
    return head


def test_rendered_db_upgrade_migrates_an_old_schema_and_keeps_its_runs(helm: Helm, tmp_path: Path) -> None:
    """A database as an older MLflow left it: MLflow's initial tables and its migrations only up to
    OLD_REVISION (built with MLflow's own migration scripts, not a relabelled current schema), holding an
    experiment and a run. The rendered initContainer (Secret-based, as with PostgreSQL; the Secret's URI
    points at the file) brings it to the current schema and MLflow then reads the old run."""
    database = tmp_path / "old.db"
    uri = f"sqlite:///{database}"
    subprocess.run([sys.executable, "-c", OLD_SCHEMA, uri, OLD_REVISION], check=True, timeout=120)
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(OLD_REVISION,)]
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "logged_models" not in tables and "spans" not in tables  # newer MLflow's tables
        db.execute(
            "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, creation_time,"
            " last_update_time) VALUES (1, 'old-sweep', ?, 'active', 1000, 1000)",
            (str(tmp_path / "artifacts" / "1"),),
        )
        db.execute(
            "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status,"
            " start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id)"
            " VALUES (?, 'trial-0', 'LOCAL', '', '', 'ttt', 'FINISHED',"
            " 1000, 2000, '', 'active', ?, 1)",
            (OLD_RUN, str(tmp_path / "artifacts" / "1" / "run")),
        )
        db.execute(
            "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan)"
            " VALUES ('loss', 0.25, 1500, ?, 7, 0)",
            (OLD_RUN,),
        )
        db.execute(
            "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)"
            " VALUES ('loss', 0.25, 1500, 7, 0, ?)",
            (OLD_RUN,),
        )
        db.execute(
            "INSERT INTO params (key, value, run_uuid) VALUES ('lr', '0.001', ?)",
            (OLD_RUN,),
        )
    db.close()

    pod = mlflow_pod(helm.render("-f", str(POSTGRES_VALUES)))
    result = run_db_upgrade(pod, {"/mlflow": tmp_path}, {("mlflow-db", "uri"): uri}, tmp_path)
    assert "Creating initial MLflow database tables" not in result.stderr  # an upgrade, not a fresh start
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(schema_head(),)]
    db.close()

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(uri, str(tmp_path / "artifacts"))  # verifies the schema, as the server does
    try:
        experiment = store.get_experiment_by_name("old-sweep")
        run = store.get_run(OLD_RUN)
        assert (experiment.experiment_id, run.info.run_name, run.info.status) == ("1", "trial-0", "FINISHED")
        assert run.data.metrics == {"loss": 0.25} and run.data.params == {"lr": "0.001"}
        assert [(m.step, m.value) for m in store.get_metric_history(run.info.run_id, "loss")] == [(7, 0.25)]
    finally:
        store.engine.dispose()


# ---------- basic-auth ----------


def test_auth_values_render_the_basic_auth_app(helm: Helm) -> None:
    objects = helm.render("-f", str(AUTH_VALUES))
    config = the(objects, "ConfigMap", f"{MLFLOW}-auth")["data"]["basic_auth.ini"]
    assert "default_permission = READ" in config and "admin_username = admin" in config
    assert "database_uri = sqlite:////mlflow/basic_auth.db" in config
    assert "password" not in config  # the admin password comes from the Secret
    pod = mlflow_pod(objects)
    (server,) = pod["containers"]
    assert arg_after(server["command"], "--app-name") == "basic-auth"
    env = {var["name"]: var for var in server["env"]}
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"
    for name, key in (
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
    ):
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-auth", "key": key}}
    assert {"name": "auth-config", "mountPath": "/etc/mlflow-auth", "readOnly": True} in server[
        "volumeMounts"
    ]
    assert {"name": "data", "mountPath": "/mlflow"} in server["volumeMounts"]  # the users' sqlite file
    the(objects, "PersistentVolumeClaim", MLFLOW)
    annotations = the(objects, "Deployment", MLFLOW)["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/auth-config"])
    # Probes and the `helm test` hook ask /health, which basic-auth leaves open.
    assert all(server[probe]["httpGet"]["path"] == "/health" for probe in ("startupProbe", "livenessProbe"))
    operator = the(objects, "Deployment", f"{RELEASE}-ttt-platform-operator")["spec"]["template"]["spec"]
    operator_env = {var["name"]: var for var in operator["containers"][0]["env"]}
    assert operator_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-client"
    # The chart's MLflow image has the basic-auth app's dependency.
    dockerfile = (CHART.parents[1] / "infra" / "mlflow.Dockerfile").read_text()
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in dockerfile


def test_rendered_basic_auth_server_needs_credentials(
    helm: Helm, tmp_path: Path, servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    import flask_wtf  # noqa: F401  (basic-auth needs mlflow's `auth` extra, in the dev extra: fail, never skip)

    objects = helm.render("-f", str(AUTH_VALUES))
    pod = mlflow_pod(objects)
    volume, config_dir = tmp_path / "volume", tmp_path / "auth-config"
    volume.mkdir()
    config_dir.mkdir()
    paths = {"/mlflow": volume, "/etc/mlflow-auth": config_dir}
    ini = the(objects, "ConfigMap", f"{MLFLOW}-auth")["data"]["basic_auth.ini"]
    (config_dir / "basic_auth.ini").write_text(ini.replace("sqlite:////mlflow/", f"sqlite:///{volume}/"))
    admin_password = "admin-Passw0rd-for-tests"
    secrets = {
        ("mlflow-db", "uri"): f"sqlite:///{volume}/mlflow.db",
        ("mlflow-auth", "admin-password"): admin_password,
        ("mlflow-auth", "flask-secret-key"): "0123456789abcdef" * 4,
    }
    run_db_upgrade(pod, paths, secrets, tmp_path)
    server = Server(pod, paths, secrets, tmp_path)
    servers.append(server)
    server.wait_healthy()  # /health needs no credentials

    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert server.call("GET", search)[0] == 401
    assert server.call("GET", search, auth=("admin", "wrong-password"))[0] == 401
    assert server.call("GET", search, auth=("admin", admin_password))[0] == 200
    assert (volume / "basic_auth.db").is_file()

    # The admin creates the platform's user; a client with MLFLOW_TRACKING_USERNAME/PASSWORD (what the
    # operator and the training pods get from a Secret) then logs.
    user = {"username": "ttt", "password": "ttt-Passw0rd-for-tests"}
    status, body = server.call("POST", "/api/2.0/mlflow/users/create", user, auth=("admin", admin_password))
    assert status == 200, body
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user["username"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user["password"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(tracking_uri=server.url)
    experiment_id = client.create_experiment("authenticated-sweep")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 1.5, step=1)
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 1.5}
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(Exception, match=r"401|Unauthorized|credentials"):
        MlflowClient(tracking_uri=server.url).get_experiment(experiment_id)
