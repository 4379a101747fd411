"""The run directory: where a run lives, its lock, the record of its starts and of its settings' changes.

One process trains a run directory at a time (``locked``); each start is appended to ``starts.log``,
and the temporary files of writes that a killed process left are removed.

Rank 0 of a run holds ``<run dir>/.lock`` while it trains. The file names the holder (host,
pid, Slurm job) and its modification time is refreshed every ``HEARTBEAT_S`` seconds. A
second launch on the same directory is refused with the holder's name. A lock does not
survive its holder: it is taken over, with a notice, when the holder is

* this Slurm job's previous incarnation (a requeued job continues its own run),
* a process on this host that no longer exists (pid gone, or reused by another process),
* on another host and silent for ``STALE_S`` seconds (killed with its node),
* written in another directory (this one is a copy of it).

A run continued with changed settings records each change (``record_config_changes``):
``config.yaml`` always holds the settings the run trains with now, ``config-changes.yaml`` each
change with the epoch and batch it took effect at.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from gunn.config import ConfigError
from gunn.train.writes import atomic_write

if TYPE_CHECKING:
    from gunn.config import RunConfig
    from gunn.train.distributed import DistInfo

LOCK_NAME = ".lock"
CONFIG_NAME = "config.yaml"
CHANGES_NAME = "config-changes.yaml"
HEARTBEAT_S = 10.0
STALE_S = 90.0


class RunDirError(ConfigError):
    """The run directory cannot be used: it cannot be written, or another process trains it."""


def check_writable(directory: Path) -> None:
    """RunDirError naming why ``directory`` (or, if it does not exist yet, the folder it would be made
    in) cannot be written; a real file is written and removed, which also catches read-only mounts."""
    existing = directory.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"checkpoint.dir {directory} cannot be made: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        where = "" if existing == directory.absolute() else f" (in {existing})"
        raise RunDirError(f"checkpoint.dir {directory} cannot be written{where}: {err.strerror or err}") from None


def slurm_job() -> str | None:
    """This process's Slurm job as ``squeue`` names it: ``8_1`` for task 1 of array job 8, else ``8``."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), to tell a reused pid; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _me(directory: Path | None = None) -> dict[str, Any]:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_ticks(os.getpid()),
          "slurm_job": slurm_job(), "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    if directory is not None:
        me["dir"] = str(Path(directory).resolve())
    return me


def describe(holder: dict[str, Any]) -> str:
    """``pid 123 on host node1 (Slurm job 8_1), since 2026-12-02 15:00:00``."""
    job = f" (Slurm job {holder['slurm_job']})" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, since {holder.get('since')}"


def stale_reason(holder: dict[str, Any], age_s: float, directory: Path | None = None) -> str | None:
    """Why the lock of ``holder`` (last refreshed ``age_s`` ago) on ``directory`` no longer holds; None while
    it does."""
    me = _me()
    if directory is not None and holder.get("dir") not in (None, str(Path(directory).resolve())):
        return f"it was copied here with the directory: it locks {holder['dir']}"
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"]:
        return f"it is this Slurm job's previous run (restart {holder.get('restart', '?')})"
    if holder.get("host") == me["host"]:
        pid = holder.get("pid")
        if pid == me["pid"] and holder.get("pid_start") == me["pid_start"]:
            return "this process left it (an earlier run in this process)"
        started = _start_ticks(pid) if isinstance(pid, int) else None
        if started is None:
            return f"process {pid} no longer exists"
        if holder.get("pid_start") and started != holder["pid_start"]:
            return f"process {pid} has ended (the pid now belongs to another process)"
        return None
    if age_s > STALE_S:
        return f"it was last refreshed {age_s:.0f} s ago (more than {STALE_S:.0f} s)"
    return None


def check_usable(directory: Path) -> None:
    """Before a launch: ``directory`` can be written and no live process trains it (RunDirError if not)."""
    check_writable(directory)
    lock = RunDirLock(directory)
    holder, age = lock.read()
    if holder is not None and stale_reason(holder, age, directory) is None:
        raise RunDirError(_in_use(lock.path, holder))


def _in_use(path: Path, holder: dict[str, Any]) -> str:
    return (f"checkpoint.dir {path.parent} is in use by {describe(holder)}: wait for it to end, stop it, or "
            f"choose another checkpoint.dir (lock file: {path})")


class RunDirLock:
    """The lock of one run directory, held from ``acquire`` to ``release`` (rank 0 only)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self.me = _me(directory)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock (over a stale one, with a warning); RunDirError if a live process holds it."""
        check_writable(self.path.parent)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"checkpoint.dir {self.path.parent} cannot be made: {err.strerror or err}") from None
        text = json.dumps(self.me)
        for _ in range(5):  # another process may create or take over the lock between the steps below
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, age = self.read()
                if holder is None:  # vanished meanwhile, or being written: look again
                    time.sleep(0.05)
                    if self.path.exists() and self.read()[0] is None:  # unreadable: a crash mid-write
                        self._replace(text)
                        return self._start()
                    continue
                reason = stale_reason(holder, age, self.path.parent)
                if reason is None:
                    raise RunDirError(_in_use(self.path, holder))
                warnings.warn(f"taking over the lock of {self.path.parent} from {describe(holder)}: {reason}",
                              stacklevel=2)
                self._replace(text)
                return self._start()
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return self._start()
        raise RunDirError(f"checkpoint.dir {self.path.parent}: could not take its lock {self.path}")

    def release(self) -> None:
        """Stops the heartbeat and removes the lock, if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder, _ = self.read()
        if holder is not None and self._is_mine(holder):
            self.path.unlink(missing_ok=True)

    def _is_mine(self, holder: dict[str, Any]) -> bool:
        return all(holder.get(k) == self.me[k] for k in ("host", "pid", "pid_start", "since"))

    def read(self) -> tuple[dict[str, Any] | None, float]:
        """The holder named in the lock file and the seconds since it was refreshed; (None, 0) if none can be read."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(text)
        except (OSError, ValueError):
            return None, 0.0
        return (holder if isinstance(holder, dict) else None), age

    def _replace(self, text: str) -> None:
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="gunn-run-dir-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder, _ = self.read()
            if holder is None or not self._is_mine(holder):
                warnings.warn(f"the lock {self.path} was taken over by {describe(holder or {})}", stacklevel=1)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or flaky file system: the next beat tries again


