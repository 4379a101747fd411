"""Which MLflow store a run logs to: tracking URIs made absolute, and the lock of a local SQLite store."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["check_tracking_uri", "default_tracking_uri", "resolve_tracking_uri", "store_lock"]

# MLflow announces at INFO each new SQLite store's tables ("Creating initial MLflow database tables...",
# "Updating database tables"): what the store holds is for MLflow to know, not for the run's output.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

# The schemes of MLflow's own tracking stores (mlflow.tracking._tracking_service.utils), copied so that
# importing this module stays cheap; plugins add theirs through the mlflow.tracking_store entry points.
_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def default_tracking_uri(cwd: Path | None = None) -> str:
    """Return, as an absolute URI, the store that `mlflow ui` started in `cwd` without arguments opens."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    # Same rule as mlflow.tracking._tracking_service.utils._get_default_tracking_uri (MLflow
    # >= 3.7): sqlite:///mlflow.db, unless ./mlruns already holds a file store with experiments.
    mlruns = cwd / "mlruns"
    try:
        has_file_store = any(
            entry.is_dir() and entry.name.isdigit() and (entry / "meta.yaml").exists() for entry in mlruns.iterdir()
        )
    except OSError:
        has_file_store = False
    if has_file_store:
        return mlruns.resolve().as_uri()
    return "sqlite:///" + str((cwd / "mlflow.db").resolve())


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """Return `tracking_uri`, else $MLFLOW_TRACKING_URI, else the default local store; local paths made absolute."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    # Made absolute so that a later `sync` from another directory reaches the same store.
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///") :]
        if path and not path.startswith(":memory:"):
            return "sqlite:///" + str(Path(path).resolve())
    elif urlparse(uri).scheme == "" and uri != "databricks":
        return Path(uri).resolve().as_uri()
    return uri

def check_tracking_uri(uri: str) -> str | None:
    """Why runs cannot log to the store at `uri` (resolved), said before any work; None when they may try.

    Catches a scheme no store serves (``htp://x``) and a local SQLite store that cannot be written
    (a read-only working directory with the default ``./mlflow.db``); a server that is down is no
    reason: the journal waits for it."""
    from importlib.metadata import entry_points

    scheme = urlparse(uri).scheme
    plugins = {e.name for e in entry_points(group="mlflow.tracking_store")}
    if scheme and scheme not in _SCHEMES and scheme.split("+")[0] not in _SCHEMES and scheme not in plugins:
        return (f"its scheme {scheme!r} is none that MLflow stores use ({', '.join(_SCHEMES)}"
                + (f", or the plugins' {', '.join(sorted(plugins))}" if plugins else "") + ")")
    path = _sqlite_path(uri)
    if path is None:
        return None
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:  # a real write: permissions, read-only mounts, quotas (SQLite also writes a journal beside the store)
        fd = os.open(folder / f".gunn-write-check-{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        return f"{folder} cannot be written: {err.strerror or err}"
    os.close(fd)
    os.unlink(folder / f".gunn-write-check-{os.getpid()}")
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} cannot be written: permission denied"
    return None


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store URI, or None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if not path or path.startswith(":memory:") else Path(path)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on a local SQLite store (the file `mlflow.db.lock` beside `mlflow.db`).

    MLflow creates and migrates a new SQLite store's tables on first use; runs that start at once
    on a fresh store (array jobs, sweeps) collide there without it. Other stores need no lock.
    """
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

