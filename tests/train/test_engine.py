"""The training loop: recipe, exact resume, checkpoints, DDP over gloo, snapshot ensembles."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
import torch.multiprocessing as mp

from gunn import config as cfgmod
from gunn.config import ConfigError
from gunn.data import DataError, build_data
from gunn.models import create_model
from gunn.train import checkpoint as ckpt
from gunn.train.rundir import RunDirError
from gunn.train import rundir
from gunn.train.checks import validate
from gunn.train.engine import train
from gunn.train.schedule import learning_rate, milestones, snapshot_epochs
from tests.mlflow_server import REPO_ROOT, free_port

TIMING = {"epoch_time", "images_per_s", "peak_memory_mb"}


def small(tmp_path: Path, *overrides: str) -> cfgmod.RunConfig:
    """A run that takes seconds: gunn_tiny on 128 synthetic 16x16 images, 8 batches per epoch; with
    ``logging.mlflow=true``, no MLflow model at the end unless asked (``logging.model=true``)."""
    return cfgmod.load("digits", [
        "data.name=synthetic", "data.samples=128", "data.image_size=16", "data.classes=4", "data.workers=0",
        "optim.batch_size=16", "optim.epochs=3", "logging.mlflow=false", "logging.model=false", "logging.progress=false",
        f"checkpoint.dir={tmp_path / 'run'}", *overrides,
    ])


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


@pytest.mark.slow
def test_a_run_reports_every_epoch_and_saves_its_configuration(tmp_path):
    result = train(small(tmp_path))
    assert result.status == "finished" and result.epochs_done == 3
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    for key in ("train_loss", "train_top1_error", "eval_top1_error", "eval_top5_error", "lr", "epoch_time",
                "images_per_s", "peak_memory_mb"):
        assert all(math.isfinite(h[key]) for h in result.history), key
    saved = cfgmod.load(result.run_dir / "config.yaml")
    assert saved.optim.epochs == 3 and saved.checkpoint.dir == str(result.run_dir)
    # The values the model used, not the nulls that left them to it.
    m = saved.model
    assert (m.mode, m.residual, m.segments, m.expansion) == ("gunn", True, [4, 4, 4], 2), m
    assert (result.run_dir / "model-final.pt").is_file()


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_and_resumed_ends_bit_identical(tmp_path):
    straight = train(small(tmp_path / "a"))
    pieces = [train(small(tmp_path / "b"), stop_after=5), train(small(tmp_path / "b", "data.workers=2"), stop_after=9)]
    assert [p.status for p in pieces] == ["interrupted", "interrupted"]
    resumed = train(small(tmp_path / "b"))
    assert resumed.status == "finished"
    assert same_weights(straight.model.state_dict(), resumed.model.state_dict())
    assert without_timing(straight.history) == without_timing(resumed.history)


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    train(small(tmp_path, "optim.epochs=2"))
    run = tmp_path / "run"
    newest = ckpt.list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=f"{newest.name} cannot be loaded"):
        resumed = train(small(tmp_path))
    assert resumed.status == "finished"
    clean = train(small(tmp_path / "clean"))
    assert same_weights(clean.model.state_dict(), resumed.model.state_dict())


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": Payload()}, run / ckpt.checkpoint_name(9, 0))
    with pytest.raises(ckpt.NoLoadableCheckpoint, match="no checkpoint in .* can be loaded"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(small(tmp_path))


@pytest.mark.slow
def test_train_one_epoch_advances_the_position_batch_by_batch_and_stops_where_asked(tmp_path):
    from gunn.train.distributed import DistInfo
    from gunn.train.engine import Position, build, train_one_epoch
    from gunn.train.stop import StopPoll
    from gunn.train.metrics import Meter

    config = cfgmod.resolve(small(tmp_path))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    parts = build(config, info)
    position = Position(meter=Meter(info.device))
    stop = StopPoll(info.device, False, bad_loss=lambda batch: pytest.fail(f"loss not finite in batch {batch}"),
                     stop_at=3)
    assert train_one_epoch(parts, position, config, info, stop) is True  # stopped at step 3
    assert (position.epoch, position.batch, position.step, position.meter.count) == (0, 3, 3, 48)
    stop.stop_at = None
    assert train_one_epoch(parts, position, config, info, stop) is False  # the rest of the epoch
    assert (position.epoch, position.batch, position.step, position.meter.count) == (0, 8, 8, 128)
    assert position.train_seconds > 0 and position.history == []


def test_the_step_schedule_divides_the_lr_by_ten_at_half_and_three_quarters():
    optim = cfgmod.load("gunn15-cifar10").optim
    assert milestones(optim) == [150, 225]
    lrs = [learning_rate(optim, e, 0, 10) for e in (0, 149, 150, 224, 225, 299)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_the_snapshot_schedule_restarts_a_cosine_every_cycle():
    optim = cfgmod.load("gunn24-snapshot-cifar10").optim
    assert snapshot_epochs(optim) == [49, 99, 149, 199, 249, 299]
    assert learning_rate(optim, 0, 0, 100) == pytest.approx(0.1)
    assert learning_rate(optim, 49, 99, 100) == pytest.approx(0.0, abs=1e-6)
    assert learning_rate(optim, 50, 0, 100) == pytest.approx(0.1)
    assert learning_rate(optim, 25, 0, 100) == pytest.approx(0.05)


@pytest.mark.slow
def test_snapshot_ensembles_are_evaluated_beside_the_single_model(tmp_path):
    result = train(small(tmp_path, "optim.schedule=snapshot", "optim.snapshots=2", "optim.epochs=2"))
    assert [h.get("snapshots") for h in result.history] == [1.0, 2.0]
    assert all("ensemble_top1_error" in h for h in result.history)
    # One snapshot is the model itself: its ensemble error equals the model's.
    assert result.history[0]["ensemble_top1_error"] == pytest.approx(result.history[0]["eval_top1_error"])
    assert sorted(p.name for p in (result.run_dir / "snapshots").iterdir()) == ["snapshot-01.pt", "snapshot-02.pt"]


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (["model.segments=[3, 3, 3]"], ConfigError, r"model: segments\[0\] must be a positive divisor"),
        (["model.name=gunn16"], ConfigError, r"model: unknown model 'gunn16' \(did you mean gunn18"),
        (["optim.lr_steps=[0.75, 0.5]"], ConfigError, r"optim.lr_steps must be increasing"),
        (["optim.schedule=snapshot", "optim.snapshots=4", "optim.epochs=6"], ConfigError,
         r"optim.snapshots=4 must divide optim.epochs=6"),
        (["data.name=cifar10", "data.root=/nonexistent"], DataError,
         r"(?s)cifar10 not found: expected /nonexistent/cifar-10-batches-py.*python -m gunn.data download cifar10"),
        (["data.name=imagenet", "data.root=/nonexistent"], DataError, r"/nonexistent"),
    ],
)
def test_bad_configurations_fail_before_any_work(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        validate(small(tmp_path, *overrides))


def test_a_batch_size_must_split_evenly_over_the_ranks(tmp_path):
    with pytest.raises(ConfigError, match="optim.batch_size=16 must be a multiple of the 3 ranks"):
        validate(small(tmp_path), world_size=3)


def _ddp_rank(rank: int, port: int, config: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(cfgmod.from_dict(config))
    torch.save(result.model.state_dict(), Path(out) / f"rank{rank}.pt")
    if rank == 0:
        (Path(out) / "metrics.json").write_text(json.dumps(result.metrics))


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_weights_and_the_metrics_they_report(tmp_path):
    config = cfgmod.load("digits", ["optim.epochs=1", "optim.batch_size=64", "logging.mlflow=false",
                                    "logging.progress=false", f"checkpoint.dir={tmp_path / 'run'}"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_rank, args=(port, cfgmod.to_dict(config), str(tmp_path)), nprocs=2, start_method="spawn")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert same_weights(rank0, rank1)
    reported = json.loads((tmp_path / "metrics.json").read_text())
    # The reported evaluation error is the error of the final weights on the whole test set.
    data = build_data(config.data, batch_size=100, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    model = create_model("gunn_tiny", num_classes=10, in_chans=1)
    model.load_state_dict(rank0)
    model.eval()
    wrong = total = 0
    with torch.no_grad():
        for x, y in data.eval.iterate(0):
            wrong += (model(x).argmax(1) != y).sum().item()
            total += len(y)
    assert total == data.eval_images == 359
    assert reported["eval_top1_error"] == pytest.approx(100 * wrong / total, abs=1e-9)


def test_a_run_logs_config_metrics_tags_and_artifacts_to_mlflow_and_resumes_the_same_run(server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"logging.tracking_uri={server.uri}"
    first = train(small(tmp_path, uri, "logging.mlflow=true", "logging.experiment=engine-test"), stop_after=10)
    assert first.status == "interrupted" and first.mlflow_run_id
    second = train(small(tmp_path, uri, "logging.mlflow=true", "logging.experiment=engine-test"))
    assert second.mlflow_run_id == first.mlflow_run_id
    client = MlflowClient(server.uri)
    run = client.get_run(second.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["model.name"] == "gunn_tiny"
    assert (run.data.params["model.mode"], run.data.params["model.segments"]) == ("gunn", "[4, 4, 4]")
    assert len(run.data.params) == len(cfgmod.flatten(small(tmp_path)))
    assert {"model", "mode", "segments", "world_size", "git_commit", "host"} <= set(run.data.tags)
    assert run.data.tags["mode"] == "gunn" and run.data.tags["segments"] == "4,4,4"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval_top1_error")]
    assert steps == [1, 2, 3]
    for name in ("train_loss", "lr", "epoch_time", "images_per_s", "peak_memory_mb", "eval_top5_error"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 3, name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "model-final.pt"} <= artifacts
    assert "View run" not in capsys.readouterr().out  # MLflow's own line at each end: the engine names the run


@pytest.mark.slow
def test_training_outlives_the_tracking_server_and_sync_sends_what_it_missed(server, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    args = (f"logging.tracking_uri={server.uri}", "logging.mlflow=true", "logging.experiment=engine-outage")
    first = train(small(tmp_path, *args), stop_after=9)  # epoch 1 logged, then interrupted
    server.stop()
    with caplog.at_level("WARNING"):
        second = train(small(tmp_path, *args))
    assert second.status == "finished" and second.epochs_done == 3
    assert second.unsent > 0 and "python -m gunn.train.tracking sync" in caplog.text  # the launcher says both
    # The server comes back elsewhere (another port: a store that moved), with the same store behind it.
    old = server.uri
    server.port = mlflow_server_port = free_port()
    server.uri = f"http://127.0.0.1:{mlflow_server_port}"
    server.start()
    sync = [sys.executable, "-m", "gunn.train.tracking", "sync", str(second.run_dir)]
    lost = subprocess.run(sync, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert lost.returncode == 1 and f"Could not reach MLflow at {old}" in lost.stderr, lost.stderr
    synced = subprocess.run(sync + ["--tracking-uri", server.uri], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert synced.returncode == 0, synced.stderr
    assert f"{first.mlflow_run_id} at {server.uri}" in synced.stdout  # the same run, at its new address
    client = MlflowClient(server.uri)
    assert [m.step for m in client.get_metric_history(first.mlflow_run_id, "eval_top1_error")] == [1, 2, 3]
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_diagnostics_are_logged_per_gunn_layer_when_enabled(tmp_path):
    result = train(small(tmp_path, "logging.diagnostics=true", "optim.epochs=1"))
    metrics = result.history[0]
    for layer in ("stages.0.gunn", "stages.1.gunn", "stages.2.gunn"):
        for key in ("collapsed_pairs", "collapsed_channels", "dead_channels", "participation_ratio"):
            assert f"diag/{layer}/{key}" in metrics
    assert 1 <= metrics["diag/stages.2.gunn/participation_ratio"] <= 64


@pytest.mark.slow
def test_running_a_finished_run_again_changes_nothing(tmp_path):
    first = train(small(tmp_path, "optim.epochs=1"))
    final = first.run_dir / "model-final.pt"
    stamp = final.stat().st_mtime_ns
    again = train(small(tmp_path, "optim.epochs=1"))
    assert again.status == "finished" and again.epochs_done == 1
    assert final.stat().st_mtime_ns == stamp and again.history == first.history


@pytest.mark.slow
def test_a_run_checkpointed_on_a_gpu_continues_on_the_cpu(tmp_path):
    from tests.train.test_checkpoint import gpu_written

    straight = train(small(tmp_path / "a"))
    assert train(small(tmp_path / "b"), stop_after=5).status == "interrupted"
    (path,) = ckpt.list_checkpoints(tmp_path / "b" / "run")
    gpu_written(torch.load(path, weights_only=True), path)  # as if a GPU job had written it
    resumed = train(small(tmp_path / "b"))
    assert same_weights(straight.model.state_dict(), resumed.model.state_dict())
    assert without_timing(straight.history) == without_timing(resumed.history)


def _ddp_rank_signalled(rank: int, port: int, config: dict, out: str, signal_in_batch: int) -> None:
    """A rank of a 2-rank run; with ``signal_in_batch``, rank 1 alone is asked to stop during that batch."""
    import itertools

    from gunn.train import metrics, stop

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if signal_in_batch:
        stop.STOP_POLL_S = 0.0  # agree at every step, so that the stop lands in that batch
        if rank == 1:
            batches, add = itertools.count(1), metrics.Meter.add

            def add_then_signal(self, *args):
                add(self, *args)
                if next(batches) == signal_in_batch:
                    stop.request_stop()  # what the launcher's SIGTERM/SIGUSR2 handler calls

            metrics.Meter.add = add_then_signal
    result = train(cfgmod.from_dict(config))
    torch.save(result.model.state_dict(), Path(out) / f"rank{rank}.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(
        {"status": result.status, "epochs": result.epochs_done, "history": result.history}))


def _two_ranks(config: cfgmod.RunConfig, out: Path, signal_in_batch: int = 0) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_rank_signalled, args=(port, cfgmod.to_dict(config), str(out), signal_in_batch),
                       nprocs=2, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) | {"weights": torch.load(out / f"rank{r}.pt")}
            for r in (0, 1)]


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_mid_epoch_and_the_resumed_run_matches_in_weights_and_metrics(
    tmp_path,
):
    # 128 images, 8 per rank and step: 8 steps per epoch. Rank 1 is signalled in step 5.
    straight = _two_ranks(small(tmp_path / "a"), tmp_path / "straight")
    stopped = _two_ranks(small(tmp_path / "b"), tmp_path / "stopped", signal_in_batch=5)
    assert [r["status"] for r in stopped] == ["interrupted", "interrupted"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "run")] == [ckpt.checkpoint_name(0, 5)]
    resumed = _two_ranks(small(tmp_path / "b"), tmp_path / "resumed")
    for rank in (0, 1):
        assert resumed[rank]["status"] == "finished"
        assert same_weights(straight[rank]["weights"], resumed[rank]["weights"])
    # Rank 0's running metrics, its BatchNorm statistics and rank 1's were all saved mid-epoch:
    # the interrupted epoch's train loss and errors equal the uninterrupted run's.
    assert without_timing(straight[0]["history"]) == without_timing(resumed[0]["history"])


@pytest.mark.slow
def test_a_run_whose_loss_becomes_nan_stops_naming_epoch_and_batch_and_keeps_its_last_good_checkpoint(tmp_path):
    from gunn.train.stop import NonFiniteLossError

    good = train(small(tmp_path, "optim.epochs=1"))
    assert [p.name for p in ckpt.list_checkpoints(good.run_dir)] == [ckpt.checkpoint_name(1, 0)]
    # The same run continued with an absurd learning rate diverges in its second epoch.
    with pytest.raises(NonFiniteLossError, match=r"loss became nan or infinite in epoch 2, in batch \d+; the run "
                                                 r"stopped without saving it \(its last good checkpoint is "
                                                 r"checkpoint-e0001-b000000\.pt\)\. The same command would diverge "
                                                 r"the same way: continue with a lower optim.lr"):
        train(small(tmp_path, "optim.epochs=3", "optim.lr=1e8"))
    assert [p.name for p in ckpt.list_checkpoints(good.run_dir)] == [ckpt.checkpoint_name(1, 0)]


@pytest.mark.slow
def test_a_run_continued_with_another_model_shape_is_refused_in_one_line_before_it_trains(tmp_path):
    first = train(small(tmp_path, "optim.epochs=1"))
    with pytest.raises(RunDirError) as refused:
        train(small(tmp_path, "optim.epochs=2", "model.expansion=1"))
    message = str(refused.value)
    assert "\n" not in message and f"{ckpt.checkpoint_name(1, 0)} holds a run of another model than these " \
        "settings build (gunn_tiny: " in message and "tensor(s) of other shapes, e.g. " in message
    assert f"continue {first.run_dir} with the settings it was saved with (its config.yaml)" in message
    assert not (first.run_dir / "config-changes.yaml").exists()  # refused before anything was recorded


def test_the_mlflow_line_says_where_the_records_wait_when_the_store_has_not_created_the_run(tmp_path):
    from gunn.train.tracking.run import mlflow_line
    from gunn.train.tracking import Tracker

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker = Tracker(run_dir=tmp_path, tracking_uri=f"http://127.0.0.1:{port}", experiment="gunn", run_name="x",
                      params={}, tags={}, start_timeout=0.5, drain_timeout=0.5)
    try:
        line = mlflow_line(tracker)
        assert "None" not in line and f"http://127.0.0.1:{port} has not created the run yet" in line
        assert str(tracker.journal_path) in line and "gunn.train.tracking" in line
    finally:
        tracker.finish("KILLED")


# --------------------------------------------------------------------------- stopping from on_epoch


def _mlflow(server, experiment: str) -> tuple[str, ...]:
    return (f"logging.tracking_uri={server.uri}", "logging.mlflow=true", f"logging.experiment={experiment}")


def test_on_epoch_returning_true_stops_the_run_like_a_stop_request_and_running_again_finishes_it(server, tmp_path):
    from mlflow.tracking import MlflowClient

    args = _mlflow(server, "engine-on-epoch-stop")
    seen: list[tuple[int, str | None]] = []

    def stop_after_the_first(metrics, checkpoint):
        seen.append((metrics["epoch"], checkpoint and checkpoint.name))
        return metrics["epoch"] == 1

    stopped = train(small(tmp_path, *args), on_epoch=stop_after_the_first)
    assert stopped.status == "interrupted" and stopped.epochs_done == 1 and stopped.mlflow_run_id
    assert seen == [(1, ckpt.checkpoint_name(1, 0))]
    assert [p.name for p in ckpt.list_checkpoints(stopped.run_dir)] == [ckpt.checkpoint_name(1, 0)]
    assert not (stopped.run_dir / "model-final.pt").exists()
    client = MlflowClient(server.uri)
    assert client.get_run(stopped.mlflow_run_id).info.status == "KILLED"

    resumed = train(small(tmp_path, *args), on_epoch=lambda metrics, checkpoint: seen.append(
        (metrics["epoch"], checkpoint and checkpoint.name)) and False)
    assert resumed.status == "finished" and resumed.epochs_done == 3
    assert [e for e, _ in seen] == [1, 2, 3]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.mlflow_run_id == stopped.mlflow_run_id
    assert client.get_run(resumed.mlflow_run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(resumed.mlflow_run_id, "eval_top1_error")]
    assert sorted(steps) == [1, 2, 3]  # each epoch once: nothing logged twice across the stop
    # Stopped at an epoch's end and continued, the run is the run that was never stopped.
    straight = train(small(tmp_path / "straight"))
    assert same_weights(straight.model.state_dict(), resumed.model.state_dict())
    assert without_timing(straight.history) == without_timing(resumed.history)


@pytest.mark.slow
def test_on_epoch_returning_true_at_the_last_epoch_lets_the_run_finish(tmp_path):
    result = train(small(tmp_path), on_epoch=lambda metrics, checkpoint: metrics["epoch"] == 3)
    assert result.status == "finished" and result.epochs_done == 3
    assert (result.run_dir / "model-final.pt").is_file()


@pytest.mark.slow
def test_on_epoch_always_returning_true_takes_one_epoch_per_call_and_the_last_call_finishes(tmp_path):
    results = [train(small(tmp_path), on_epoch=lambda metrics, checkpoint: True) for _ in range(3)]
    assert [(r.status, r.epochs_done) for r in results] == [("interrupted", 1), ("interrupted", 2), ("finished", 3)]
    assert [h["epoch"] for h in results[-1].history] == [1, 2, 3]
    assert (results[-1].run_dir / "model-final.pt").is_file()
    again = train(small(tmp_path), on_epoch=lambda metrics, checkpoint: True)  # finished already: not called
    assert (again.status, again.epochs_done) == ("finished", 3)


# --------------------------------------------------------------------------- a run killed while it finishes

_KILLED_WHILE_FINISHING = """
import os, signal, sys
from gunn import config as cfgmod
from gunn.train import engine, plots
from gunn.train.tracking.tracker import Tracker