def config_changes(now: dict[str, Any], before: dict[str, Any], ignore: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    """The flat settings of ``now`` that differ from ``before``'s (as ``(before, now)``), but for those
    starting with one of ``ignore``."""
    return {k: (before.get(k), v) for k, v in now.items() if v != before.get(k) and not k.startswith(ignore)}


def record_config_changes(directory: Path, changes: dict[str, tuple[Any, Any]], epoch: int, batch: int,
                          config_text: str) -> None:
    """Records that the run in ``directory`` continues with ``changes`` from ``epoch`` (1-based) and
    ``batch`` on: one entry more in ``config-changes.yaml``, and ``config.yaml`` replaced by
    ``config_text``, each written whole or not at all."""
    import yaml

    entry = {"epoch": epoch, "batch": batch, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
             "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}}
    history = [*recorded_changes(directory), entry]
    text = yaml.safe_dump(history, sort_keys=False).encode()
    atomic_write(directory / CHANGES_NAME, lambda f: f.write(text), what="configuration history")
    atomic_write(directory / CONFIG_NAME, lambda f: f.write(config_text.encode()), what="configuration")


def recorded_changes(directory: Path) -> list[dict[str, Any]]:
    """The entries of ``directory``'s ``config-changes.yaml``, oldest first ([] without one)."""
    import yaml

    try:
        entries = yaml.safe_load((directory / CHANGES_NAME).read_text())
    except FileNotFoundError:
        return []
    return entries if isinstance(entries, list) else []


def change_tags(directory: Path) -> dict[str, str]:
    """One MLflow tag per changed setting, ``changed/optim.lr``: ``0.1 -> 0.05 from epoch 3``, each
    change of that setting in order."""
    tags: dict[str, list[str]] = {}
    for entry in recorded_changes(directory):
        where = f"from epoch {entry['epoch']}" + (f", batch {entry['batch']}" if entry.get("batch") else "")
        for key, change in entry["changes"].items():
            tags.setdefault(f"changed/{key}", []).append(f"{change['from']} -> {change['to']} {where}")
    return {k: "; ".join(v) for k, v in tags.items()}


# -- a run's start: its directory and lock, and the record of each start ------------------


def default_run_dir(config: RunConfig) -> Path:
    """runs/<name>-<date>-<time>: a new directory for each run that does not name one."""
    return Path("runs") / f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def agreed_run_dir(config: RunConfig) -> Path:
    """The run directory (``checkpoint.dir``, or a new one), rank 0's on every rank."""
    from gunn.train import distributed

    run_dir = Path(config.checkpoint.dir) if config.checkpoint.dir else default_run_dir(config)
    return Path(distributed.broadcast_object(str(run_dir.resolve()))).resolve()


@contextlib.contextmanager
def locked(run_dir: Path, info: DistInfo) -> Iterator[None]:
    """Holds the run directory's lock (rank 0, for every rank) while the run trains; RunDirError
    on every rank if another process holds it or the directory cannot be written."""
    from gunn.train import distributed

    lock, error = None, None
    if info.is_main:
        try:
            lock = RunDirLock(run_dir)
            lock.acquire()
            _remove_partial_writes(run_dir)
            _record_start(run_dir, lock.me)
        except RunDirError as err:
            lock, error = None, str(err)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise RunDirError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _remove_partial_writes(run_dir: Path) -> None:
    """Deletes the temporary files of writes that a killed process left (``.NAME.tmp-PID``): with the
    lock held, no other process writes here."""
    for tmp in [*run_dir.glob(".*.tmp-*"), *run_dir.glob("snapshots/.*.tmp-*")]:
        print(f"removing {tmp}, left by a write that did not finish")
        if tmp.is_dir() and not tmp.is_symlink():  # an MLflow model being saved
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _record_start(run_dir: Path, me: dict[str, Any]) -> None:
    """Appends this start (the lock holder ``me``) to the run directory's ``starts.log``: when, where,
    and in which Slurm job."""
    where = f"host {me['host']} pid {me['pid']}" + (
        f" Slurm job {me['slurm_job']} restart {me['restart']}" if me["slurm_job"] else "")
    with open(run_dir / "starts.log", "a") as f:
        f.write(f"{datetime.now().isoformat(timespec='seconds')} {where}\n")


def slurm_jobs(run_dir: Path) -> list[str]:
    """Every Slurm job this run has lived in, oldest first (from ``starts.log``)."""
    try:
        lines = (run_dir / "starts.log").read_text().splitlines()
    except OSError:
        return []
    jobs = [line.split(" Slurm job ", 1)[1].split()[0] for line in lines if " Slurm job " in line]
    return list(dict.fromkeys(jobs))
