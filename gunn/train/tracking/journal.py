"""The journal of a run's MLflow calls: ``RUN_DIR/mlflow-journal.jsonl``, append-only.

Lines (JSON): work records ``{"seq": 3, "op": "metrics", "time": ..., ...}`` with ``op`` one of
start, params, metrics, artifact, model, tags, finish; ``{"sent": 3}`` once record 3 is on the
server (``"rejected": reason`` added if the server refused it for good); and
``{"run_id": ..., "tracking_uri": ...}`` once the MLflow run exists.

A tag value ``journal:DIR`` (``journal_reference``) names the run journaled in DIR: the sender
puts that run's id in its place when it sends the tag (a sweep's parent run, see `parent_run_id`).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import threading
from pathlib import Path
from typing import Any

from gunn.train.writes import WriteError, write_error

__all__ = [
    "FINAL_STATUSES",
    "JOURNAL_NAME",
    "MODEL_DIR_NAME",
    "MODEL_NAME",
    "copied_from",
    "set_aside",
    "journal_reference",
    "journaled_run_id",
    "sync_command",
]

_log = logging.getLogger(__package__)

JOURNAL_NAME = "mlflow-journal.jsonl"
MODEL_DIR_NAME = "mlflow-model"  # the MLflow model a finished run saves in its run directory
MODEL_NAME = "model"  # its LoggedModel's name: runs:/<run id>/model
FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
REFERENCE_PREFIX = "journal:"

# MLflow's limits (mlflow.utils.validation), copied so that importing this module stays cheap.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250


def check_key(kind: str, key: str) -> str:
    """`key` as a string, if MLflow accepts its length as a param, metric, tag or model name."""
    key = str(key)
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{kind} name {key!r} must have 1 to {MAX_KEY_LENGTH} characters")
    return key


def clean_tags(tags: dict[str, str]) -> dict[str, str]:
    """Tags as they are journaled: names checked, values strings cut to MLflow's limit."""
    return {check_key("tag", k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}


def sync_command(run_dir: Path) -> str:
    """The command that sends what the journal in `run_dir` holds and MLflow has not received."""
    return f"python -m gunn.train.tracking sync {shlex.quote(str(run_dir))}"


def journal_reference(run_dir: Path) -> str:
    """A tag value that stands for the MLflow run journaled in `run_dir`, whose id it may not have yet."""
    return REFERENCE_PREFIX + str(Path(run_dir).resolve())


def journaled_run_id(run_dir: Path, tracking_uri: str) -> str | None:
    """The id of the MLflow run that the journal in `run_dir` has created at `tracking_uri`, or None.

    Read quietly: another process may be appending to that journal right now."""
    runs: dict[str, str] = {}
    try:
        with open(Path(run_dir) / JOURNAL_NAME, encoding="utf-8") as f:
            for line in f:
                if '"run_id"' not in line:
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "seq" not in entry and "run_id" in entry:
                    runs[entry["tracking_uri"]] = entry["run_id"]
    except FileNotFoundError:
        return None
    return runs.get(tracking_uri)


def copied_from(run_dir: Path) -> tuple[Path, str] | None:
    """(the run directory, its MLflow run id) when the journal in `run_dir` was written in another run
    directory that still journals the same MLflow run: `run_dir` is a copy of it. None when the journal
    is this directory's own, or was moved here (its first directory is gone or holds another run)."""
    path = Path(run_dir) / JOURNAL_NAME
    if not path.is_file():
        return None
    journal = Journal(path)
    origin = None
    for record in sorted(journal.work, key=lambda r: r["seq"]):
        if record["op"] == "start":
            origin = record.get("tags", {}).get("gunn.run_dir", origin)
    if origin is None or Path(origin) == Path(run_dir).resolve() or not (Path(origin) / JOURNAL_NAME).is_file():
        return None
    theirs = Journal(Path(origin) / JOURNAL_NAME).runs
    shared = [run for uri, run in journal.runs.items() if theirs.get(uri) == run]
    return (Path(origin), shared[0]) if shared else None


def set_aside(run_dir: Path, run_id: str) -> Path:
    """Renames the journal in `run_dir`, copied with the run directory of MLflow run `run_id`, so that
    the next tracker starts a run of its own; returns the new name (kept: what was logged before)."""
    path = Path(run_dir) / JOURNAL_NAME
    aside = path.with_name(f"mlflow-journal.copied-from-{run_id}.jsonl")
    os.replace(path, aside)
    return aside


class Journal:
    """The append-only file of tracking calls and of what has been sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.work: list[dict[str, Any]] = []
        self.sent: set[int] = set()
        self.runs: dict[str, str] = {}  # tracking URI -> run id
        self._lock = threading.Lock()
        if path.exists():
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    # A process killed mid-write leaves a partial last line; nothing was sent for it.
                    _log.warning("Skipping unreadable line %d of %s", lineno, self.path)
                    continue
                self._remember(entry)

    @property
    def next_seq(self) -> int:
        return max((r["seq"] for r in self.work), default=-1) + 1

    def pending(self) -> list[dict[str, Any]]:
        """Return the unsent work records in order, each with `_uri`, the store its start chose."""
        pending, uri = [], None
        for record in sorted(self.work, key=lambda r: r["seq"]):
            if record["op"] == "start":
                uri = record["tracking_uri"]
            if record["seq"] not in self.sent:
                pending.append({**record, "_uri": uri})
        return pending

    def metrics_logged(self, uri: str, step: int) -> set[str]:
        """Names of the metrics recorded at `step` for the run at `uri`, by this attempt or an earlier one."""
        names: set[str] = set()
        current = None
        for record in sorted(self.work, key=lambda r: r["seq"]):
            if record["op"] == "start":
                current = record["tracking_uri"]
            elif record["op"] == "metrics" and current == uri and record["step"] == step:
                names.update(record["metrics"])
        return names

    def artifacts(self) -> set[tuple[str, str | None]]:
        """(path, artifact_path) of every artifact call recorded."""
        return {(r["path"], r.get("artifact_path")) for r in self.work if r["op"] == "artifact"}

    def models(self) -> set[tuple[str, str, int]]:
        """(path, name, step) of every model call recorded."""
        return {(r["path"], r["name"], r["step"]) for r in self.work if r["op"] == "model"}

    def ending(self) -> str | None:
        """The status of the last finish call, if no start came after it (the run has ended)."""
        last = None
        for record in sorted(self.work, key=lambda r: r["seq"]):
            if record["op"] in ("start", "finish"):
                last = record.get("status")
        return last

    def append(self, entry: dict[str, Any]) -> None:
        """Append one line, whole or not at all; a failed write raises `WriteError`."""
        line = (json.dumps({k: v for k, v in entry.items() if not k.startswith("_")}) + "\n").encode()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as err:
                raise self._write_error(err) from err
            try:
                size = os.fstat(fd).st_size
                try:
                    rest = memoryview(line)
                    while rest:
                        rest = rest[os.write(fd, rest) :]
                except BaseException as err:
                    # A partial line would be skipped when read, but it holds the space that is missing.
                    try:
                        os.ftruncate(fd, size)
                    except OSError:
                        pass
                    if isinstance(err, OSError):
                        raise self._write_error(err) from err
                    raise
            finally:
                os.close(fd)
        self._remember(entry)

    def _write_error(self, err: OSError) -> WriteError:
        failure = write_error(err, f"the MLflow journal {self.path}")  # said as checkpoint writes say it
        assert failure is not None  # an OSError is a write failure
        return failure

    def _remember(self, entry: dict[str, Any]) -> None:
        if "seq" in entry:
            self.work.append(entry)
        elif "sent" in entry:
            self.sent.add(entry["sent"])
        elif "run_id" in entry:
            self.runs[entry["tracking_uri"]] = entry["run_id"]