log_artifact = Tracker.log_artifact

def die():  # as the node's failure would: no exception, no finally, no finish
    os.kill(os.getpid(), signal.SIGKILL)

def log_then_die(self, *args, **kwargs):
    log_artifact(self, *args, **kwargs)  # journaled (perhaps sent)
    die()

if sys.argv[2] == "after the first artifact":
    Tracker.log_artifact = log_then_die
else:  # before the curves are drawn
    plots.plot_curves = lambda *args, **kwargs: die()
engine.train(cfgmod.load(sys.argv[1]))
"""


def _artifact_records(run_dir: Path) -> list[str]:
    lines = (run_dir / "mlflow-journal.jsonl").read_text().splitlines()
    return sorted(Path(r["path"]).name for r in map(json.loads, lines) if r.get("op") == "artifact")


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["after the first artifact", "before the curves are drawn"])
def test_a_run_killed_between_its_final_weights_and_their_logging_logs_them_when_run_again(server, tmp_path, killed):
    from mlflow.tracking import MlflowClient

    from gunn.train.tracking.journal import Journal

    args = ("optim.epochs=1", "logging.model=true", *_mlflow(server, "engine-killed-finishing"))
    (tmp_path / "config.yaml").write_text(cfgmod.dump(small(tmp_path, *args)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    died = subprocess.run([sys.executable, "-c", _KILLED_WHILE_FINISHING, str(tmp_path / "config.yaml"), killed],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert died.returncode == -9, died.stderr
    run_dir = tmp_path / "run"
    assert (run_dir / "model-final.pt").is_file()
    assert _artifact_records(run_dir) == (["curves.png"] if killed == "after the first artifact" else [])
    journal = Journal(run_dir / "mlflow-journal.jsonl")
    run_id = journal.runs[server.uri]
    assert "finish" not in {r["op"] for r in journal.work}  # it died: nothing ended the run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dead process's lock is taken over, with a warning
        again = train(small(tmp_path, *args))
    assert again.status == "finished" and again.epochs_done == 1 and again.mlflow_run_id == run_id
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "curves.png", "model-final.pt"}
    assert _artifact_records(run_dir) == ["config.yaml", "curves.png", "model-final.pt"]

    train(small(tmp_path, *args))  # and once more
    assert _artifact_records(run_dir) == ["config.yaml", "curves.png", "model-final.pt"]  # each logged once
    assert client.get_run(run_id).info.status == "FINISHED"


_KILLED_AT_AN_EPOCHS_END = """
import os, signal, sys
from gunn import config as cfgmod
from gunn.train import engine
from gunn.train.tracking.tracker import Tracker

