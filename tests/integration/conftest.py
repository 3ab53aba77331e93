"""Real services for integration tests: an `mlflow server` process and a moto S3 server, both on
127.0.0.1, started once per session and stopped by PID; plus a small text dataset."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.integration.services import BIN, ROOT, free_port, stop, wait_for
from ttt.data.corpus import prepare
from ttt.data.tokenizer import ByteTokenizer
from ttt.distributed.launcher import local_only_ray


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Downloads and built corpora go to a temporary cache, not the user's."""
    old = os.environ.get("TTT_CACHE_DIR")
    os.environ["TTT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    yield
    if old is None:
        os.environ.pop("TTT_CACHE_DIR", None)
    else:
        os.environ["TTT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API on 127.0.0.1, with the standard AWS variables pointing at it."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_for(f"http://127.0.0.1:{port}/", proc, seconds=30)
        yield env["AWS_ENDPOINT_URL"]
    finally:
        stop(proc)
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_server, request):
    import boto3

    name = f"ttt-{request.node.name.lower().replace('_', '-')[:40]}-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory) -> str:
    """The project's own Python sources as a byte-level dataset (a few hundred KB)."""
    out = tmp_path_factory.mktemp("data") / "code"
    prepare([str(ROOT / "platform" / "ttt")], str(out), ByteTokenizer(), val_every=5)
    return str(out)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One private Ray cluster for every test that needs one (starting one costs most of a minute here)."""
    local_only_ray()  # loopback only: before Ray is imported
    import ray

    # Workers inherit the environment of ray.init: the S3 endpoint variables must already be set.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
