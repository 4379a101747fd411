"""The Tracker: one MLflow run that survives the tracking server going away.

Every call is first appended to the run directory's journal (`journal`) and then sent by a
background thread, in order (`sender`). A dead server costs one warning; what it missed stays in
the journal and is sent when it comes back, or later with ``python -m gunn.train.tracking sync
RUN_DIR`` (`sync`).
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from gunn.config import flatten
from gunn.train.tracking.journal import (
    FINAL_STATUSES,
    JOURNAL_NAME,
    MAX_PARAM_VAL_LENGTH,
    MODEL_NAME,
    Journal,
    check_key,
    clean_tags,
    sync_command,
)
from gunn.train.tracking.sender import MLFLOW_USER, ParentNotSent, brief, is_rejection, Sender
from gunn.train.tracking.store import resolve_tracking_uri
from gunn.train.tracking.system_metrics import system_metrics_settings, SystemMetrics

__all__ = ["Tracker"]

_log = logging.getLogger(__package__)

# MLflow's own tag names (mlflow.utils.mlflow_tags), copied so that importing this module stays cheap.
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
_MAX_REJECTION_WARNINGS = 5


def _source_tags() -> dict[str, str]:
    """The run's source and user as MLflow's fluent API sets them (mlflow.tracking.context.default_context)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no name for this uid (some containers)
        user = str(os.getuid())
    main = sys.argv[0] if sys.argv and sys.argv[0] else "<console>"
    if main not in ("-c", "<console>") and os.path.exists(main):
        main = str(Path(main).resolve())
    return {MLFLOW_SOURCE_NAME: main, MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_USER: user}