where, epoch = sys.argv[2], int(sys.argv[3])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # no exception, no finally: a node's failure
train_one_epoch, save_checkpoint, log_metrics = engine.train_one_epoch, engine.save_checkpoint, Tracker.log_metrics

def training(parts, position, *args, **kwargs):
    if position.epoch + 1 == epoch:
        die()
    return train_one_epoch(parts, position, *args, **kwargs)

def saving(parts, position, *args, **kwargs):
    save_checkpoint(parts, position, *args, **kwargs)
    if position.epoch == epoch:
        die()

def logging(self, metrics, step):
    log_metrics(self, metrics, step)
    if step == epoch:
        die()

engine.train_one_epoch, engine.save_checkpoint = training, saving
Tracker.log_metrics = logging
engine.train(cfgmod.load(sys.argv[1]))
"""


@pytest.mark.slow
def test_every_epochs_metrics_are_logged_once_wherever_in_its_end_the_run_is_killed(server, tmp_path):
    from mlflow.tracking import MlflowClient

    args = ("optim.epochs=4", "checkpoint.every=2", *_mlflow(server, "engine-killed-at-epoch-ends"))
    (tmp_path / "config.yaml").write_text(cfgmod.dump(small(tmp_path, *args)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    kills = [("training", 2),  # epoch 1 logged, not checkpointed (checkpoint.every=2): redone from the start
             ("logging", 3)]  # epoch 3 logged, before any checkpoint of it: redone from the epoch-2 checkpoint
    for where, epoch in kills:
        died = subprocess.run([sys.executable, "-c", _KILLED_AT_AN_EPOCHS_END, str(tmp_path / "config.yaml"), where,
                               str(epoch)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert died.returncode == -9, (where, epoch, died.stderr[-3000:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dead process's lock is taken over, with a warning
        done = train(small(tmp_path, *args))
    assert done.status == "finished" and done.epochs_done == 4
    client = MlflowClient(server.uri)
    assert client.get_run(done.mlflow_run_id).info.status == "FINISHED"
    for key in ("train_loss", "eval_top1_error", "epoch_time"):
        history = client.get_metric_history(done.mlflow_run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3, 4], key  # each epoch once
    logged = {m.step: m.value for m in client.get_metric_history(done.mlflow_run_id, "train_loss")}
    assert logged == {h["epoch"]: pytest.approx(h["train_loss"], abs=0) for h in done.history}  # what trained


def test_a_copied_run_directory_continues_as_a_new_mlflow_run_with_its_changed_settings_recorded(server, tmp_path):
    from mlflow.tracking import MlflowClient

    args = _mlflow(server, "engine-copies")
    first = train(small(tmp_path, *args), on_epoch=lambda metrics, checkpoint: metrics["epoch"] == 2)
    assert first.status == "interrupted" and first.epochs_done == 2
    original, copy = tmp_path / "run", tmp_path / "run-copy"
    shutil.copytree(original, copy, symlinks=True)  # cp -a
    # Copied while a live process held the original's lock: the copy's lock locks the original, not the copy.
    parent = os.getppid()
    (copy / rundir.LOCK_NAME).write_text(json.dumps({**rundir._me(original), "pid": parent,
                                                     "pid_start": rundir._start_ticks(parent)}))
    with pytest.warns(UserWarning, match="it was copied here with the directory: it locks " + str(original)):
        forked = train(small(tmp_path, *args, f"checkpoint.dir={copy}", "optim.lr=0.05", "optim.epochs=4"))
    continued = train(small(tmp_path, *args))
    assert (forked.status, forked.epochs_done, continued.status, continued.epochs_done) == \
        ("finished", 4, "finished", 3)

    client = MlflowClient(server.uri)
    assert forked.mlflow_run_id != first.mlflow_run_id == continued.mlflow_run_id
    fork, origin = client.get_run(forked.mlflow_run_id), client.get_run(first.mlflow_run_id)
    assert fork.data.tags["gunn.forked_from"] == first.mlflow_run_id
    assert fork.data.tags["gunn.forked_from_dir"] == str(original.resolve())
    assert fork.data.tags["changed/optim.lr"] == "0.1 -> 0.05 from epoch 3"
    assert fork.data.tags["changed/optim.epochs"] == "3 -> 4 from epoch 3"
    assert "optim.lr" not in fork.data.params and fork.data.params["optim.momentum"] == origin.data.params[
        "optim.momentum"]  # logged before the change: only the tags say what ran
    assert (origin.data.params["optim.lr"], origin.data.params["optim.epochs"]) == ("0.1", "3")
    assert not any(k.startswith("changed/") for k in origin.data.tags) and fork.info.status == origin.info.status \
        == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(first.mlflow_run_id, "train_loss")}
    forked_history = client.get_metric_history(forked.mlflow_run_id, "train_loss")
    assert sorted(m.step for m in forked_history) == [1, 2, 3, 4]  # the inherited epochs too, each once
    assert sorted(m.step for m in client.get_metric_history(first.mlflow_run_id, "train_loss")) == [1, 2, 3]
    assert {m.step: m.value for m in forked_history if m.step <= 2} == {k: history[k] for k in (1, 2)}

    # What the copy's directory says it trained with, and from when.
    saved = cfgmod.load(copy / "config.yaml")
    assert (saved.optim.lr, saved.optim.epochs) == (0.05, 4)
    assert cfgmod.load(original / "config.yaml").optim.lr == 0.1
    changes = yaml.safe_load((copy / "config-changes.yaml").read_text())
    assert [(c["epoch"], c["batch"], c["changes"]) for c in changes] == [
        (3, 0, {"optim.lr": {"from": 0.1, "to": 0.05}, "optim.epochs": {"from": 3, "to": 4}})]
    assert (copy / f"mlflow-journal.copied-from-{first.mlflow_run_id}.jsonl").is_file()
    assert {a.path for a in client.list_artifacts(forked.mlflow_run_id)} >= {"config.yaml", "config-changes.yaml"}


def test_a_moved_run_directory_continues_its_mlflow_run(server, tmp_path):
    from mlflow.tracking import MlflowClient

    args = _mlflow(server, "engine-moves")
    first = train(small(tmp_path, *args, "optim.epochs=2"), stop_after=3)
    moved = tmp_path / "moved"
    os.rename(tmp_path / "run", moved)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing to warn of
        done = train(small(tmp_path, *args, "optim.epochs=2", f"checkpoint.dir={moved}"))
    assert done.status == "finished" and done.mlflow_run_id == first.mlflow_run_id
    run = MlflowClient(server.uri).get_run(done.mlflow_run_id)
    assert run.data.tags["gunn.run_dir"] == str(moved.resolve()) and "gunn.forked_from" not in run.data.tags
    assert not (moved / "config-changes.yaml").exists()  # the directory is where the run lives, not a setting


def test_the_default_mlflow_run_name_is_the_run_directory_name(server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    args = _mlflow(server, "engine-run-names")
    named_by_dir = train(small(tmp_path, *args, f"checkpoint.dir={tmp_path / 'digits-20261202-183000'}"),
                         stop_after=1)
    assert client.get_run(named_by_dir.mlflow_run_id).info.run_name == "digits-20261202-183000"
    named = train(small(tmp_path, *args, f"checkpoint.dir={tmp_path / 'other'}", "logging.run_name=chosen"),
                  stop_after=1)
    assert client.get_run(named.mlflow_run_id).info.run_name == "chosen"


# --------------------------------------------------------------------------- the training step


def _built(tmp_path: Path, *overrides: str, world_size: int = 1):
    """A configuration, rank 0's place among ``world_size`` ranks (no process group) and the parts built for it."""
    from gunn.train.distributed import DistInfo
    from gunn.train.engine import build

    config = cfgmod.resolve(small(tmp_path, *overrides))
    info = DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
    return config, info, build(config, info)


