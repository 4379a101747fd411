"""jobs/launch.py --cluster slurm against the real development cluster (slurm/dev-cluster up --nodes 2)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gunn import config as cfgmod
from gunn.data.base import shard
from gunn.train.engine import train

REPO = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, str(REPO / "jobs" / "launch.py")]
QUICK = ["data.name=synthetic", "data.samples=256", "data.image_size=16", "data.classes=4", "optim.batch_size=16",
         "logging.progress=false"]


def launch(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run(LAUNCH + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def slurm(args: list[str], cwd: Path) -> list[str]:
    return args + ["--cluster", "slurm", "--profile", "dev", "--logs", str(cwd / "logs")]


def job_ids(out: str) -> list[str]:
    return re.findall(r"submitted job (\S+):", out)


def queued_jobs() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def wait_until_gone(job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while job_id.split("_")[0] in {j.split("_")[0] for j in queued_jobs()}:
        assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout} s"
        time.sleep(1)


def test_a_single_task_job_finishes_and_its_mlflow_run_exists(slurm_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    done = launch(slurm(QUICK + ["optim.epochs=2", "--wait"], tmp_path), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (job,) = job_ids(done.stdout)
    assert f"cancel:  scancel {job}" in done.stdout and "follow:  squeue -j" in done.stdout
    assert re.search(rf"job {job}: finished, 2 epochs", done.stdout)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gunn").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["slurm_job_id"] == job
    assert len(client.get_metric_history(run.info.run_id, "eval_top1_error")) == 2


def test_ddp_over_two_nodes_keeps_ranks_identical_and_matches_one_process(slurm_cluster, tmp_path):
    if len(slurm_cluster.nodes) < 2:
        pytest.fail("this test needs the two-node development cluster: slurm/dev-cluster up --nodes 2")
    args = ["optim.epochs=2", "optim.batch_size=64", "logging.mlflow=false", "logging.progress=false"]
    done = launch(slurm(args + ["--nodes", "2", "--tasks-per-node", "1", "--wait"], tmp_path), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (job,) = job_ids(done.stdout)
    logs = {rank: (tmp_path / "logs" / job / f"{job}_{rank}_log.out").read_text() for rank in (0, 1)}
    assert "weights identical on all 2 ranks" in logs[0]
    hosts = {rank: re.search(r"hostname=([\w.-]+)", text).group(1) for rank, text in logs.items()}
    assert hosts[0] != hosts[1], "both ranks ran on one host"
    ddp = [line for line in logs[0].splitlines() if line.startswith("epoch ")]

    local = train(cfgmod.load("digits", args + [f"checkpoint.dir={tmp_path / 'local'}"]))
    # Exactly equal: every global batch of the 2-rank run holds the same 64 images as the
    # one-process run's (rank r reads positions r, r+2, ... of the same seeded permutation),
    # so both take the same number of steps with the same learning rates.
    one = shard(1438, seed=0, epoch=1, rank=0, world_size=1, batch_size=64, train=True)
    two = [shard(1438, seed=0, epoch=1, rank=r, world_size=2, batch_size=32, train=True) for r in (0, 1)]
    for step in range(len(one) // 64):
        assert sorted(two[0][32 * step : 32 * step + 32] + two[1][32 * step : 32 * step + 32]) == \
            sorted(one[64 * step : 64 * step + 64])
    assert len(ddp) == len(local.history) == 2
    for line, epoch in zip(ddp, local.history):
        assert f"lr {epoch['lr']:.4g}" in line
    # Close, not equal: BatchNorm normalises each rank's 32 images with their own statistics
    # instead of the 64 images' (the recipe has no SyncBatchNorm on the CPU), so the
    # gradients differ slightly and the training curves drift apart a little.
    ddp_error = float(re.search(r"eval top-1 ([\d.]+)%", ddp[-1]).group(1))
    ddp_loss = float(re.search(r"train loss ([\d.]+)", ddp[-1]).group(1))
    assert abs(ddp_error - local.history[-1]["eval_top1_error"]) < 15
    assert abs(ddp_loss - local.history[-1]["train_loss"]) < 0.35


def test_a_preempted_job_is_requeued_and_ends_like_an_uninterrupted_run(slurm_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    args = QUICK + ["optim.epochs=5", f"checkpoint.dir={run_dir}"]
    submitted = launch(slurm(args, tmp_path), tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    (job,) = job_ids(submitted.stdout)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoint-e0002-b000000.pt").exists():  # preempt during epoch 3
        assert time.monotonic() < deadline, (tmp_path / "logs" / job / f"{job}_0_log.err").read_text()
        time.sleep(0.2)
    # What submitit's own preemption test does: SIGTERM, then the requeue signal SIGUSR2.
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_until_gone(job, timeout=400)
    log = (tmp_path / "logs" / job / f"{job}_0_log.out").read_text()
    assert f"requeueing job {job} (restart 1)" in log, log
    assert "resuming" in log and "finished: eval top-1 error" in log

    uninterrupted = train(cfgmod.load("digits", args[:-1] + ["logging.mlflow=false",
                                                            f"checkpoint.dir={tmp_path / 'straight'}"]))
    requeued = torch.load(run_dir / "model-final.pt", weights_only=True)
    assert all(torch.equal(v, requeued[k]) for k, v in uninterrupted.model.state_dict().items())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gunn").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_top1_error")] == [1, 2, 3, 4, 5]


def test_two_seeds_become_a_job_array(slurm_cluster, tmp_path):
    done = launch(slurm(QUICK + ["optim.epochs=1", "logging.mlflow=false", "--seeds", "3", "4", "--wait"], tmp_path),
                  tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = job_ids(done.stdout)
    assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0] and {i[-2:] for i in ids} == {"_0", "_1"}
    dirs = re.findall(r"run directory  (\S+)", done.stdout)
    assert [Path(d).name.split("-")[1] for d in dirs] == ["seed3", "seed4"]
    assert [cfgmod.load(Path(d) / "config.yaml").runtime.seed for d in dirs] == [3, 4]
    assert done.stdout.count(": finished, 1 epochs") == 2


def test_sbatch_refusal_is_shown_in_sbatchs_own_words(slurm_cluster, tmp_path):
    done = launch(slurm(QUICK + ["--partition", "no-such-partition"], tmp_path), tmp_path)
    assert done.returncode == 1
    assert "sbatch refused the job" in done.stderr and "invalid partition" in done.stderr.lower()
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["optim.lr=-1"], "error: optim.lr must be >= 0.0, got -1.0"),
        (["gunn15-cifar10", "data.root=nowhere"], "error: cifar10 not found"),
        (["--nodes", "0"], "error: --nodes must be at least 1, got 0"),
        (["optim.batch_size=10", "--nodes", "2", "--tasks-per-node", "2"],
         "error: optim.batch_size=10 must be a multiple of the 4 ranks"),
    ],
)
def test_bad_input_is_rejected_before_anything_is_submitted(slurm_cluster, tmp_path, args, message):
    before = queued_jobs()
    done = launch(slurm(args, tmp_path), tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert queued_jobs() == before and not (tmp_path / "logs").exists()


def test_a_bad_cluster_profile_names_the_file_and_the_option(slurm_cluster, tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text("partition: dev\ngpus: 4\n")
    done = launch(QUICK + ["--cluster", "slurm", "--profile", str(profile)], tmp_path)
    assert done.returncode == 2
    assert f"error: {profile}: unknown option 'gpus'; options: partition" in done.stderr


def test_sigint_to_the_launcher_does_not_cancel_a_submitted_job(slurm_cluster, tmp_path):
    # The launcher gets SIGINT's default disposition, as from a terminal: a test run started in
    # the background of a non-interactive shell (CI scripts) inherits SIGINT ignored, and so
    # would the launcher. PYTHONFAULTHANDLER: should it hang, SIGABRT makes it print where.
    process = subprocess.Popen(LAUNCH + slurm(QUICK + ["optim.epochs=30", "logging.mlflow=false", "--wait"], tmp_path),
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    line = ""
    while "submitted job" not in line:
        line = process.stdout.readline()
        assert line or process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
    job = re.search(r"submitted job (\S+):", line).group(1)
    try:
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            out, err = process.communicate(timeout=30)
            pytest.fail(f"the launcher did not stop following within 60 s of SIGINT:\n{out}\n{err}")
        assert process.returncode == 130, out + err
        assert f"stopped following; the job keeps running (cancel: scancel {job})" in err
        assert job in queued_jobs(), "interrupting --wait must leave the job running"
    finally:
        subprocess.run(["scancel", job], check=False)
