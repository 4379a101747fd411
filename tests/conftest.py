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


@pytest.fixture
def server(mlflow_server: MlflowServer) -> MlflowServer:
    """The shared server, running at the start of the test (a test may stop and restart it)."""
    if not mlflow_server.running:
        mlflow_server.start()
    return mlflow_server




# The running Slurm development cluster (skips without one, fails under CI=true).
from tests.slurm.conftest import slurm_cluster  # noqa: E402,F401
