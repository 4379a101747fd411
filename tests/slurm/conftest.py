"""The `slurm_cluster` fixture: the Slurm development cluster that `slurm/dev-cluster up` started.

The tests never start the cluster themselves (that needs root and takes the machine's network
namespaces); someone runs `slurm/dev-cluster up --nodes 2` first, as .ci/run does. Without a
cluster the tests are skipped with a message saying how to start one, except under CI=true,
where they fail: CI must not pass by silently skipping them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DEV_CLUSTER = Path(__file__).resolve().parents[2] / "slurm" / "dev-cluster"
HOW_TO_START = f"start one (as root) with: {DEV_CLUSTER} up --nodes 2   (and '{DEV_CLUSTER} down' afterwards)"


@dataclass(frozen=True)
class SlurmCluster:
    """What the running cluster looks like, as sinfo reports it."""

    nodes: list[str]  # node names, sorted (gunn-node1, gunn-node2, ... or the host's name)
    partition: str  # the default partition ("dev")
    states: dict[str, str]  # node name -> state as sinfo prints it (idle, mixed, allocated, ...)


def _unavailable(reason: str) -> None:
    message = f"no Slurm dev cluster: {reason}; {HOW_TO_START}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " [CI=true: failing instead of skipping]", pytrace=False)
    pytest.skip(message)


def query_cluster() -> SlurmCluster:
    if shutil.which("sinfo") is None:
        _unavailable("sinfo is not installed")
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not Path(conf).exists():
        _unavailable(f"no Slurm configuration {conf}")
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%T"], check=False, capture_output=True, text=True,
                              timeout=20)
    except subprocess.TimeoutExpired:
        _unavailable("sinfo did not answer within 20 s")
    if done.returncode != 0:
        _unavailable(f"sinfo failed: {(done.stderr or done.stdout).strip()}")
    rows = [line.split("|") for line in done.stdout.split()]
    if not rows:
        _unavailable("sinfo lists no nodes")
    default = sorted({partition.rstrip("*") for _, partition, _ in rows if partition.endswith("*")})
    if not default:
        _unavailable(f"no default partition in sinfo's answer: {done.stdout.strip()}")
    return SlurmCluster(
        nodes=sorted({node for node, _, _ in rows}),
        partition=default[0],
        states={node: state for node, _, state in rows},
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The running dev cluster (skips the test without one; fails it under CI=true)."""
    return query_cluster()
