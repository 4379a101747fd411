"""MLflow tracking: against a real `mlflow server` on 127.0.0.1 that the tests stop and restart."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from gunn.train.tracking import JOURNAL_NAME, Tracker, sync, sync_command
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
    from gunn.train.tracking.journal import Journal

    return Journal(run_dir / JOURNAL_NAME).runs.get(uri)


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


@pytest.mark.slow
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

    from gunn.train.tracking.sender import short_http_timeouts

    seen_elsewhere: list[int] = []
    with short_http_timeouts():
        assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (1, 5)
        other = threading.Thread(target=lambda: seen_elsewhere.append(MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()))
        other.start()
        other.join()
    assert seen_elsewhere == [MLFLOW_HTTP_REQUEST_MAX_RETRIES.default]
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == MLFLOW_HTTP_REQUEST_MAX_RETRIES.default


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_fails_the_journal_clearly_and_leaves_no_partial_line(tmp_path: Path) -> None:
    from gunn.train.tracking.journal import Journal
    from gunn.train.writes import WriteError

    with small_tmpfs(tmp_path / "tmpfs") as folder:
        journal = Journal(folder / JOURNAL_NAME)
        journal.append({"seq": 0, "op": "metrics", "time": 1, "step": 1, "metrics": {"loss": 1.0}})
        before = journal.path.read_bytes()
        fill(folder)
        big = {"seq": 1, "op": "metrics", "time": 2, "step": 2, "metrics": {f"m{i}": 0.5 for i in range(5000)}}
        with pytest.raises(WriteError) as failure:
            journal.append(big)
        assert isinstance(failure.value, OSError) and failure.value.errno == errno.ENOSPC
        assert str(failure.value) == (f"no space left on device while writing the MLflow "
                                      f"journal {journal.path}")
        assert journal.path.read_bytes() == before
        assert [r["seq"] for r in Journal(journal.path).work] == [0]


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


@pytest.mark.slow
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


@pytest.mark.parametrize("store", ["server", "fresh sqlite"])
def test_an_experiment_created_from_many_threads_at_once_has_one_id(
    store: str, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from gunn.train.tracking.sender import experiment_id

    if store == "server":
        if not mlflow_server.running:
            mlflow_server.start()
        uri = mlflow_server.uri
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = f"gunn-tests-at-once-{tmp_path.name}"
    clients = [MlflowClient(uri) for _ in range(6)]  # the first creates the store's tables
    start, ids = threading.Barrier(len(clients)), []

    def get_or_create(client: MlflowClient) -> None:
        start.wait()
        ids.append(experiment_id(client, name))

    threads = [threading.Thread(target=get_or_create, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(ids) == len(clients) and set(ids) == {clients[0].get_experiment_by_name(name).experiment_id}


def test_a_run_whose_parent_is_named_by_its_journal_is_sent_once_the_parent_is(
    server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gunn.train.tracking import journal_reference

    parent_dir, child_dir = tmp_path / "sweep", tmp_path / "sweep" / "runs" / "trial"
    child = Tracker(run_dir=child_dir, tracking_uri=server.uri, experiment="gunn-tests", run_name="trial",
                    params={"optim.lr": 0.1}, tags={"mlflow.parentRunId": journal_reference(parent_dir)})
    child.log_metrics({"train_loss": 1.0}, step=1)
    child.finish()
    assert child.run_id is None and "waits for this run's parent run" in _tracking_warnings(caplog)[0]
    assert sync(child_dir) == (0, 4)  # start, params, metrics, finish: not before the parent
    assert f"send it with: {sync_command(parent_dir.resolve())}" in caplog.text

    parent = Tracker(run_dir=parent_dir, tracking_uri=server.uri, experiment="gunn-tests", run_name="sweep",
                     params={}, tags={})
    parent.finish()
    assert sync(child_dir) == (4, 0)
    run = MlflowClient(server.uri).get_run(_journal_run_id(child_dir, server.uri))
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.info.status == "FINISHED"
    assert _steps(server.uri, run.info.run_id) == [1]


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


# --------------------------------------------------------------------------- complete: ending a run from outside


def _die(tracker: Tracker) -> None:
    """Stop `tracker`'s sending thread as its process's death would: no finish, nothing more journaled."""
    with tracker._cond:
        tracker._closed = True
        tracker._cond.notify_all()
    tracker._thread.join(timeout=5)
    assert not tracker._thread.is_alive()


def _journal_lines(run_dir: Path) -> list[str]:
    return (run_dir / JOURNAL_NAME).read_text().splitlines()


def _died_after_two_epochs(server: MlflowServer, run_dir: Path) -> str:
    """A run that started, logged steps 1 and 2 (on the server) and died; its MLflow run id."""
    tracker = _tracker(run_dir, server.uri)
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    tracker.log_metrics({"train_loss": 0.5}, step=2)
    wait_for(lambda: _steps(server.uri, tracker.run_id) == [1, 2], 20, "steps 1 and 2 on the server")
    _die(tracker)
    return tracker.run_id


def test_complete_ends_a_run_whose_process_died_and_then_as_the_caller_says(
    server: MlflowServer, tmp_path: Path
) -> None:
    from gunn.train.tracking import complete

    run_dir = tmp_path / "run"
    run_id = _died_after_two_epochs(server, run_dir)
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"

    assert complete(run_dir, "KILLED") == (1, 0)  # the finish
    assert client.get_run(run_id).info.status == "KILLED"
    assert _steps(server.uri, run_id) == [1, 2]
    lines = _journal_lines(run_dir)
    assert complete(run_dir, "KILLED") == (0, 0) and _journal_lines(run_dir) == lines  # ended so already

    # The caller knows better (a scheduler stopped the trial): a tag and another ending.
    assert complete(run_dir, "FINISHED", tags={"stopped_early": "true", "preset": "test"}) == (2, 0)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stopped_early"] == "true"
    added = [json.loads(line) for line in _journal_lines(run_dir)[len(lines):] if '"seq"' in line]
    assert [(r["op"], r.get("tags"), r.get("status")) for r in added] == [
        ("tags", {"stopped_early": "true"}, None),  # "preset" was recorded with that value already
        ("finish", None, "FINISHED"),
    ]
    lines = _journal_lines(run_dir)
    assert complete(run_dir, "FINISHED", tags={"stopped_early": "true"}) == (0, 0)
    assert _journal_lines(run_dir) == lines
    assert client.get_run(run_id).info.status == "FINISHED"


def test_complete_ends_a_continued_run_that_died_although_an_earlier_attempt_ended_it(
    server: MlflowServer, tmp_path: Path
) -> None:
    from gunn.train.tracking import complete

    run_dir = tmp_path / "run"
    first = _tracker(run_dir, server.uri)
    first.log_metrics({"lr": 0.1}, step=0)
    first.finish("KILLED")  # a stop request: ended KILLED, then continued by a second attempt that died
    run_id = _died_after_two_epochs(server, run_dir)
    assert run_id == first.run_id and MlflowClient(server.uri).get_run(run_id).info.status == "RUNNING"
    assert complete(run_dir, "KILLED") == (1, 0)
    assert MlflowClient(server.uri).get_run(run_id).info.status == "KILLED"


def test_complete_logs_each_existing_artifact_once(server: MlflowServer, tmp_path: Path) -> None:
    from gunn.train.tracking import complete

    run_dir = tmp_path / "run"
    config, curves = run_dir / "config.yaml", run_dir / "curves.png"
    run_dir.mkdir()
    config.write_text("name: x\n")
    curves.write_bytes(b"\x89PNG\r\n\x1a\n")
    tracker = _tracker(run_dir, server.uri)
    tracker.log_artifact(config)  # the run logged this one itself
    tracker.finish()

    # curves.png is new, config.yaml logged already, model-final.pt was never written; the ending is as recorded.
    assert complete(run_dir, "FINISHED", artifacts=(curves, config, run_dir / "model-final.pt")) == (1, 0)
    assert sorted(f.path for f in MlflowClient(server.uri).list_artifacts(tracker.run_id)) == [
        "config.yaml", "curves.png"]
    assert sum('"op": "artifact"' in line for line in _journal_lines(run_dir)) == 2
    lines = _journal_lines(run_dir)
    assert complete(run_dir, "FINISHED", artifacts=(curves, config)) == (0, 0)
    assert _journal_lines(run_dir) == lines
    assert MlflowClient(server.uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_complete_keeps_what_an_unreachable_server_missed_and_sends_it_once_later(
    server: MlflowServer, tmp_path: Path
) -> None:
    from gunn.train.tracking import complete

    run_dir = tmp_path / "run"
    artifact = tmp_path / "config.yaml"
    artifact.write_text("name: x\n")
    run_id = _died_after_two_epochs(server, run_dir)
    server.stop()
    assert complete(run_dir, "FINISHED", tags={"stopped_early": "true"}, artifacts=(artifact,)) == (0, 3)
    lines = _journal_lines(run_dir)
    server.start()
    assert complete(run_dir, "FINISHED", tags={"stopped_early": "true"}, artifacts=(artifact,)) == (3, 0)
    assert _journal_lines(run_dir)[: len(lines)] == lines
    assert not any('"seq"' in line for line in _journal_lines(run_dir)[len(lines):])  # only "sent" markers
    run = MlflowClient(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stopped_early"] == "true"
    assert [f.path for f in MlflowClient(server.uri).list_artifacts(run_id)] == ["config.yaml"]


def test_complete_without_a_journal_does_nothing(tmp_path: Path) -> None:
    from gunn.train.tracking import complete

    assert complete(tmp_path / "never-started", "KILLED") == (0, 0)
    assert not (tmp_path / "never-started").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / JOURNAL_NAME).write_text("")
    assert complete(tmp_path / "empty", "FINISHED", tags={"a": "b"}, artifacts=(tmp_path / "empty" / JOURNAL_NAME,)) \
        == (0, 0)
    assert (tmp_path / "empty" / JOURNAL_NAME).read_text() == ""
    with pytest.raises(ValueError, match="status must be one of"):
        complete(tmp_path / "empty", "RUNNING")


# --------------------------------------------------------------------------- the model, system metrics, source tags


def _model_dir(path: Path, step: int, metrics: dict[str, float]) -> Path:
    """A stand-in for the MLflow model directory the engine saves: its MLmodel and one weights file."""
    path.mkdir(parents=True)
    (path / "MLmodel").write_text(json.dumps({
        "artifact_path": None, "flavors": {}, "model_uuid": "local",
        "metadata": {"gunn": {"step": step, "metrics": metrics}},
    }))
    (path / "data").mkdir()
    (path / "data" / "weights.bin").write_bytes(b"\0" * 100)
    return path


def _logged_models(uri: str, run_id: str) -> list:
    client = MlflowClient(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    return list(client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"))


def test_a_model_is_logged_once_as_the_runs_output_even_when_sent_again(
    server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml
    from mlflow.artifacts import download_artifacts
    from mlflow.entities import LoggedModelStatus

    from gunn.train.tracking.journal import MODEL_DIR_NAME, Journal

    run_dir = tmp_path / "run"
    model_dir = _model_dir(run_dir / MODEL_DIR_NAME, 3, {})
    tracker = _tracker(run_dir, server.uri)
    tracker.log_metrics({"eval_top1_error": 5.0}, step=3)
    tracker.log_model(model_dir, step=3)
    tracker.log_model(model_dir, step=3, once=True)  # journaled already: nothing
    tracker.finish()
    journal = Journal(run_dir / JOURNAL_NAME)
    (record,) = [r for r in journal.work if r["op"] == "model"]
    assert record["seq"] in journal.sent

    # Its "sent" line lost (killed right after sending it): sent again, it finds the model it logged.
    lines = [line for line in _journal_lines(run_dir) if json.loads(line) != {"sent": record["seq"]}]
    (run_dir / JOURNAL_NAME).write_text("\n".join(lines) + "\n")
    assert sync(run_dir) == (1, 0)

    (model,) = _logged_models(server.uri, tracker.run_id)
    assert (model.name, model.status, model.tags["gunn.step"]) == ("model", LoggedModelStatus.READY, "3")
    assert model.params["optim.lr"] == "0.1" and model.tags["mlflow.source.type"] == "LOCAL"
    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_top1_error")] == [3]  # not twice
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 3)]
    assert sorted(a.path for a in client.list_logged_model_artifacts(model.model_id)) == ["MLmodel", "data"]
    # runs:/ resolves to the LoggedModel, whose repository MLflow looks up in the default store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    local = Path(download_artifacts(f"runs:/{tracker.run_id}/model", dst_path=str(tmp_path)))
    uploaded = yaml.safe_load((local / "MLmodel").read_text())
    assert (uploaded["run_id"], uploaded["model_id"]) == (tracker.run_id, model.model_id)
    assert json.loads((model_dir / "MLmodel").read_text())["model_uuid"] == "local"  # the run's copy as saved


def test_complete_logs_the_model_a_dead_run_saved(server: MlflowServer, tmp_path: Path) -> None:
    from mlflow.entities import LoggedModelStatus

    from gunn.train.tracking import MODEL_DIR_NAME, complete

    run_dir = tmp_path / "run"
    run_id = _died_after_two_epochs(server, run_dir)
    _model_dir(run_dir / MODEL_DIR_NAME, 2, {"eval_top1_error": 7.5})  # saved, then it died
    assert complete(run_dir, "FINISHED") == (2, 0)  # the model and the finish
    lines = _journal_lines(run_dir)
    assert complete(run_dir, "FINISHED") == (0, 0) and _journal_lines(run_dir) == lines
    (model,) = _logged_models(server.uri, run_id)
    assert model.tags["gunn.step"] == "2" and model.status == LoggedModelStatus.READY


def test_system_metrics_and_source_tags_reach_the_run_and_an_outage_only_loses_samples(
    server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import getpass

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client = MlflowClient(server.uri)
    off = _tracker(tmp_path / "off", server.uri)  # the default: none
    off.finish()
    assert not [k for k in client.get_run(off.run_id).data.metrics if k.startswith("system/")]
    tracker = _tracker(tmp_path / "run", server.uri, system_metrics=True, drain_timeout=1.0)

    def system_steps() -> list[int]:
        return _steps(server.uri, tracker.run_id, "system/cpu_utilization_percentage")

    wait_for(lambda: len(system_steps()) >= 2, 30, "two system metrics samples")
    tags = client.get_run(tracker.run_id).data.tags
    assert (tags["mlflow.user"], tags["mlflow.source.type"]) == (getpass.getuser(), "LOCAL")
    assert tags["mlflow.source.name"] == str(Path(sys.argv[0]).resolve())
    server.stop()
    with caplog.at_level(logging.DEBUG, logger="gunn.train.tracking"):
        time.sleep(1.0)  # samples taken while it is down, and lost
        tracker.log_metrics({"train_loss": 1.0}, step=1)
        started = time.monotonic()
        tracker.finish()
        assert time.monotonic() - started < 15
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 2 and "unreachable" in warned[0] and "not sent" in warned[1], warned
    assert any("System metrics sample not logged" in r.getMessage() for r in caplog.records)
    server.start()
    steps = system_steps()
    assert steps == list(range(len(steps)))  # one step per sample sent, from 0

    # Continued (a resumed run): its samples continue the steps.
    again = _tracker(tmp_path / "run", server.uri, system_metrics=True)
    assert again.run_id == tracker.run_id
    wait_for(lambda: again._monitor is not None, 30, "the start to be sent and the monitor to start")
    again.finish()
    assert system_steps() == list(range(len(steps) + 1))