def _epoch_from(parts, config, info, first_batch: int, capture_graphs: bool = False):
    from gunn.train.engine import Position, train_one_epoch
    from gunn.train.stop import StopPoll
    from gunn.train.metrics import Meter

    position = Position(meter=Meter(info.device), batch=first_batch)
    stop = StopPoll(info.device, False, bad_loss=lambda batch: pytest.fail(f"loss not finite in batch {batch}"))
    train_one_epoch(parts, position, config, info, stop, capture_graphs=capture_graphs)
    return position


def _host_reads(parts, config, info, first_batch: int) -> int:
    """Reads of a tensor's value on the host (on a GPU each waits for the device) while the engine trains the
    epoch from ``first_batch`` on."""
    from gunn.bench.measure import dispatched_ops

    counts = dispatched_ops(lambda: _epoch_from(parts, config, info, first_batch))  # not the loader workers'
    return sum(n for op, n in counts.items() if op.split(".")[0] in ("_local_scalar_dense", "nonzero", "is_nonzero",
                                                                      "equal"))


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch, amp):
    # Counted on the CPU: an epoch of 4 steps reads no more often than one of its last step (what is left
    # is the loader's seed of the epoch), so a step reads nothing. The stop poll's periodic read is left out.
    from gunn.train import optimizer, stop

    monkeypatch.setattr(stop, "STOP_POLL_S", 1e9)
    config, info, parts = _built(tmp_path, f"runtime.amp={amp}", "data.samples=64", "data.workers=1")  # loading
    if amp == "fp16":  # a GPU's (the CPU trains no fp16): the optimiser the engine builds for CUDA, on the CPU
        parts.optimizer = optimizer.sgd(parts.model.parameters(), config.optim, torch.device("cuda"))
        assert parts.optimizer.defaults["fused"] is True and parts.scaler.is_enabled()
    one_step = _host_reads(parts, config, info, first_batch=3)  # also the first step (GradScaler's start)
    assert _host_reads(parts, config, info, first_batch=0) <= one_step