class Tracker:
    """One MLflow run, logged from rank 0 without ever blocking training, journaled in `run_dir`."""

    def __init__(
        self,
        *,
        run_dir: Path,
        tracking_uri: str | None,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        start_timeout: float = 30.0,
        drain_timeout: float = 5.0,
        retry_interval: float = 30.0,
        system_metrics: bool = False,
    ) -> None:
        """``tags`` may override the source tags (mlflow.source.name: the script, mlflow.source.type:
        LOCAL, mlflow.user); ``system_metrics``: log this machine's (see `SystemMetrics`) while the
        run lasts, from when the server has the run."""
        if not experiment:
            raise ValueError(f"experiment must be a non-empty name, got {experiment!r}")
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.journal_path = self.run_dir / JOURNAL_NAME
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self._drain_timeout = drain_timeout
        self._retry_interval = retry_interval

        self._journal = Journal(self.journal_path)
        previous_uris = set(self._journal.runs) - {self.tracking_uri}
        if previous_uris and self.tracking_uri not in self._journal.runs:
            _log.warning(
                "%s continues an MLflow run at %s, but the tracking URI is now %s: starting a new run there",
                self.run_dir,
                ", ".join(sorted(previous_uris)),
                self.tracking_uri,
            )
        self._seq = self._journal.next_seq
        pending = self._journal.pending()
        # Calls an earlier attempt left unsent go out first; those meant for another store must
        # not hold up this one, so only `sync` sends them.
        self._queue: deque[dict[str, Any]] = deque(r for r in pending if r["_uri"] == self.tracking_uri)
        if len(self._queue) < len(pending):
            _log.warning(
                "%d unsent tracking call(s) in %s are for another store; send them with: %s",
                len(pending) - len(self._queue),
                self.journal_path,
                sync_command(self.run_dir),
            )
        self._cond = threading.Condition()
        self._closed = False
        self._retry_now = False
        self._down = False
        self._failures = 0
        self._rejections = 0
        self._sender = Sender(self._journal)
        self._system_metrics = system_metrics
        self._monitor: SystemMetrics | None = None

        flat = {check_key("param", k): str(v) for k, v in flatten(params).items()}
        truncated = sorted(k for k, v in flat.items() if len(v) > MAX_PARAM_VAL_LENGTH)
        flat = {k: v[:MAX_PARAM_VAL_LENGTH] for k, v in flat.items()}
        run_tags = {**_source_tags(), "gunn.run_dir": str(self.run_dir), **tags}
        if truncated:
            _log.info("Params longer than %d characters were truncated: %s", MAX_PARAM_VAL_LENGTH, truncated)
            run_tags["gunn.truncated_params"] = ", ".join(truncated)
        start_seq = self._enqueue(
            "start",
            tracking_uri=self.tracking_uri,
            experiment=experiment,
            run_name=run_name,
            tags=clean_tags(run_tags),
        )
        if flat:
            self._enqueue("params", params=flat)

        self._thread = threading.Thread(target=self._send_loop, name="gunn-mlflow-sender", daemon=True)
        self._thread.start()
        if self.run_id is None:
            # Wait (bounded) for the first attempt, so that run_id is known whenever the server is up.
            with self._cond:
                self._cond.wait_for(lambda: self._down or start_seq in self._journal.sent, timeout=start_timeout)
        _log.info("MLflow run %s at %s (journal: %s)", self.run_id, self.tracking_uri, self.journal_path)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while the run could not be created (server unreachable since start)."""
        return self._journal.runs.get(self.tracking_uri)

    @property
    def unsent(self) -> int:
        """How many calls MLflow has not received yet (after `finish`: those left for ``sync``)."""
        with self._cond:
            return len(self._queue)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log metric values at `step`; returns at once.

        Each metric is logged once per step: one that the journal already holds at `step` (an
        earlier attempt logged that epoch, then died before its checkpoint, and the epoch was
        trained again) keeps its first value and is left out."""
        logged = self._journal.metrics_logged(self.tracking_uri, int(step))
        values = {check_key("metric", k): float(v) for k, v in metrics.items()}
        values = {k: v for k, v in values.items() if k not in logged}
        if values:
            self._enqueue("metrics", metrics=values, step=int(step))

    def log_artifact(self, path: Path, artifact_path: str | None = None, *, once: bool = False) -> None:
        """Upload a file or directory (read when sent, so leave it in place); returns at once.
        ``once``: not if this run directory's journal already holds the call."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact path {path} does not exist")
        if once and (str(path), artifact_path) in self._journal.artifacts():
            return
        self._enqueue("artifact", path=str(path), artifact_path=artifact_path)

    def log_model(self, path: Path, name: str = MODEL_NAME, *, step: int = 0, once: bool = False) -> None:
        """Log the MLflow model directory `path` (``mlflow.pytorch.save_model``'s; read when sent, so
        leave it in place) as the run's LoggedModel `name`, output of the run at `step`; returns at
        once. ``once``: not if this run directory's journal already holds the call for this path,
        name and step."""
        path = Path(path).resolve()
        if not (path / "MLmodel").is_file():
            raise FileNotFoundError(f"{path} is not an MLflow model directory (no MLmodel file)")
        if once and (str(path), name, int(step)) in self._journal.models():
            return
        self._enqueue("model", path=str(path), name=check_key("model", name), step=int(step))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags; returns at once."""
        self._enqueue("tags", tags=clean_tags(tags))

    def flush(self, timeout: float) -> bool:
        """Try to send the calls not sent yet, waiting `timeout` seconds at most; True once all are sent."""
        with self._cond:
            if self._closed:
                return not self._queue
            failures = self._failures
            self._retry_now = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._queue or self._failures > failures, timeout=timeout)
            return not self._queue

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`, waiting a few seconds at most for unsent calls to go out."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {FINAL_STATUSES}, got {status!r}")
        if self._closed:
            return
        with self._cond:
            monitor, self._monitor, self._system_metrics = self._monitor, None, False
        if monitor is not None:  # its last sample, sent directly (bounded: a dead server must not hold the run)
            monitor.stop(timeout=min(self._drain_timeout, 5.0))
        self._enqueue("finish", status=status)
        with self._cond:
            failures = self._failures
            self._retry_now = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._queue or self._failures > failures, timeout=self._drain_timeout)
            self._closed = True
            unsent = len(self._queue)
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
        if unsent:
            _log.warning(
                "%d MLflow tracking call(s) of run %s were not sent to %s; they are kept in %s. Send them with: %s",
                unsent,
                self.run_id or "(not created yet)",
                self.tracking_uri,
                self.journal_path,
                sync_command(self.run_dir),
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _enqueue(self, op: str, **fields: Any) -> int:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"cannot {op}: Tracker.finish was already called for {self.run_dir}")
            record = {"seq": self._seq, "op": op, "time": int(time.time() * 1000), **fields}
            self._seq += 1
            self._journal.append(record)
            self._queue.append({**record, "_uri": self.tracking_uri})
            self._cond.notify_all()
            return record["seq"]

    def _send_loop(self) -> None:
        first_delay = delay = min(1.0, self._retry_interval)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                record = self._queue[0]
            try:
                self._sender.send(record)
                if record["op"] == "start":
                    self._start_system_metrics()
            except Exception as e:  # noqa: BLE001 - whatever goes wrong, the sender thread must live on
                if is_rejection(e):
                    self._sender.reject(record, e)
                    self._warn_rejected(record, e)
                else:
                    self._on_outage(e)
                    with self._cond:
                        self._failures += 1
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: self._retry_now or self._closed, timeout=delay)
                        self._retry_now = False
                    delay = min(delay * 2, self._retry_interval)
                    continue
            with self._cond:
                self._queue.popleft()
                if self._down:
                    self._down = False
                    _log.info(
                        "MLflow at %s is reachable again; sending %d queued call(s)",
                        self.tracking_uri,
                        len(self._queue),
                    )
                self._cond.notify_all()
            delay = first_delay

    def _start_system_metrics(self) -> None:
        """Starts logging system metrics once the server has the run (this attempt's start sent)."""
        with self._cond:
            if not self._system_metrics or self._monitor is not None or self._closed or self.run_id is None:
                return
            interval, samples = system_metrics_settings()
            try:
                self._monitor = SystemMetrics(self.tracking_uri, self.run_id, interval, samples)
            except Exception as e:  # noqa: BLE001 - not worth failing the start record for
                self._system_metrics = False
                _log.warning("MLflow system metrics are not logged: %s", brief(e))

    def _on_outage(self, error: Exception) -> None:
        with self._cond:
            was_down, self._down = self._down, True
            self._cond.notify_all()
        if was_down:
            _log.debug("MLflow at %s still unreachable: %s", self.tracking_uri, brief(error))
            return
        _log.warning(
            "MLflow tracking at %s %s (%s). Training goes on; tracking calls are kept in %s "
            "and sent when the server is back, or later with: %s",
            self.tracking_uri,
            "waits for this run's parent run" if isinstance(error, ParentNotSent) else "is unreachable",
            brief(error),
            self.journal_path,
            sync_command(self.run_dir),
        )

    def _warn_rejected(self, record: dict[str, Any], error: Exception) -> None:
        self._rejections += 1
        level = logging.WARNING if self._rejections <= _MAX_REJECTION_WARNINGS else logging.DEBUG
        _log.log(level, "MLflow refused the %s call #%d: %s", record["op"], record["seq"], error)

