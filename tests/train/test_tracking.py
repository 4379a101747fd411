"""MLflow tracking: against a real `mlflow server` on 127.0.0.1 that the tests stop and restart."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from gunn.train.tracking import JOURNAL_NAME, Tracker, plot_curves, sync, sync_command
from tests.mlflow_server import QUIET_MLFLOW, REPO_ROOT, MlflowServer, wait_for
from tests.train.full_disk import fill, small_tmpfs

# MLflow's own SQLAlchemy code warns about a deprecated loader strategy; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in QUIET_MLFLOW.items():
        monkeypatch.setenv(name, value)
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    ):
        monkeypatch.delenv(name, raising=False)


def _tracker(run_dir: Path, uri: str | None, **kwargs) -> Tracker:
    return Tracker(
        run_dir=run_dir,
        tracking_uri=uri,
        experiment="gunn-tests",
        run_name=run_dir.name,
        params={"optim": {"lr": 0.1}, "model.name": "gunn15"},
        tags={"preset": "test"},
        **kwargs,
    )


def _run_sync(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gunn.train.tracking", "sync", str(run_dir)],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _steps(uri: str, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _journal_run_id(run_dir: Path, uri: str) -> str | None:
    from gunn.train.tracking import _Journal

    return _Journal(run_dir / JOURNAL_NAME).runs.get(uri)


def _tracking_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gunn.train.tracking" and r.levelno >= logging.WARNING]


def test_params_metrics_and_artifact_reach_the_server(server: MlflowServer, tmp_path: Path) -> None:
    artifact = tmp_path / "curves.txt"
    artifact.write_text("epoch 1\n")
    tracker = Tracker(
        run_dir=tmp_path / "run",
        tracking_uri=server.uri,
        experiment="gunn-tests",
        run_name="r1",
        params={"optim": {"lr": 0.1}, "data.root": "x" * 7000},
        tags={"preset": "test"},
    )
    assert tracker.run_id is not None
    tracker.log_metrics({"train_loss": 1.0, "eval_top1_error": 0.5}, step=1)
    tracker.log_metrics({"train_loss": 0.5, "eval_top1_error": 0.25}, step=2)
    tracker.log_artifact(artifact)
    tracker.set_tags({"best_epoch": "2"})
    tracker.finish()

    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["optim.lr"] == "0.1"
    assert run.data.params["data.root"] == "x" * 6000
    assert run.data.tags["gunn.truncated_params"] == "data.root"
    assert run.data.tags["preset"] == "test" and run.data.tags["best_epoch"] == "2"
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert [m.value for m in sorted(client.get_metric_history(tracker.run_id, "train_loss"), key=lambda m: m.step)] == [
        1.0,
        0.5,
    ]
    assert [f.path for f in client.list_artifacts(tracker.run_id)] == ["curves.txt"]


def test_second_tracker_on_the_same_run_dir_continues_the_run(server: MlflowServer, tmp_path: Path) -> None:
    first = _tracker(tmp_path / "run", server.uri)
    first.log_metrics({"train_loss": 1.0}, step=1)
    first.finish("KILLED")
    second = _tracker(tmp_path / "run", server.uri)
    second.log_metrics({"train_loss": 0.5}, step=2)
    second.finish()

    assert second.run_id == first.run_id
    assert _steps(server.uri, first.run_id) == [1, 2]
    assert MlflowClient(server.uri).get_run(first.run_id).info.status == "FINISHED"


def test_server_stopped_mid_run_costs_one_warning_and_sync_sends_the_rest(
    server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gunn.train.tracking")
    run_dir = tmp_path / "run"
    tracker = _tracker(run_dir, server.uri, drain_timeout=3.0)
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    wait_for(lambda: _steps(server.uri, tracker.run_id) == [1], 10, "step 1 on the server")

    server.stop()
    slowest = 0.0
    for step in range(2, 8):
        start = time.monotonic()
        tracker.log_metrics({"train_loss": 1.0 / step}, step=step)
        slowest = max(slowest, time.monotonic() - start)
        if step == 4:
            wait_for(lambda: _tracking_warnings(caplog), 15, "the outage warning")
            wait_for(
                lambda: any("still unreachable" in r.getMessage() for r in caplog.records),
                15,
                "the sender to retry and fail again",
            )
    assert slowest < 0.2
    outage_warnings = _tracking_warnings(caplog)
    assert len(outage_warnings) == 1 and "unreachable" in outage_warnings[0]

    start = time.monotonic()
    tracker.finish()
    assert time.monotonic() - start < 3.5
    final_warning = _tracking_warnings(caplog)[-1]
    assert f"python -m gunn.train.tracking sync {run_dir.resolve()}" in final_warning

    server.start()
    first = _run_sync(run_dir)
    assert first.returncode == 0, first.stderr
    assert "sent 7 call(s)" in first.stdout  # steps 2-7 and the finish
    assert _steps(server.uri, tracker.run_id) == [1, 2, 3, 4, 5, 6, 7]
    assert MlflowClient(server.uri).get_run(tracker.run_id).info.status == "FINISHED"

    second = _run_sync(run_dir)
    assert second.returncode == 0, second.stderr
    assert "sent 0 call(s)" in second.stdout
    assert _steps(server.uri, tracker.run_id) == [1, 2, 3, 4, 5, 6, 7]


def test_server_unreachable_from_the_start_then_sync_creates_the_run(server: MlflowServer, tmp_path: Path) -> None:
    server.stop()
    run_dir = tmp_path / "run"
    start = time.monotonic()
    tracker = _tracker(run_dir, server.uri, drain_timeout=1.0)
    assert time.monotonic() - start < 5
    assert tracker.run_id is None
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    tracker.log_metrics({"train_loss": 0.5}, step=2)
    tracker.finish()
    assert (run_dir / JOURNAL_NAME).read_text().count('"op": "metrics"') == 2

    server.start()
    assert sync(run_dir) == (5, 0)  # start, params, 2 metrics, finish
    run_id = _journal_run_id(run_dir, server.uri)
    run = MlflowClient(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.1"
    assert _steps(server.uri, run_id) == [1, 2]


def test_sending_resumes_in_order_when_the_server_comes_back(server: MlflowServer, tmp_path: Path) -> None:
    server.stop()
    run_dir = tmp_path / "run"
    tracker = _tracker(run_dir, server.uri, retry_interval=0.5)
    for step in (1, 2, 3):
        tracker.log_metrics({"train_loss": 1.0 / step}, step=step)

    server.start()
    wait_for(
        lambda: tracker.run_id is not None and _steps(server.uri, tracker.run_id) == [1, 2, 3],
        20,
        "the queued metrics to reach the restarted server",
    )
    tracker.log_metrics({"train_loss": 0.25}, step=4)
    tracker.finish()
    assert _steps(server.uri, tracker.run_id) == [1, 2, 3, 4]
    assert MlflowClient(server.uri).get_run(tracker.run_id).info.status == "FINISHED"
    assert sync(run_dir) == (0, 0)


def test_default_store_is_the_one_mlflow_ui_opens_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking._tracking_service.utils import _get_default_tracking_uri

    monkeypatch.chdir(tmp_path)
    tracker = _tracker(tmp_path / "run", None)
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    tracker.finish()

    assert _get_default_tracking_uri() == "sqlite:///mlflow.db"  # what `mlflow ui` opens here
    assert tracker.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    run = MlflowClient(_get_default_tracking_uri()).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"train_loss": 1.0}


def test_short_http_retries_apply_only_to_the_sending_thread() -> None:
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    from gunn.train.tracking import _short_http_timeouts

    seen_elsewhere: list[int] = []
    with _short_http_timeouts():
        assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (1, 5)
        other = threading.Thread(target=lambda: seen_elsewhere.append(MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()))
        other.start()
        other.join()
    assert seen_elsewhere == [MLFLOW_HTTP_REQUEST_MAX_RETRIES.default]
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == MLFLOW_HTTP_REQUEST_MAX_RETRIES.default


def test_plot_curves_writes_a_png(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 2.0, "train_top1_error": 0.8, "lr": 0.1},
        {"epoch": 2, "train_loss": 1.5, "train_top1_error": 0.6, "eval_top1_error": 0.65, "lr": 0.01},
    ]
    path = plot_curves(history, tmp_path / "plots" / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_fails_the_journal_clearly_and_leaves_no_partial_line(tmp_path: Path) -> None:
    from gunn.train.tracking import JournalWriteError, _Journal

    with small_tmpfs(tmp_path / "tmpfs") as folder:
        journal = _Journal(folder / JOURNAL_NAME)
        journal.append({"seq": 0, "op": "metrics", "time": 1, "step": 1, "metrics": {"loss": 1.0}})
        before = journal.path.read_bytes()
        fill(folder)
        big = {"seq": 1, "op": "metrics", "time": 2, "step": 2, "metrics": {f"m{i}": 0.5 for i in range(5000)}}
        with pytest.raises(JournalWriteError) as failure:
            journal.append(big)
        assert isinstance(failure.value, OSError) and failure.value.errno == errno.ENOSPC
        assert str(failure.value) == (f"no space left on device while writing the MLflow "
                                      f"journal {journal.path}")
        assert journal.path.read_bytes() == before
        assert [r["seq"] for r in _Journal(journal.path).work] == [0]


# --------------------------------------------------------------------------- concurrent first use

_START_ONE = """
import logging, sys, time
from pathlib import Path
from gunn.train.tracking import Tracker
import mlflow.store.tracking.sqlalchemy_store  # imported before the start line: the processes then start at once

