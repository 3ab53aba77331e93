"""Fixtures: the golden reference from the official implementation, and a real MLflow server (shared by the
integration and Kubernetes tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import GOLDEN
from tests.integration.services import BIN, free_port, stop, wait_for
from ttt.config import JobConfig
from ttt.model import official
from ttt.model.transformer import Transformer


def pytest_configure(config):
    # Without a GPU the Triton kernels run in Triton's interpreter. The variable is read when the kernel
    # module is imported, which happens on first use, after this hook.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_job(golden) -> tuple[JobConfig, int]:
    return official.config_from_official(str(golden["config_json"]))


@pytest.fixture()
def golden_model(golden, golden_job) -> Transformer:
    model = Transformer(golden_job[0].model)
    official.load_into(model, official.normalize_keys(golden, "param/"))
    return model


@pytest.fixture(scope="session")
def golden_tokens(golden) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(golden["tokens"].astype(np.int64))
    return tokens[:, :-1], tokens[:, 1:]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{base / 'mlflow.db'}",
        "--artifacts-destination",
        str(base / "artifacts"),
    ]
    shm = Path("/dev/shm")
    before = set(shm.iterdir()) if shm.is_dir() else set()
    with open(base / "server.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for(f"http://127.0.0.1:{port}/health", proc, seconds=90)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)
            # The server keeps its job queue in a temporary folder under /dev/shm and leaves it there.
            for folder in (set(shm.iterdir()) - before) if shm.is_dir() else ():
                if any(p.name.endswith(".mlflow-huey-store") for p in folder.iterdir()):
                    shutil.rmtree(folder, ignore_errors=True)