def test_an_fp16_first_step_that_overflows_leaves_the_fused_sgd_as_if_it_had_not_been_taken(tmp_path):
    # GradScaler starts at a scale that fp16 gradients usually overflow: the first steps are skipped.
    from gunn.train.optimizer import sgd

    optim = small(tmp_path).optim
    torch.manual_seed(0)
    weight, grad = torch.randn(1000), torch.randn(1000)
    fused = torch.nn.Parameter(weight.clone())
    optimizer = sgd([fused], optim, torch.device("cuda"))  # the engine's optimiser on CUDA, on a CPU tensor
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))
    garbage = torch.full((1000,), float("nan"))  # freed memory that new buffers may be given
    del garbage
    for g in (torch.full((1000,), float("inf")), grad):  # an overflow, skipped; then a finite step
        fused.grad = g * scaler.get_scale()  # scaled, as scaler.scale(loss).backward() gives it
        scaler.step(optimizer)
        scaler.update()
    plain = torch.nn.Parameter(weight.clone())
    reference = torch.optim.SGD([plain], lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                                nesterov=optim.nesterov)
    plain.grad = grad.clone()
    reference.step()  # the first step it takes
    torch.testing.assert_close(fused.detach(), plain.detach())
    torch.testing.assert_close(optimizer.state[fused]["momentum_buffer"], reference.state[plain]["momentum_buffer"])


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_cuda_graphs_are_captured_on_a_static_batch_before_the_loader_starts_and_per_stage_with_ranks(
    tmp_path, monkeypatch, world_size,
):
    # A CUDA call from another thread (pin memory, DALI) breaks a capture: it must come before the
    # loader's iterator starts. (CUDA graphs need a GPU, .ci/gpu-check captures them; here the capture
    # function records how the engine calls it.)
    from gunn.train import graphs

    config, info, parts = _built(tmp_path, "runtime.channels_last=true", "data.samples=64", world_size=world_size)
    events: list = []
    loader, iterate = parts.data.train, parts.data.train.iterate
    monkeypatch.setattr(loader, "iterate", lambda *args: events.append("iterator") or iterate(*args))

    def capture(model, example, amp_dtype, *, stages):
        events.append({"model": model is parts.model, "shape": tuple(example.shape), "dtype": example.dtype,
                       "device": example.device.type, "stages": stages, "amp": amp_dtype,
                       "channels_last": example.is_contiguous(memory_format=torch.channels_last)})
        return graphs.CapturedStep(("",), pool_bytes=0, unseen_bytes=0)

    monkeypatch.setattr(graphs, "capture_training_step", capture)
    position = _epoch_from(parts, config, info, first_batch=0, capture_graphs=True)
    per_rank = 16 // world_size
    assert events == [{"model": True, "shape": (per_rank, 3, 16, 16), "dtype": torch.float32, "device": "cpu",
                       "stages": world_size > 1, "amp": None, "channels_last": True}, "iterator"]
    assert parts.graphs.pieces == ("",) and position.batch == len(loader)  # then the epoch trained


