"""How a process finds its place in the job and its share of the CPUs."""

from __future__ import annotations

import os

import pytest

from gunn.train import distributed


def test_slurm_tasks_per_node_is_read_for_this_node():
    assert [distributed.tasks_on_this_node("2(x3),1", node) for node in range(4)] == [2, 2, 2, 1]
    assert distributed.tasks_on_this_node("4", 0) == 4


def test_the_local_world_size_comes_from_torchrun_or_slurm(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "5")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "3,2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    env = distributed.environment()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"]) == ("3", "5", "2", "node1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.environment()["LOCAL_WORLD_SIZE"] == "4"


@pytest.mark.parametrize("requested,env,local,expected", [
    (3, {}, 2, 3),                               # asked for: always
    (0, {"OMP_NUM_THREADS": "2"}, 4, None),      # torch reads OMP_NUM_THREADS itself
    (0, {}, 1, None),                            # the node's only rank: torch's own default
    (0, {}, 2, "half"),                          # several local ranks share the CPUs
    (0, {"SLURM_CPUS_PER_TASK": "1"}, 2, 1),     # Slurm's share, whatever the affinity says
])
def test_cpu_threads_are_shared_out_among_the_ranks_of_a_node(monkeypatch, requested, env, local, expected):
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if expected == "half":
        expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert distributed.cpu_threads(requested, local) == expected