logging.basicConfig(level=logging.WARNING)
folder, index = Path(sys.argv[1]), sys.argv[2]
(folder / f"ready-{index}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
tracker = Tracker(run_dir=folder / f"run-{index}", tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                  experiment="gunn-tests", run_name=f"run-{index}", params={"i": index}, tags={}, start_timeout=120)
tracker.finish()
print("RUN", tracker.run_id)
sys.exit(0 if tracker.run_id else 3)
"""


def test_runs_starting_at_once_on_a_fresh_sqlite_store_all_get_their_run(tmp_path: Path) -> None:
    count = 4
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    processes = [
        subprocess.Popen([sys.executable, "-c", _START_ONE, str(tmp_path), str(i)], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(count)
    ]
    try:
        wait_for(lambda: all((tmp_path / f"ready-{i}").exists() for i in range(count)), 120, "the processes")
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=180) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (out, err) in zip(processes, outputs):
        problems = [line for line in err.splitlines() if " INFO " not in line]  # MLflow says it creates its tables
        assert p.returncode == 0 and not problems, f"exit {p.returncode}\n{out}\n{err}"
    run_ids = {line.split()[1] for out, _ in outputs for line in out.splitlines() if line.startswith("RUN ")}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gunn-tests").experiment_id])
    assert len(run_ids) == count and {r.info.run_id for r in runs} == run_ids


# --------------------------------------------------------------------------- a run created late


def test_a_run_created_after_the_start_timeout_has_its_id_after_finish(server: MlflowServer, tmp_path: Path) -> None:
    server.stop()
    tracker = _tracker(tmp_path / "run", server.uri, start_timeout=0.5, drain_timeout=30.0, retry_interval=60.0)
    assert tracker.run_id is None
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    server.start()
    tracker.finish()  # sends the start, the params, the metrics and the finish while draining
    assert tracker.run_id is not None and tracker.run_id == _journal_run_id(tmp_path / "run", server.uri)
    assert MlflowClient(server.uri).get_run(tracker.run_id).info.status == "FINISHED"
    assert _steps(server.uri, tracker.run_id) == [1]


def test_the_sync_command_names_the_run_directory(tmp_path: Path) -> None:
    assert sync_command(tmp_path / "a b") == f"python -m gunn.train.tracking sync '{tmp_path / 'a b'}'"
