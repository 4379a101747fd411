"""How a process finds its place in the job and its share of the CPUs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

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


def test_commas_inside_brackets_do_not_split_a_host_expression():
    assert distributed.expand_nodelist("node[01-03,7],gpu5") == ["node01", "node02", "node03", "node7", "gpu5"]


def test_a_suffix_after_the_brackets_is_kept_on_every_host():
    assert distributed.expand_nodelist("node[1-2]-ib") == ["node1-ib", "node2-ib"]


def test_several_bracket_groups_expand_with_the_last_group_varying_fastest():
    assert distributed.expand_nodelist("rack[1-2]-node[01-02]-ib") == [
        "rack1-node01-ib", "rack1-node02-ib", "rack2-node01-ib", "rack2-node02-ib"]


def test_with_three_bracket_groups_the_middle_one_varies_slowest_as_in_scontrol():
    # Slurm's hostlist.c expands the groups before the last one from right to left, recursively:
    # the last group varies fastest, then the first, and the middle one slowest.
    assert distributed.expand_nodelist("a[1-2]b[3-4]c[5-6]") == [
        "a1b3c5", "a1b3c6", "a2b3c5", "a2b3c6", "a1b4c5", "a1b4c6", "a2b4c5", "a2b4c6"]


@pytest.mark.parametrize("nodelist,expected", [
    ("n[01-03]", ["n01", "n02", "n03"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
])
def test_ranges_keep_the_zero_padding_of_their_start(nodelist, expected):
    assert distributed.expand_nodelist(nodelist) == expected


def test_a_bracket_list_mixes_single_numbers_and_ranges_in_the_order_written():
    assert distributed.expand_nodelist("n[7,1,3-5]") == ["n7", "n1", "n3", "n4", "n5"]


def test_plain_names_are_kept_as_written_dots_and_dashes_included():
    assert distributed.expand_nodelist("login.cluster.org,gpu-a100-01,node07") == [
        "login.cluster.org", "gpu-a100-01", "node07"]


def test_whitespace_around_hosts_separates_them_like_commas():
    assert distributed.expand_nodelist(" node1 , node2\tnode[3-4] ") == ["node1", "node2", "node3", "node4"]


@pytest.mark.parametrize("nodelist", ["n[1-2", "n1-2]", "n[[1-2]]", "n[3-1]", "n[a-b]", "n[]", "n[1-]", "n[1,]"])
def test_a_malformed_host_list_raises_value_error_naming_it(nodelist):
    with pytest.raises(ValueError, match=re.escape(repr(nodelist))):
        distributed.expand_nodelist(nodelist)


@pytest.mark.parametrize("nodelist,has_suffix", [
    ("node[01-03,7],gpu5", False),
    ("rack[1-2]-node[01-02]", False),
    ("a[1-2]b[3-4]c[5-6]d[7-8]", False),
    ("n[1-2][3-4],m[9-11]", False),
    ("node[8-10],node[098-101]", False),
    ("n[7,1,3-5,1],n[01-2,1-02]", False),
    (" login.cluster.org , gpu-a100-01\tnode07 ", False),
    ("node[1-2]-ib", True),
    ("rack[1-2]-node[01-02]-ib,a[1-2]b[3-4]c[5-6].x", True),
])
def test_host_lists_expand_as_scontrol_show_hostnames_does(tmp_path, nodelist, has_suffix):
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed (apt-get install slurm-client)")
    # scontrol reads a configuration before anything else, even to expand a host list; a minimal
    # one suffices, and no Slurm daemon needs to run.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\n")
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SLURM_CONF": str(conf)}, check=False)
    if has_suffix and "Invalid hostlist" in done.stderr:
        # Slurm 22.05 (Debian 12's) rejects a suffix after the last bracket group; later Slurm accepts it.
        pytest.skip(f"this scontrol rejects suffixes after brackets: {done.stderr.strip()}")
    assert (done.returncode, done.stderr) == (0, "")
    assert distributed.expand_nodelist(nodelist) == done.stdout.split()


def test_sync_batch_norm_converts_only_what_lies_outside_the_gunn_layers():
    from torch import nn

    from gunn.layers import GunnLayer
    from gunn.models import create_model

    model, synced, kept = distributed.sync_batch_norm(create_model("gunn18"))
    # Stem and four transitions; 3 per update unit inside the layers (10 + 20 + 40 + 50 units).
    assert (synced, kept) == (5, 3 * 120)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 5
    layers = [m for m in model.modules() if isinstance(m, GunnLayer)]
    assert not any(isinstance(m, nn.SyncBatchNorm) for layer in layers for m in layer.modules())
    # So the layers keep their fast path (and SUNN its fused path): it needs plain BatchNorm2d.
    x = torch.randn(2, 400, 4, 4)
    assert layers[0].fast_path_applies(x)


def _threads_of_a_rank(rank: int, port: int, out: str) -> None:
    import json
    import signal

    from gunn.train import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    before = {task.name for task in Path("/proc/self/task").iterdir()}  # e.g. a thread of torch's own
    distributed.setup("cpu", "gloo", 1)
    main = threading.get_native_id()
    masks = {}
    for task in Path("/proc/self/task").iterdir():
        status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        masks[task.name] = (status["Name"].strip(), int(status["SigBlk"], 16))
    stop = sum(1 << (s - 1) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))
    # The threads the process group started (a new one may still carry the name "python" before it names itself).
    result = {f"{name} {tid}": bool(mask & stop == stop) for tid, (name, mask) in masks.items() if tid not in before}
    result["main"] = bool(masks[str(main)][1] & stop)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    distributed.teardown()


@pytest.mark.slow
def test_the_process_groups_threads_leave_stop_signals_to_the_main_thread(tmp_path):
    # A stop signal delivered to a gloo thread interrupts its system call there (and a rank was seen to
    # abort: "terminate called without an active exception"); blocked in those threads, it goes to
    # the main thread, where Python runs the handler anyway.
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_threads_of_a_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert threads.pop("main") is False  # the main thread takes the signals
        assert threads and all(threads.values()), threads  # every other thread blocks them


def test_one_port_per_slurm_job_and_one_mapping_from_slurm(monkeypatch):
    assert distributed.job_port("123") == distributed.job_port(123) == distributed.job_port("123_4") == 20123
    assert distributed.job_port(40005) == 20005
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
             "SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    env = distributed.slurm_environment(slurm)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "n1", "MASTER_PORT": "20077"}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert distributed.environment() == env  # torchrun's variables absent: the same mapping


def test_one_process_forms_a_process_group_of_one_rank_only_when_a_backend_is_named(monkeypatch):
    import torch.distributed as dist

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    plain = distributed.setup("cpu", "auto")
    assert (plain.world_size, plain.backend, plain.grouped, dist.is_initialized()) == (1, None, False, False)
    grouped = distributed.setup("cpu", "gloo")
    try:
        assert (grouped.world_size, grouped.backend, grouped.grouped) == (1, "gloo", True)
        assert dist.is_initialized() and dist.get_world_size() == 1
        # The collectives of several ranks, here over one
        assert distributed.broadcast_object({"run": 1}) == {"run": 1} and distributed.gather_to_main(7) == [7]
        assert distributed.all_reduce_max([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    finally:
        distributed.teardown()
    assert not dist.is_initialized() and "MASTER_PORT" not in os.environ  # no port: nobody else joins
