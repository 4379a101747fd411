"""What MLflow users expect of a training run: its model logged (load_model, `mlflow models serve`),
system metrics, source and user tags; against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from gunn.train.engine import train
from gunn.train.tracking.journal import JOURNAL_NAME, MODEL_DIR_NAME, Journal
from tests.mlflow_server import QUIET_MLFLOW, REPO_ROOT, free_port, wait_for
from tests.train.test_engine import small

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in QUIET_MLFLOW.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _mlflow(server, experiment: str) -> tuple[str, ...]:
    return (f"logging.tracking_uri={server.uri}", "logging.mlflow=true", "logging.model=true", f"logging.experiment={experiment}")


def _logged_models(client, run) -> list:
    return list(client.search_logged_models([run.info.experiment_id],
                                            filter_string=f"source_run_id = '{run.info.run_id}'"))


def _example_and_expected(run_dir: Path, trained: torch.nn.Module) -> tuple[np.ndarray, torch.Tensor]:
    """The logged model's input example and what the trained network gives for it."""
    from mlflow.models import Model

    model_dir = run_dir / MODEL_DIR_NAME
    example = Model.load(str(model_dir / "MLmodel")).load_input_example(str(model_dir))
    trained = trained.eval().float().to("cpu", memory_format=torch.contiguous_format)
    with torch.no_grad():
        expected = trained(torch.from_numpy(example))
    return example, expected


def _serve(model_uri: str, tracking_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **QUIET_MLFLOW, "MLFLOW_TRACKING_URI": tracking_uri,
           # It runs `uvicorn` from PATH, as from an activated virtualenv.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=log.parent, env=env, stdout=out, stderr=out, start_new_session=True,
        )
    return process, f"http://127.0.0.1:{port}"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_a_finished_run_logs_its_model_system_metrics_and_source_and_the_model_loads_and_serves(
    server, tmp_path, monkeypatch
):
    import mlflow.pytorch
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    result = train(small(tmp_path, *_mlflow(server, "model-logged"), "optim.epochs=2"))
    client = MlflowClient(server.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"

    tags = run.data.tags
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == str(Path(sys.argv[0]).resolve())  # pytest's, here
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/disk_usage_percentage", "system/network_receive_megabytes"} <= system, system
    assert 0 < run.data.metrics["system/system_memory_usage_megabytes"]

    (model,) = _logged_models(client, run)
    assert (model.name, model.status, model.source_run_id) == ("model", LoggedModelStatus.READY, run.info.run_id)
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 2)]
    assert model.params["model.name"] == "gunn_tiny" and model.tags["mlflow.user"] == getpass.getuser()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_top1_error")] == [1, 2]

    example, expected = _example_and_expected(result.run_dir, result.model)
    assert example.shape == (2, 3, 16, 16) and example.dtype == np.float32
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    for uri in (f"runs:/{run.info.run_id}/model", f"models:/{model.model_id}"):
        loaded = mlflow.pytorch.load_model(uri)
        with torch.no_grad():
            got = loaded(torch.from_numpy(example))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=uri)
        other = torch.randn(5, 3, 16, 16)  # any batch size
        assert loaded(other).shape == (5, 4)

    process, url = _serve(f"models:/{model.model_id}", server.uri, tmp_path / "serve.log")
    try:
        wait_for(lambda: _answers(url) or process.poll() is not None, 120, "mlflow models serve to answer")
        assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        body = (result.run_dir / MODEL_DIR_NAME / "serving_input_example.json").read_bytes()
        request = urllib.request.Request(f"{url}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the workers it started, all in its session
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    torch.testing.assert_close(torch.tensor(predictions), expected, rtol=1e-5, atol=1e-5)


def test_system_metrics_and_the_model_can_be_turned_off(server, tmp_path):
    from mlflow.tracking import MlflowClient

    result = train(small(tmp_path, *_mlflow(server, "model-off"), "optim.epochs=1", "logging.system_metrics=false",
                         "logging.model=false"))
    client = MlflowClient(server.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and "eval_top1_error" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("system/")]
    assert _logged_models(client, run) == [] and not (result.run_dir / MODEL_DIR_NAME).exists()
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= set(run.data.tags)


@pytest.mark.slow
def test_a_run_whose_server_was_down_at_the_end_gets_its_model_from_sync(server, tmp_path, caplog, monkeypatch):
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    args = (*_mlflow(server, "model-outage"), "optim.epochs=2")
    first = train(small(tmp_path, *args), stop_after=9)  # epoch 1 logged, with system metrics; interrupted
    assert first.status == "interrupted" and first.mlflow_run_id
    server.stop()
    with caplog.at_level(logging.WARNING):
        second = train(small(tmp_path, *args))
    assert second.status == "finished" and second.mlflow_run_id == first.mlflow_run_id
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(
        ("gunn", "mlflow"))]
    assert len(warned) == 2, warned  # that the server is unreachable, and what is left unsent at the end
    assert "unreachable" in warned[0] and "python -m gunn.train.tracking sync" in warned[1]
    run_dir = second.run_dir
    journal = Journal(run_dir / JOURNAL_NAME)
    (record,) = [r for r in journal.work if r["op"] == "model"]
    assert record["seq"] not in journal.sent and record["step"] == 2

    server.start()
    for _ in range(2):  # sent once, however often sync runs
        synced = subprocess.run([sys.executable, "-m", "gunn.train.tracking", "sync", str(run_dir)], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=120)
        assert synced.returncode == 0, synced.stderr
    client = MlflowClient(server.uri)
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    (model,) = _logged_models(client, run)
    example, expected = _example_and_expected(run_dir, second.model)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    with torch.no_grad():
        got = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")(torch.from_numpy(example))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