def test_cuda_graphs_with_a_backward_that_recomputes_are_refused_naming_both_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"runtime.cuda_graphs=true cannot capture model.memory='recompute'"):
        validate(small(tmp_path, "runtime.cuda_graphs=true", "model.memory=recompute"))
    try:  # SUNN recomputes nothing: not refused for it (without a GPU, refused for the device)
        validate(small(tmp_path, "runtime.cuda_graphs=true", "model.memory=recompute", "model.mode=sunn"))
    except ConfigError as err:
        assert "recompute" not in str(err)


@pytest.mark.slow
def test_images_per_s_after_a_resume_counts_only_what_this_process_trained(tmp_path, monkeypatch):
    import itertools
    import time

    perf_counter, ticks = time.perf_counter, itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: perf_counter() + 1000.0 * next(ticks))  # a very slow start
    assert train(small(tmp_path, "optim.epochs=1"), stop_after=5).status == "interrupted"
    monkeypatch.undo()
    (epoch,) = train(small(tmp_path, "optim.epochs=1")).history
    assert epoch["epoch_time"] > 1000  # the epoch's training time: both processes'
    # 3 batches of 16 images in this process's seconds; mixing in the first process's would give < 0.2
    assert epoch["images_per_s"] > 1


# --------------------------------------------------------------------------- the end of a run with several ranks

