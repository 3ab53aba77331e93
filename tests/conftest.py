"""Fixtures: the golden reference from the official implementation, and a real MLflow server (shared by the
integration and Kubernetes tests)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.helpers import GOLDEN
from tests.integration.faults import MlflowServer
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
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()
