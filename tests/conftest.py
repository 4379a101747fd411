"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gunn.train.device import set_tf32
from tests.mlflow_server import MlflowServer
from tests.reference import DEVICE

if DEVICE.type == "cuda":
    # The tests compare paths to tight tolerances: full float32 matrix products and convolutions
    # (training turns TF32 on: runtime.tf32).
    set_tf32(False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


# The fixtures that make a test need a running service, and the marker each gives it.
SERVICE_MARKERS = {"slurm_cluster": "slurm", "mlflow_server": "mlflow_server", "server": "mlflow_server"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the tests that need the Slurm cluster (``slurm``) or an MLflow server (``mlflow_server``) as such,
    and every one of them ``slow``: ``python -m pytest -m "not slow"`` is the developers' inner loop."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for marker in {SERVICE_MARKERS[name] for name in names & SERVICE_MARKERS.keys()}:
            item.add_marker(marker)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def server(mlflow_server: MlflowServer) -> MlflowServer:
    """The shared server, running at the start of the test (a test may stop and restart it)."""
    if not mlflow_server.running:
        mlflow_server.start()
    return mlflow_server


# The running Slurm development cluster (skips without one, fails under CI=true).
from tests.slurm.conftest import slurm_cluster  # noqa: E402,F401
