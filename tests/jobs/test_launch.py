"""jobs/launch.py as users run it: defaults, checks before work, signals, local processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, str(REPO / "jobs" / "launch.py")]
QUICK = ["data.name=synthetic", "data.samples=256", "data.image_size=16", "data.classes=4", "optim.batch_size=16",
         "logging.progress=false"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PYTHONFAULTHANDLER"] = "1"  # a rank that crashes shows where
    return env


def launch(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(LAUNCH + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600, **kwargs)


def launch_until_checkpoint(args: list[str], cwd: Path, run_dir: Path) -> subprocess.Popen:
    """Starts the launcher and returns once the run has written its first checkpoint."""
    process = subprocess.Popen(LAUNCH + args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoint-*.pt")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    return process


def test_no_arguments_trains_the_digits_demo_to_95_percent_and_logs_it_locally(tmp_path):
    from mlflow.tracking import MlflowClient

    done = launch([], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    error = float(re.search(r"finished: eval top-1 error ([\d.]+)%", done.stdout).group(1))
    assert error <= 5.0, done.stdout
    run_dir = Path(re.search(r"finished: 6/6 epochs in (\S+)", done.stdout).group(1))
    assert run_dir.parent == tmp_path / "runs" and (run_dir / "model-final.pt").is_file()
    run_id = re.search(r"MLflow run (\w+) at (\S+)", done.stdout).group(1)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert float(run.data.metrics["eval_top1_error"]) == pytest.approx(error, abs=0.01)


@pytest.mark.parametrize(
    "args,message",
    [
        (["optim.lr=-1"], "error: optim.lr must be >= 0.0, got -1.0"),
        (["gunn15-cifar10", "data.root=nowhere"], "error: cifar10 not found: expected nowhere/cifar-10-batches-py/"),
        (["no-such-preset"], "error: no preset or configuration file 'no-such-preset'"),
        (["model.segments=[5, 5, 5]"], "error: model: segments[0] must be a positive divisor"),
        (["runtime.device=cuda"], "error: runtime.device='cuda' but CUDA is not usable: "),
    ],
)
def test_bad_input_is_reported_with_its_field_before_any_work(tmp_path, args, message):
    done = launch(args, tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_fields_and_the_resolved_configuration_can_be_printed(tmp_path):
    fields = launch(["--fields"], tmp_path)
    assert fields.returncode == 0 and "optim.batch_size" in fields.stdout
    resolved = launch(["gunn15-cifar100", "optim.epochs=3", "--print-config", "data.root=."], tmp_path)
    assert resolved.returncode == 2  # no CIFAR here: checked even before printing
    printed = launch(["optim.epochs=3", "--print-config"], tmp_path)
    assert printed.returncode == 0 and "epochs: 3" in printed.stdout and f"dir: {tmp_path}/runs/digits-" in printed.stdout


def test_a_slurm_job_given_gpus_must_train_on_them_and_the_login_node_does_not_check_them(tmp_path):
    printed = launch(["--cluster", "slurm", "--gpus-per-node", "1", "--print-config"], tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert "device: cuda" in printed.stdout  # in the job, a GPU that CUDA cannot use stops it with the reason
    local = launch(["--cluster", "slurm", "--print-config"], tmp_path)
    assert "device: auto" in local.stdout


def test_sigterm_checkpoints_and_a_second_launch_finishes_the_run(tmp_path):
    run_dir = tmp_path / "run"
    args = QUICK + ["optim.epochs=40", "logging.mlflow=false", f"checkpoint.dir={run_dir}"]
    process = launch_until_checkpoint(args, tmp_path, run_dir)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 3, err[-2000:]
    assert "checkpointed at epoch" in out
    resumed = launch(args[:-3] + ["optim.epochs=3", "logging.mlflow=false", f"checkpoint.dir={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "finished: 3/3 epochs" in resumed.stdout


def test_nproc_runs_data_parallel_processes_on_this_machine(tmp_path):
    done = launch(QUICK + ["optim.epochs=1", "logging.mlflow=false", f"checkpoint.dir={tmp_path / 'run'}",
                           "--nproc", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished: 2 processes" in done.stdout
    # Two ranks on this machine share its CPUs instead of each taking all of them.
    assert f"2 ranks, {max(1, len(os.sched_getaffinity(0)) // 2)} CPU thread(s) each" in done.stdout
    assert (tmp_path / "run" / "model-final.pt").is_file()


def _spawned_ranks(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")]


def test_a_killed_rank_stops_the_run_with_a_clear_error_and_the_run_continues_from_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = QUICK + ["optim.epochs=6", "logging.mlflow=false", f"checkpoint.dir={run_dir}", "--nproc", "2"]
    process = launch_until_checkpoint(args, tmp_path, run_dir)
    ranks = _spawned_ranks(process.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, err[-2000:]
    assert re.search(r"error: rank [01] of 2 failed: process [01] terminated with signal SIGKILL", err), err[-2000:]
    assert f"Run the same command again to continue {run_dir}" in err and "Traceback" not in err
    resumed = launch(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr + resumed.stdout and (run_dir / "model-final.pt").is_file()
