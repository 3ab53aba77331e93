"""Fixtures: the golden reference from the official implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import GOLDEN
from ttt.config import JobConfig
from ttt.model import official
from ttt.model.transformer import Transformer


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
