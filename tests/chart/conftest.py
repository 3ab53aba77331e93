from __future__ import annotations

import pytest

from tests.chart.helm import Helm


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    try:
        return Helm.offline(tmp_path_factory.mktemp("helm-home"))
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