COLLECTIVE_TIMEOUT_S, RANK0_SOLO_S = 3, 4.5


def _rank_whose_rank_0_works_alone_at_the_end(rank: int, ports: list[int], config: dict, out: str) -> None:
    """A rank of a 2-rank run, trained in two calls of ``train``: interrupted after 3 steps, then finished. Rank 0's
    own work after the ranks' last collective (writing the checkpoint; finishing) outlasts the collective timeout."""
    import time

    from gunn.train import engine

    torch.set_num_threads(1)
    if rank == 0:
        save, finish = ckpt.save, engine.finish

        def slow_save(*args, **kwargs):
            save(*args, **kwargs)
            time.sleep(RANK0_SOLO_S)

        def slow_finish(*args, **kwargs):
            finish(*args, **kwargs)
            time.sleep(RANK0_SOLO_S)

        ckpt.save, engine.finish = slow_save, slow_finish
    statuses = []
    for call, (port, stop_after) in enumerate(zip(ports, (3, None))):
        Path(out, f"rank{rank}-call{call}").touch()  # both ranks start each call together, as relaunched ranks do
        while not Path(out, f"rank{1 - rank}-call{call}").exists():
            time.sleep(0.05)
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        statuses.append(train(cfgmod.from_dict(config), stop_after=stop_after).status)
    Path(out, f"rank{rank}.json").write_text(json.dumps(statuses))


