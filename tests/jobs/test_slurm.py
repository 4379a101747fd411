"""jobs/launch.py --cluster slurm against the real development cluster (slurm/dev-cluster up --nodes 2)."""

from __future__ import annotations

import os
import re
import shlex
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
# Tiny data, and no MLflow model export at the end (seconds a run; tests/train/test_mlflow_model.py checks it).
QUICK = ["data.name=synthetic", "data.samples=256", "data.image_size=16", "data.classes=4", "optim.batch_size=16",
         "logging.progress=false", "logging.model=false"]


def launch(args: list[str], cwd: Path, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", **extra_env)
    return subprocess.run(LAUNCH + args, check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


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


@pytest.mark.slow
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
    # Where the run logs to, on submission, and which run it is, at the end (the job runs in this directory).
    store = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert f"  MLflow store   {store}  (browse: mlflow ui --backend-store-uri {store})" in done.stdout
    assert f"job {job}: MLflow run {run.info.run_id} at {store}  (browse: mlflow ui --backend-store-uri {store})" \
        in done.stdout


@pytest.mark.slow
def test_ddp_over_two_nodes_keeps_ranks_identical_and_matches_one_process(slurm_cluster, tmp_path):
    if len(slurm_cluster.nodes) < 2:
        pytest.fail("this test needs the two-node development cluster: slurm/dev-cluster up --nodes 2")
    args = ["optim.epochs=2", "optim.batch_size=64", "logging.mlflow=false", "logging.progress=false"]
    # sbatch exports the submitting shell's environment into the job: a master address and port left there
    # (by an enclosing torchrun, say) must not replace the job's own (its first node, the job's port).
    done = launch(slurm(args + ["--nodes", "2", "--tasks-per-node", "1", "--wait"], tmp_path), tmp_path,
                  MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    assert done.returncode == 0, done.stdout + done.stderr
    (job,) = job_ids(done.stdout)
    logs = {rank: (tmp_path / "logs" / job / f"{job}_{rank}_log.out").read_text() for rank in (0, 1)}
    assert "weights identical on all 2 ranks" in logs[0]
    hosts = {rank: re.search(r"hostname=([\w.-]+)", text).group(1) for rank, text in logs.items()}
    assert hosts[0] != hosts[1], "both ranks ran on one host"
    for rank in (0, 1):  # nothing but the job's own output: no c10d warning that a peer's name is unknown
        errors = (tmp_path / "logs" / job / f"{job}_{rank}_log.err").read_text()
        assert "[c10d]" not in errors and "Warning" not in errors, errors
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


@pytest.mark.slow
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
    assert "run again" not in log and "run the same command again" not in log  # the job goes on by itself

    uninterrupted = train(cfgmod.load("digits", args[:-1] + ["logging.mlflow=false",
                                                            f"checkpoint.dir={tmp_path / 'straight'}"]))
    requeued = torch.load(run_dir / "model-final.pt", weights_only=True)
    assert all(torch.equal(v, requeued[k]) for k, v in uninterrupted.model.state_dict().items())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gunn").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_top1_error")] == [1, 2, 3, 4, 5]


def task_holds_signals(logs: Path, timeout: float = 120) -> None:
    """Returns as soon as the Python of a task whose command line names ``logs`` has SIGUSR2 blocked
    (``slurm.job_python``: its first statement). Before that, in the first milliseconds of the task, the
    signal's default action would end it: a window that a poll of squeue hits on a fast machine."""
    usr2 = 1 << (signal.SIGUSR2 - 1)
    deadline = time.monotonic() + timeout
    while True:
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if argv[0] != sys.executable.encode() or not any(str(logs).encode() in a for a in argv):
                    continue
                blocked = re.search(r"^SigBlk:\s*([0-9a-f]+)$", (proc / "status").read_text(), re.M)
            except OSError:
                continue
            if blocked and int(blocked.group(1), 16) & usr2:
                return
        assert time.monotonic() < deadline, f"no task of {logs} blocked SIGUSR2 within {timeout} s"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigusr2_while_the_job_starts_requeues_it_and_it_finishes(slurm_cluster, tmp_path):
    submitted = launch(slurm(QUICK + ["optim.epochs=1", "logging.mlflow=false"], tmp_path), tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    (job,) = job_ids(submitted.stdout)
    task_holds_signals(tmp_path / "logs")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # Python and torch are still being loaded
    wait_until_gone(job, timeout=400)
    log = (tmp_path / "logs" / job / f"{job}_0_log.out").read_text()
    assert "signal SIGUSR2 before training started: not training" in log, log
    assert f"requeueing job {job} (restart 1); it continues from the start in" in log and "(no checkpoint)" in log
    assert "finished: eval top-1 error" in log
    state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    assert "JobState=COMPLETED" in state and "Restarts=1" in state, state


@pytest.mark.slow
def test_at_its_requeue_limit_a_job_says_where_its_checkpoint_is_and_how_to_continue(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    args = slurm(QUICK + ["optim.epochs=3", "logging.mlflow=false", f"checkpoint.dir={run_dir}", "--max-requeues",
                          "0"], tmp_path)
    process = subprocess.Popen(LAUNCH + args + ["--wait"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoint-*.pt")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    job = re.search(r"submitted job (\S+):", process.stdout.readline()).group(1)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1, out + err
    summary = re.search(rf"job {job}: (stopped at its requeue limit .*)", out).group(1)
    assert re.fullmatch(rf"stopped at its requeue limit \(0 requeues\) after [12] epochs; its checkpoint is in "
                        rf"{run_dir}\. To continue: python \S+ .*checkpoint.dir={run_dir} --cluster slurm --profile dev "
                        rf"--max-requeues 0 --logs {tmp_path / 'logs'} \(or raise --max-requeues\)", summary), summary
    assert "nan%" not in out
    # The command it gives continues the run.
    command = shlex.split(summary.split("To continue: ")[1].removesuffix(" (or raise --max-requeues)"))
    resumed = launch(command[2:] + ["--wait"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "finished, 3 epochs" in resumed.stdout


def test_a_pending_job_holds_its_run_directory_against_a_second_submission(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    args = slurm(QUICK + ["optim.epochs=1", "logging.mlflow=false", f"checkpoint.dir={run_dir}"], tmp_path)
    first = launch(args + ["--sbatch", "begin=now+3600"], tmp_path)  # pending for an hour (BeginTime)
    assert first.returncode == 0, first.stdout + first.stderr
    (job,) = job_ids(first.stdout)
    try:
        second = launch(args, tmp_path)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stdout + second.stderr
        assert (f"error: checkpoint.dir {run_dir} is claimed by Slurm job {job} (PENDING, BeginTime), submitted "
                in second.stderr and f"wait for it to end, scancel {job}, or choose another checkpoint.dir"
                in second.stderr), second.stderr
        assert queued_jobs() & set(job_ids(second.stdout)) == set() and not job_ids(second.stdout)
    finally:
        subprocess.run(["scancel", job], check=False)


@pytest.mark.slow
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


def test_sbatch_refusal_is_shown_in_sbatchs_own_words_and_leaves_no_files(slurm_cluster, tmp_path):
    done = launch(slurm(QUICK + ["--partition", "no-such-partition"], tmp_path), tmp_path)
    assert done.returncode == 1
    assert "sbatch refused the job" in done.stderr and "invalid partition" in done.stderr.lower()
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "logs").exists()  # neither submitit's pickle and sbatch script nor the folder
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "notes.txt").write_text("mine")
    again = launch(slurm(QUICK + ["--seeds", "1", "2", "--partition", "no-such-partition"], tmp_path), tmp_path)
    assert again.returncode == 1 and "sbatch refused the job" in again.stderr
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_a_job_its_partition_can_never_run_is_refused_before_submission(slurm_cluster, tmp_path):
    cpus = max(int(c) for c in subprocess.run(["sinfo", "-h", "-N", "-p", slurm_cluster.partition, "-o", "%c"],
                                              capture_output=True, text=True, check=True).stdout.split())
    nodes = len(slurm_cluster.nodes)
    before = queued_jobs()
    for args, message in [
        (["--nodes", str(nodes + 1), f"optim.batch_size={16 * (nodes + 1)}"],
         f"error: --nodes {nodes + 1} exceeds partition dev's {nodes} nodes"),
        (["--cpus-per-task", str(cpus + 1)], (f"error: --cpus-per-task {cpus + 1} exceeds the {cpus} CPUs of partition "
                                             "dev's largest node")),
        (["--cpus-per-task", str(cpus), "--tasks-per-node", "2", "optim.batch_size=32"],
         f"error: --cpus-per-task {cpus} x --tasks-per-node 2 = {2 * cpus} CPUs a node exceeds the {cpus} CPUs"),
        (["--gpus-per-node", "1"], "error: --gpus-per-node 1, but partition dev's nodes have no GPUs (no gpu GRES)"),
    ]:
        done = launch(slurm(QUICK + args, tmp_path), tmp_path)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert queued_jobs() == before and not (tmp_path / "logs").exists()
    # The development cluster refuses such jobs itself, as sites do (EnforcePartLimits=ALL), instead of
    # letting them pend forever (PartitionNodeLimit, PartitionConfig).
    refused = subprocess.run(["sbatch", f"--nodes={nodes + 1}", "--wrap", "true"], check=False, capture_output=True,
                             text=True, cwd=tmp_path)
    assert refused.returncode != 0 and "Node count specification invalid" in refused.stderr


def test_wait_stops_following_a_job_that_can_never_start(slurm_cluster, tmp_path):
    # A real pending reason that never clears: a dependency on a job that failed.
    failed = subprocess.run(["sbatch", "--parsable", "--wrap", "false"], capture_output=True, text=True, check=True,
                            cwd=tmp_path).stdout.strip()
    done = launch(slurm(QUICK + ["logging.mlflow=false", "--sbatch", f"dependency=afterok:{failed}", "--wait"],
                        tmp_path), tmp_path, timeout=120)
    (job,) = job_ids(done.stdout)
    try:
        assert done.returncode == 1, done.stdout + done.stderr
        assert (f"job {job} will never start: it is pending for DependencyNeverSatisfied: it depends on a job that "
                f"ended in a way that can never satisfy the dependency. Cancel it with scancel {job}") in done.stdout
    finally:
        subprocess.run(["scancel", job], check=False)


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
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
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
