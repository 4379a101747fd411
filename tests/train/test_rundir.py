"""The run directory: one launch trains it at a time, stale locks are taken over, unwritable ones refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gunn.train import checkpoint as ckpt
from gunn.train import rundir
from gunn.train.engine import train
from gunn.train.rundir import RunDirError, RunDirLock
from tests.mlflow_server import REPO_ROOT
from tests.train.test_engine import small

LAUNCH = [sys.executable, str(REPO_ROOT / "jobs" / "launch.py")]
QUICK = ["data.name=synthetic", "data.samples=128", "data.image_size=16", "data.classes=4", "data.workers=0",
         "optim.batch_size=16", "logging.progress=false"]


def launch(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "SLURM_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.Popen(LAUNCH + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def write_lock(directory: Path, **holder) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / rundir.LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "pid_start": None, "slurm_job": None,
                                "restart": "0", "since": "2026-12-01 10:00:00", **holder}))
    return path


@pytest.mark.slow
def test_a_second_launch_on_a_run_directory_in_use_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    first = launch(QUICK + ["optim.epochs=40", "logging.mlflow=false", f"checkpoint.dir={run_dir}"], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.list_checkpoints(run_dir):  # the first launch is training
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        config_before = (run_dir / "config.yaml").read_text()
        second = launch(QUICK + ["optim.epochs=2", f"checkpoint.dir={run_dir}"], tmp_path)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, out + err
        assert f"error: checkpoint.dir {run_dir} is in use by pid {first.pid} on host {socket.gethostname()}" in err
        assert "Traceback" not in err
        # Nothing of the second launch reached the run: not its settings, not an MLflow store.
        assert (run_dir / "config.yaml").read_text() == config_before
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_two_identical_launches_at_once_train_once(tmp_path):
    run_dir = tmp_path / "run"
    # Long enough (seconds) that whichever starts training first still holds the lock when the other checks.
    args = QUICK + ["optim.epochs=10", "logging.mlflow=false", f"checkpoint.dir={run_dir}"]
    both = [launch(args, tmp_path), launch(args, tmp_path)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in both]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "is in use by pid" in refused and "Traceback" not in refused
    assert len((run_dir / "starts.log").read_text().splitlines()) == 1  # one run trained it
    assert not (run_dir / rundir.LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
def test_the_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_notice(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path / "run", pid=dead.pid, pid_start="1")
    with pytest.warns(UserWarning, match=f"taking over the lock .* from pid {dead.pid} on host .*: process "
                                         f"{dead.pid} (no longer exists|has ended)"):
        result = train(small(tmp_path, "optim.epochs=1"))
    assert result.status == "finished" and not (result.run_dir / rundir.LOCK_NAME).exists()


@pytest.mark.slow
def test_the_launchers_notices_are_one_line_each(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path / "run", pid=dead.pid, pid_start="1")
    done = launch(QUICK + ["optim.epochs=1", "logging.mlflow=false", f"checkpoint.dir={tmp_path / 'run'}"], tmp_path)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, out + err
    notice = [line for line in err.splitlines() if "taking over the lock" in line]
    assert len(notice) == 1 and notice[0].startswith("warning: taking over the lock"), err
    assert "UserWarning" not in err and "warnings.warn" not in err and ".py:" not in err


def test_a_live_process_of_this_host_keeps_its_lock_even_against_the_engine(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        start = Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        write_lock(tmp_path / "run", pid=holder.pid, pid_start=start, slurm_job="77_3")
        with pytest.raises(RunDirError, match=rf"is in use by pid {holder.pid} on host .* \(Slurm job 77_3\)"):
            train(small(tmp_path, "optim.epochs=1"))
        assert not ckpt.list_checkpoints(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_on_another_host_holds_while_refreshed_and_is_taken_over_when_silent(tmp_path):
    path = write_lock(tmp_path / "run", host="gunn-node2", pid=4242)
    with pytest.raises(RunDirError, match="in use by pid 4242 on host gunn-node2"):
        RunDirLock(tmp_path / "run").acquire()
    silent = time.time() - rundir.STALE_S - 30
    os.utime(path, (silent, silent))
    lock = RunDirLock(tmp_path / "run")
    with pytest.warns(UserWarning, match=r"from pid 4242 on host gunn-node2.*: it was last refreshed \d+ s ago"):
        lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_previous_run(tmp_path, monkeypatch):
    # The previous incarnation ran on another node and was requeued a moment ago (its lock is fresh).
    write_lock(tmp_path / "run", host="gunn-node2", pid=4242, slurm_job="31", restart="0")
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunDirLock(tmp_path / "run")
    with pytest.warns(UserWarning, match=r"Slurm job 31\).*: it is this Slurm job's previous run \(restart 0\)"):
        lock.acquire()
    lock.release()
    # Another Slurm job (a second submission) does not.
    write_lock(tmp_path / "run", host="gunn-node2", pid=4242, slurm_job="30")
    with pytest.raises(RunDirError, match=r"Slurm job 30"):
        RunDirLock(tmp_path / "run").acquire()


def test_the_lock_is_refreshed_while_the_run_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    lock = RunDirLock(tmp_path / "run")
    lock.acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 5
    finally:
        lock.release()


@pytest.mark.slow
def test_array_tasks_are_told_apart_and_every_job_of_a_run_is_kept(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    train(small(tmp_path, "optim.epochs=1", "logging.mlflow=true", f"logging.tracking_uri={uri}"))
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "57")  # the same run resubmitted as a plain job
    train(small(tmp_path, "optim.epochs=2", "logging.mlflow=true", f"logging.tracking_uri={uri}"))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gunn").experiment_id])
    assert run.data.tags["slurm_job_id"] == "57"
    assert run.data.tags["slurm_job_ids"] == "40_1,57"
    starts = (tmp_path / "run" / "starts.log").read_text().splitlines()
    assert [line.split(" Slurm job ")[1].split()[0] for line in starts] == ["40_1", "57"]


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                           capture_output=True, text=True, check=False)
    if mount.returncode != 0:
        pytest.skip(f"a read-only file system is simulated with a read-only tmpfs (needs root): {mount.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("inside", ["", "new/run"])
def test_an_unwritable_run_directory_is_refused_before_anything_starts(tmp_path, read_only_folder, inside):
    target = read_only_folder / inside if inside else read_only_folder
    done = launch(QUICK + ["optim.epochs=1", f"checkpoint.dir={target}"], tmp_path)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 2, out + err
    assert f"error: checkpoint.dir {target} cannot be written" in err and "Read-only file system" in err
    assert "Traceback" not in err and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_the_default_mlflow_store_in_a_read_only_working_directory_is_refused_before_anything_starts(
        tmp_path, read_only_folder):
    done = launch(QUICK + ["optim.epochs=1", f"checkpoint.dir={tmp_path / 'run'}"], read_only_folder)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 2, out + err
    assert (f"error: the default MLflow store sqlite:///{read_only_folder / 'mlflow.db'}: {read_only_folder} cannot "
            "be written: Read-only file system; set logging.tracking_uri to a store runs can log to, or "
            "logging.mlflow=false") in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_directory_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    done = launch(QUICK + [f"checkpoint.dir={tmp_path / 'file' / 'run'}"], tmp_path)
    _, err = done.communicate(timeout=120)
    assert done.returncode == 2 and f"{tmp_path / 'file'} is not a directory" in err, err


@pytest.mark.slow
def test_partial_writes_of_a_killed_run_are_removed_when_the_run_continues(tmp_path):
    train(small(tmp_path, "optim.epochs=1"))
    left = [tmp_path / "run" / ".checkpoint-e0001-b000003.pt.tmp-999999", tmp_path / "run" / "keep.tmp-1"]
    for path in left:
        path.write_bytes(b"\0" * 100)  # what SIGKILL in the middle of a checkpoint write leaves
    train(small(tmp_path, "optim.epochs=2"))
    assert not left[0].exists() and left[1].exists()  # only the run's own hidden temporary files