@pytest.mark.slow
def test_no_rank_waits_for_rank_0s_own_work_at_the_end_however_long_it_takes(tmp_path):
    # With NCCL's 10-minute timeout, a barrier after rank 0's MLflow model export failed the other ranks.
    config = small(tmp_path, "data.samples=64", "optim.epochs=1", f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    mp.start_processes(_rank_whose_rank_0_works_alone_at_the_end, args=(ports, cfgmod.to_dict(config), str(tmp_path)),
                       nprocs=2, start_method="spawn")  # raises if a rank fails
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == ["interrupted", "finished"]
    assert (tmp_path / "run" / "model-final.pt").is_file()


def test_the_peak_memory_of_a_graphed_run_includes_what_its_replays_use_beyond_the_allocators_count(monkeypatch):
    # The graphs' pool is reserved at capture; replays write into it without the allocator counting them.
    from gunn.train.device import peak_memory_mb
    from gunn.train.graphs import CapturedStep

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)  # a GPU's counter
    captured = CapturedStep(("",), pool_bytes=5 * 2**20, unseen_bytes=4 * 2**20)
    assert peak_memory_mb(torch.device("cuda", 0), captured.unseen_bytes) == 7.0
    assert peak_memory_mb(torch.device("cuda", 0)) == 3.0


@pytest.mark.slow
def test_runtime_compile_trains_the_gunn_model_as_eager_does(tmp_path):
    # Inductor on the CPU (about a minute here): the engine's compiled step, the GUNN layers' selective
    # checkpointing under compile, the fast path's eager twin.
    overrides = ("model.segments=[2,2,2]", "data.samples=64", "optim.epochs=1")
    eager = train(small(tmp_path / "eager", *overrides))
    compiled = train(small(tmp_path / "compiled", *overrides, "runtime.compile=true"))
    assert compiled.status == "finished" and not hasattr(compiled.model, "_orig_mod")  # the network, uncompiled
    assert compiled.history[-1]["train_loss"] == pytest.approx(eager.history[-1]["train_loss"], rel=1e-4)
    want, got = eager.model.state_dict(), compiled.model.state_dict()
    scale = max(v.abs().max().item() for v in want.values() if v.is_floating_point())
    worst = max((got[k] - v).abs().max().item() for k, v in want.items() if v.is_floating_point())
    assert worst <= 1e-4 * scale  # (biases whose gradient is zero in exact arithmetic differ by rounding only)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_runtime_compile_mode_reaches_torch_compile(tmp_path, monkeypatch, mode):
    from gunn.train import distributed, engine

    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: seen.append(options) or module)
    config = cfgmod.resolve(small(tmp_path, "runtime.compile=true", f"runtime.compile_mode={mode}"))
    engine.build(config, distributed.DistInfo(0, 1, 0, torch.device("cpu")))
    assert seen == [{"mode": mode}]


@pytest.mark.slow
def test_a_model_of_another_library_trains_resumes_and_logs_as_a_gunn_model_does(tmp_path):
    # torchvision's ResNet-18 by name, through the same engine: checkpoint, resume, MLflow.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("model.name=torchvision.resnet18", "optim.epochs=2", "logging.mlflow=true", f"logging.tracking_uri={uri}")
    first = train(small(tmp_path, *args), stop_after=5)
    assert first.status == "interrupted"
    resumed = train(small(tmp_path, *args))
    straight = train(small(tmp_path / "straight", *args[:2]))
    assert resumed.status == "finished" and same_weights(resumed.model.state_dict(), straight.model.state_dict())
    run = MlflowClient(uri).get_run(resumed.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "torchvision.resnet18"
    assert run.data.params["model.mode"] == "None"  # no GUNN layer: nothing resolved
    with pytest.raises(ConfigError, match=r"model: torchvision.resnet18 has no setting 'mode' \(model.mode=sunn\)"):
        validate(small(tmp_path, "model.name=torchvision.resnet18", "model.mode=sunn"))
    with pytest.raises(ConfigError, match=r"has no setting 'memory' \(model.memory=recompute\)"):
        validate(small(tmp_path, "model.name=torchvision.resnet18", "model.memory=recompute"))
