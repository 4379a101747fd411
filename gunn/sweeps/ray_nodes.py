"""This sweep's own Ray: a head node in a process group, folder and ports of its own, stopped by a
watchdog also when the driver is killed; Ray worker nodes in a Slurm allocation; token authentication."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # Ray's command line, from this environment

# How long a Ray node's processes get to end after SIGTERM before SIGKILL. Ray keeps no state the sweep
# needs (Tune's is in the sweep directory), and `ray start --block` does not end on SIGTERM by itself
# (its GCS server lingers): a longer grace only delays every sweep's end.
GRACE_S = 1.5

# Runs beside a sweep's Ray head, in a session of its own; when the driver's end of its stdin
# closes (the driver ended, even by SIGKILL), it stops the head's process group and removes the
# head's temporary folder, unless the driver wrote "keep".
WATCHDOG = f"""
import os, shutil, signal, sys, time
group, temp = int(sys.argv[1]), sys.argv[2]
keep = sys.stdin.read().strip() == "keep"
for sig, wait in ((signal.SIGTERM, {GRACE_S}), (signal.SIGKILL, 0)):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        break
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
if not keep:
    shutil.rmtree(temp, ignore_errors=True)
"""


def auth_token(sweep_dir: Path, create: bool) -> Path:
    """Token authentication with a secret of this sweep (beside it, on the shared file system): an
    open Ray head would run anyone's code as you. Sets it for this process and the Ray it starts."""
    token = sweep_dir / "ray-auth-token"
    if create and not token.exists():
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
    deadline = time.monotonic() + 120
    while not (token.exists() and token.stat().st_size):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{token} did not appear: is the sweep directory on a shared file system?")
        time.sleep(1)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    return token


@contextlib.contextmanager
def ray_head(temp: Path, *, ip: str, port: int, cpus: float, verbose: bool) -> Iterator[tuple[str, list[str]]]:
    """Starts a Ray head node that belongs to this sweep alone: its own process group, temporary folder
    ``temp`` and ports (``port`` 0: any free one). Yields its address; stops the whole group on the way
    out and, through a watchdog, also if this process is killed, and removes ``temp`` unless the sweep
    wrote ``keep`` (its logs, when trials failed) to the list it gets."""
    temp.mkdir(parents=True, exist_ok=True)
    (temp / "ray_current_cluster").unlink(missing_ok=True)
    command = [*RAY, "start", "--head", "--block", "--node-ip-address", ip, "--port", str(port),
               "--num-cpus", str(int(cpus)), "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp)]
    output = None if verbose else subprocess.DEVNULL
    head = subprocess.Popen(command, start_new_session=True, stdout=output, stderr=output)
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(head.pid), str(temp)], stdin=subprocess.PIPE,
                                start_new_session=True, text=True)
    keep: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while not (temp / "ray_current_cluster").is_file() or not (temp / "ray_current_cluster").read_text().strip():
            if head.poll() is not None:
                raise RuntimeError(f"Ray's head node did not start (exit status {head.returncode}): "
                                   f"{shlex.join(command)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray's head node did not start within 180 s: {shlex.join(command)}")
            time.sleep(0.5)
        port = (temp / "ray_current_cluster").read_text().strip().rsplit(":", 1)[1]  # the one Ray chose
        yield f"{ip}:{port}", keep
    finally:
        watchdog.stdin.write("keep" if keep else "")
        watchdog.stdin.close()  # the watchdog stops the head's group now
        watchdog.wait()
        head.wait()


def ray_worker(command: list[str], done: Path) -> None:
    """Runs a Ray worker node until the head marks the sweep done (or the node dies)."""
    node = subprocess.Popen(command, start_new_session=True)
    while node.poll() is None and not done.exists():
        time.sleep(1)
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(node.pid, sig)  # the node's raylet and workers are in its process group
        except ProcessLookupError:
            break
        try:
            node.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def wait_for_nodes(address: str, nodes: int, timeout: float = 300) -> None:
    import ray

    ray.init(address=address, logging_level=logging.WARNING)
    deadline = time.monotonic() + timeout
    while sum(n["Alive"] for n in ray.nodes()) < nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(n['Alive'] for n in ray.nodes())} of {nodes} Ray nodes joined")
        time.sleep(1)
    ray.shutdown()
