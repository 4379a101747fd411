"""The Slurm development cluster (slurm/dev-cluster up --nodes 2) does what the project's jobs need.

Runs against a cluster that is already up (see conftest.py); takes about 35 s.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import SlurmCluster

AVAILABLE = {"idle", "mixed", "allocated", "completing"}  # responding, not down or drained
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def run(args: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)


def sbatch(args: list[str], cwd: Path) -> str:
    done = run(["sbatch", "--parsable", *args], cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job`'s answer as a dict (it keeps finished jobs for MinJobAge = 30 min)."""
    done = run(["scontrol", "show", "job", "--oneliner", job_id])
    assert done.returncode == 0, done.stderr
    return dict(re.findall(r"(\w[\w/:]*)=(\S*)", done.stdout))


def wait_finished(job_id: str, timeout: float = 40) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (fields := job_fields(job_id))["JobState"] not in FINISHED:
        assert time.monotonic() < deadline, f"job {job_id} not finished after {timeout} s: {fields}"
        time.sleep(0.25)
    return fields


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_every_node_is_available_in_the_default_dev_partition(slurm_cluster: SlurmCluster):
    assert slurm_cluster.partition == "dev"
    done = run(["sinfo", "-h", "-N", "-o", "%N %T %a %c"])
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert sorted(node for node, *_ in rows) == slurm_cluster.nodes
    for node, state, partition_state, cpus in rows:
        assert state in AVAILABLE, f"node {node} is {state}: {done.stdout}"
        assert partition_state == "up" and int(cpus) >= 1


def test_srun_runs_one_task_on_every_node_each_with_its_own_hostname(slurm_cluster: SlurmCluster):
    n = len(slurm_cluster.nodes)
    done = run(["srun", f"-N{n}", "--ntasks-per-node=1", "hostname"])
    assert done.returncode == 0, done.stderr
    hosts = sorted(line.split(".")[0] for line in done.stdout.split())
    assert hosts == slurm_cluster.nodes  # with --nodes 2: two different hostnames, gunn-node1 and 2


GLOO = """
import datetime, os, socket
import torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                        rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
print(f"rank={rank} host={socket.gethostname()} sum={value.item():g}", flush=True)
dist.destroy_process_group()
"""


def test_gloo_all_reduce_between_two_nodes(slurm_cluster: SlurmCluster):
    if len(slurm_cluster.nodes) < 2:
        pytest.skip("needs a cluster of two nodes or more: slurm/dev-cluster up --nodes 2")
    env = {**os.environ, "MASTER_ADDR": slurm_cluster.nodes[0], "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    pair = ",".join(slurm_cluster.nodes[:2])  # rank 0 on the first node, where MASTER_ADDR points
    done = run(["srun", "-N2", "--ntasks-per-node=1", f"--nodelist={pair}", "--kill-on-bad-exit=1", sys.executable,
                "-c", GLOO], env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = dict(re.findall(r"rank=(\d) host=(\S+) sum=3\b", done.stdout))
    assert set(ranks) == {"0", "1"}, done.stdout + done.stderr  # both ranks got 1 + 2
    assert ranks["0"] == slurm_cluster.nodes[0] and ranks["0"] != ranks["1"], ranks  # ... over the network


def test_sbatch_wrap_job_completes_and_writes_its_output_file(slurm_cluster: SlurmCluster, tmp_path: Path):
    job = sbatch(["--chdir", str(tmp_path), "--output", str(tmp_path / "job-%j.out"),
                  "--wrap", 'echo "hello from $(hostname) in $PWD"'], tmp_path)
    fields = wait_finished(job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", fields
    assert fields["Partition"] == "dev" and fields["NodeList"] in slurm_cluster.nodes
    output = (tmp_path / f"job-{job}.out").read_text()  # the nodes see the submitter's files
    assert output.strip() == f"hello from {fields['NodeList']} in {tmp_path}"


def test_sbatch_to_an_unknown_partition_is_refused_in_slurms_words(slurm_cluster: SlurmCluster, tmp_path: Path):
    done = run(["sbatch", "--partition", "no-such-partition", "--wrap", "true"], cwd=tmp_path)
    assert done.returncode != 0 and done.stdout == ""
    assert "invalid partition" in done.stderr.lower(), done.stderr


def test_a_job_array_runs_every_task(slurm_cluster: SlurmCluster, tmp_path: Path):
    job = sbatch(["--array", "0-3", "--output", str(tmp_path / "task-%a.out"),
                  "--wrap", "echo task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID"], tmp_path)
    for task in range(4):
        fields = wait_finished(f"{job}_{task}")
        assert fields["JobState"] == "COMPLETED", fields
        assert (tmp_path / f"task-{task}.out").read_text().strip() == f"task {task} of {job}"


@pytest.mark.slow
def test_a_job_that_requeues_itself_runs_again(slurm_cluster: SlurmCluster, tmp_path: Path):
    # What a preempted training job does: `scontrol requeue` from inside the job (JobRequeue=1);
    # Slurm lets it start again after AuthInfo=cred_expire (15 s here).
    script = ('echo "run ${SLURM_RESTART_COUNT:-0}" >> runs.txt; '
              'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then scontrol requeue "$SLURM_JOB_ID"; sleep 120; fi')
    job = sbatch(["--chdir", str(tmp_path), "--output", "/dev/null", "--wrap", script], tmp_path)
    fields = wait_finished(job, timeout=60)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", fields
    assert (tmp_path / "runs.txt").read_text().split("\n") == ["run 0", "run 1", ""]
