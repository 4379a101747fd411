"""MLflow tracking of a training run that survives the tracking server going away.

Every call is first appended to ``RUN_DIR/mlflow-journal.jsonl`` and then sent by a
background thread, in order. A dead server costs one warning; what it missed stays in
the journal and is sent when it comes back, or later with
``python -m gunn.train.tracking sync RUN_DIR``.

Journal lines (JSON): work records ``{"seq": 3, "op": "metrics", ...}`` with ``op`` one
of start, params, metrics, artifact, model, tags, finish; ``{"sent": 3}`` once record 3 is
on the server (``"rejected": reason`` added if the server refused it for good); and
``{"run_id": ..., "tracking_uri": ...}`` once the MLflow run exists.

A model record names an MLflow model directory that the training process saved
(``mlflow.pytorch.save_model``: weights, signature, input example); sending it makes it the
run's LoggedModel (MLflow 3), as ``mlflow.pytorch.log_model`` would, so that
``runs:/<run id>/<name>`` and ``models:/<model id>`` load and serve it.

System metrics (``system/...``, MLflow's CPU, memory, disk, network and GPU monitors) are
not journaled: they describe the moment they are taken, so samples taken while the server
is down are dropped, quietly.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import getpass
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gunn.config import flatten

__all__ = [
    "JOURNAL_NAME",
    "MODEL_DIR_NAME",
    "MODEL_NAME",
    "JournalWriteError",
    "Tracker",
    "complete",
    "default_tracking_uri",
    "plot_curves",
    "resolve_tracking_uri",
    "sync",
    "sync_command",
]

_log = logging.getLogger(__name__)

JOURNAL_NAME = "mlflow-journal.jsonl"
MODEL_DIR_NAME = "mlflow-model"  # the MLflow model a finished run saves in its run directory
MODEL_NAME = "model"  # its LoggedModel's name: runs:/<run id>/model
FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow's own tag names (mlflow.utils.mlflow_tags), copied so that importing this module stays cheap.
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_USER = "mlflow.user"
# MLflow's default for system metrics (mlflow.system_metrics): one sample every 10 s;
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL and ..._SAMPLES_BEFORE_LOGGING override it as in MLflow.
SYSTEM_METRICS_INTERVAL_S = 10.0

# MLflow's limits (mlflow.utils.validation), copied so that importing this module stays cheap.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000

# MLflow's HTTP client defaults (7 retries, backoff factor 2, 120 s timeout) take minutes to
# give up on a dead server. These apply only on threads inside `_short_http_timeouts()`
# (the sender thread, the sync command), and only where the user has not set the variable.
_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",  # one retry covers a keep-alive socket closed by a restart
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}

# Error codes with which a reachable server refuses one record for good; anything else
# (connection errors, timeouts, 5xx, authentication) means "try again later".
_REJECTION_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"}
)
_MAX_REJECTION_WARNINGS = 5


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


def sync_command(run_dir: Path) -> str:
    """The command that sends what the journal in `run_dir` holds and MLflow has not received."""
    return f"python -m gunn.train.tracking sync {shlex.quote(str(run_dir))}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store URI, or None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if not path or path.startswith(":memory:") else Path(path)


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
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


# --------------------------------------------------------------------------- journal


class JournalWriteError(OSError):
    """The journal could not be written (disk full, quota, permissions); the message names it, errno kept."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" before it
        return str(self.strerror)


class _Journal:
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
        """Append one line, whole or not at all; a failed write raises `JournalWriteError`."""
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

    def _write_error(self, err: OSError) -> JournalWriteError:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):  # said as checkpoint writes say them
            return JournalWriteError(err.errno, f"{os.strerror(err.errno).lower()} while writing the MLflow journal "
                                                f"{self.path}")
        return JournalWriteError(err.errno, f"could not write the MLflow journal {self.path}: {err.strerror or err}")

    def _remember(self, entry: dict[str, Any]) -> None:
        if "seq" in entry:
            self.work.append(entry)
        elif "sent" in entry:
            self.sent.add(entry["sent"])
        elif "run_id" in entry:
            self.runs[entry["tracking_uri"]] = entry["run_id"]


# --------------------------------------------------------------------------- sending

_http_local = threading.local()
_http_patch_lock = threading.Lock()
_http_patched = False


def _patch_mlflow_http_settings() -> None:
    """Make MLflow's HTTP settings fall back to `_HTTP_SETTINGS` on threads inside `_short_http_timeouts()`."""
    global _http_patched
    with _http_patch_lock:
        if _http_patched:
            return
        from mlflow import environment_variables

        for name, value in _HTTP_SETTINGS.items():
            variable = getattr(environment_variables, name, None)
            if variable is None:
                continue

            def get_raw(original=variable.get_raw, value=value):
                raw = original()
                if raw is None and getattr(_http_local, "active", False):
                    return value
                return raw

            # An instance attribute: MLflow reads these settings per request through
            # `_EnvironmentVariable.get() -> self.get_raw()`, so other threads keep MLflow's defaults.
            variable.get_raw = get_raw

        # urllib3 logs a warning for every retried request; our own outage warning replaces them.
        logging.getLogger("urllib3.connectionpool").addFilter(lambda record: not getattr(_http_local, "active", False))
        _http_patched = True


@contextmanager
def _short_http_timeouts() -> Iterator[None]:
    _patch_mlflow_http_settings()
    _http_local.active = True
    try:
        yield
    finally:
        _http_local.active = False


class _Rejected(Exception):
    """The server (or the local file system) refused one record for good."""


def _is_rejection(error: Exception) -> bool:
    if isinstance(error, _Rejected):
        return True
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in _REJECTION_CODES


def _brief(error: BaseException) -> str:
    """Name the root cause of `error` in one line (MLflow wraps connection errors three deep)."""
    for _ in range(10):  # bounded: exception chains can loop
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Sender:
    """Sends journal records to MLflow, one at a time, and journals what was sent."""

    def __init__(self, journal: _Journal) -> None:
        self.journal = journal
        self._clients: dict[str, Any] = {}

    def _client(self, uri: str) -> Any:
        if uri not in self._clients:
            from mlflow.tracking import MlflowClient

            self._clients[uri] = MlflowClient(tracking_uri=uri)
        return self._clients[uri]

    def send(self, record: dict[str, Any]) -> None:
        """Send one record; raise on failure (see `_is_rejection` for which failures are final)."""
        with _short_http_timeouts():
            getattr(self, "_send_" + record["op"])(record, record["_uri"])
        self.journal.append({"sent": record["seq"]})

    def reject(self, record: dict[str, Any], error: Exception) -> None:
        """Journal that `record` will never be accepted, so that it blocks nothing."""
        self.journal.append({"sent": record["seq"], "rejected": str(error)[:1000]})

    def _run_id(self, uri: str) -> str:
        run_id = self.journal.runs.get(uri)
        if run_id is None:
            # Not a rejection: the start record before this one has not been sent yet.
            raise RuntimeError(f"no MLflow run at {uri} yet for this run directory")
        return run_id

    def _send_start(self, record: dict[str, Any], uri: str) -> None:
        from mlflow.exceptions import MlflowException

        run_id = self.journal.runs.get(uri)
        if run_id is not None:
            client = self._client(uri)
            try:
                client.update_run(run_id, status="RUNNING")
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                _log.warning("MLflow run %s no longer exists at %s; starting a new run", run_id, uri)
            else:
                self._log_tags(client, run_id, record["tags"])
                return
        with _store_lock(uri):  # MLflow creates a new store's tables on first use: one process at a time
            client = self._client(uri)
            experiment_id = self._experiment_id(client, record["experiment"])
        run = client.create_run(
            experiment_id, start_time=record["time"], tags=record["tags"], run_name=record["run_name"]
        )
        self.journal.append({"run_id": run.info.run_id, "tracking_uri": uri})

    @staticmethod
    def _experiment_id(client: Any, name: str) -> str:
        """The id of experiment `name`, created if it does not exist."""
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException as e:  # created concurrently by another run
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(name).experiment_id

    def _send_params(self, record: dict[str, Any], uri: str) -> None:
        from mlflow.entities import Param

        client, run_id = self._client(uri), self._run_id(uri)
        refused: list[str] = []
        for chunk in _chunks(list(record["params"].items()), _PARAMS_PER_BATCH):
            try:
                client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
            except Exception as e:
                if not _is_rejection(e):
                    raise
                # One param whose value changed (a resumed run) refuses its whole batch.
                for key, value in chunk:
                    try:
                        client.log_batch(run_id, params=[Param(key, value)])
                    except Exception as e:
                        if not _is_rejection(e):
                            raise
                        refused.append(key)
        if refused:
            _log.warning("MLflow refused params %s (a run's logged param values cannot change)", ", ".join(refused))

    def _send_metrics(self, record: dict[str, Any], uri: str) -> None:
        from mlflow.entities import Metric

        client, run_id = self._client(uri), self._run_id(uri)
        metrics = [Metric(k, v, record["time"], record["step"]) for k, v in record["metrics"].items()]
        for chunk in _chunks(metrics, _METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk)

    def _send_artifact(self, record: dict[str, Any], uri: str) -> None:
        client, run_id = self._client(uri), self._run_id(uri)
        path = Path(record["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), record["artifact_path"])
        elif path.is_file():
            client.log_artifact(run_id, str(path), record["artifact_path"])
        else:
            raise _Rejected(f"artifact {path} no longer exists")

    def _send_model(self, record: dict[str, Any], uri: str) -> None:
        """Make the saved MLflow model in ``record["path"]`` the run's LoggedModel ``record["name"]``.

        What ``mlflow.pytorch.log_model`` does after it saved the model, with the client of this
        store (no global tracking URI or active run): create the LoggedModel (source run, the
        run's params), link it to the run as an output at ``step``, upload the directory with
        the model and run ids written into its MLmodel, and mark it READY. (Not log_model's copy
        of the step's metrics with the model's id: they would be a second point at that step in
        the run's history.) Sent again (the ``sent`` line lost), it finds the model of this run,
        name and step and carries on from where it stopped, or does nothing if it is READY.
        """
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        client, run_id = self._client(uri), self._run_id(uri)
        path, name, step = Path(record["path"]), record["name"], int(record["step"])
        if not (path / "MLmodel").is_file():
            raise _Rejected(f"MLflow model {path} no longer exists")
        run = client.get_run(run_id)
        experiment_id = run.info.experiment_id
        model = self._logged_model(client, experiment_id, run_id, name, step)
        if model is not None and model.status == LoggedModelStatus.READY:
            return
        if model is None:
            tags = {k: v for k, v in run.data.tags.items() if k.startswith("mlflow.source.") or k == MLFLOW_USER}
            model = client.create_logged_model(
                experiment_id, name=name, source_run_id=run_id, params=dict(run.data.params),
                tags={**tags, "gunn.step": str(step)},
            )
        outputs = run.outputs.model_outputs if run.outputs is not None else []
        if not any(o.model_id == model.model_id for o in outputs):
            client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        with tempfile.TemporaryDirectory(prefix="gunn-mlflow-model-") as tmp:
            # The run's copy stays as saved; the uploaded one names its run and LoggedModel, as log_model's does.
            local = Path(tmp) / path.name
            shutil.copytree(path, local)
            mlmodel = Model.load(str(local / "MLmodel"))
            mlmodel.run_id, mlmodel.model_id, mlmodel.model_uuid = run_id, model.model_id, model.model_id
            mlmodel.artifact_path = model.artifact_location
            mlmodel.save(str(local / "MLmodel"))
            client.log_model_artifacts(model.model_id, str(local))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)

    @staticmethod
    def _logged_model(client: Any, experiment_id: str, run_id: str, name: str, step: int) -> Any:
        """The LoggedModel `name` of run `run_id` at `step` that an earlier send created, or None."""
        token = None
        while True:
            page = client.search_logged_models(
                [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'", page_token=token
            )
            for model in page:
                if model.tags.get("gunn.step") == str(step):
                    return model
            token = page.token
            if not token:
                return None

    def _send_tags(self, record: dict[str, Any], uri: str) -> None:
        self._log_tags(self._client(uri), self._run_id(uri), record["tags"])

    def _send_finish(self, record: dict[str, Any], uri: str) -> None:
        self._client(uri).set_terminated(self._run_id(uri), status=record["status"], end_time=record["time"])

    @staticmethod
    def _log_tags(client: Any, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], _PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)


# --------------------------------------------------------------------------- system metrics


class _SystemMetrics:
    """MLflow's system metrics of this machine, logged to one run from a thread of their own.

    The monitors are MLflow's (``mlflow.system_metrics``: CPU, memory, disk, network, and the
    NVIDIA or AMD GPUs when there are any), and so are the names (``system/cpu_utilization_percentage``,
    ``system/gpu_0_utilization_percentage``, ...) and steps (one per logged sample, continuing a
    resumed run's). MLflow's own ``SystemMetricsMonitor`` is not used: it needs a fluent active run
    or the process-wide tracking URI, stops for good at the first failed call, with a warning,
    and waits for MLflow's slow HTTP retries. Here each sample is logged once, with the short
    timeouts of the sender, and dropped if the server does not answer (debug log only); `stop`
    logs what was sampled since the last one, so that a run of a few seconds has a sample too.
    """

    def __init__(self, uri: str, run_id: str, interval: float, samples_before_logging: int = 1) -> None:
        self.uri, self.run_id = uri, run_id
        self.interval, self.samples_before_logging = interval, max(1, samples_before_logging)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gunn-mlflow-system-metrics", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Log a last sample and stop, waiting `timeout` seconds at most."""
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        with _short_http_timeouts():
            monitors = self._monitors()
            if not monitors:
                return
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            client, step, samples = MlflowClient(tracking_uri=self.uri), None, 0
            while True:
                stopping = self._stop.wait(self.interval)
                for monitor in monitors:
                    try:
                        monitor.collect_metrics()
                    except Exception as e:  # noqa: BLE001 - a failing sensor costs its values, not the others'
                        _log.debug("System metrics: %s failed: %s", type(monitor).__name__, _brief(e))
                samples += 1
                if samples >= self.samples_before_logging or stopping:
                    values: dict[str, float] = {}
                    for monitor in monitors:
                        try:
                            values.update(monitor.aggregate_metrics())
                        except Exception as e:  # noqa: BLE001
                            _log.debug("System metrics: %s failed: %s", type(monitor).__name__, _brief(e))
                        monitor.clear_metrics()
                    samples = 0
                    try:
                        if values:
                            if step is None:
                                step = self._next_step(client)
                            now = int(time.time() * 1000)
                            client.log_batch(self.run_id, metrics=[
                                Metric(f"system/{k}", float(v), now, step) for k, v in values.items()])
                            step += 1
                    except Exception as e:  # noqa: BLE001 - the sender reports outages; a lost sample is no news
                        _log.debug("System metrics sample not logged to %s: %s", self.uri, _brief(e))
                if stopping:
                    return

    def _next_step(self, client: Any) -> int:
        """The step after the run's last system metrics sample (a resumed run continues its steps)."""
        run = client.get_run(self.run_id)
        steps = [m.step for m in getattr(run.data, "_metric_objs", ()) if m.key.startswith("system/")]
        return max(steps) + 1 if steps else 0

    @staticmethod
    def _monitors() -> list[Any]:
        try:
            import psutil
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
        except ImportError as e:
            _log.warning("MLflow system metrics are not logged: %s (install psutil, or set logging.system_metrics="
                         "false)", e)
            return []
        psutil.cpu_percent()  # the first sample then covers its interval, not the time since this process began
        monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        for module, name in (("gpu_monitor", "GPUMonitor"), ("rocm_monitor", "ROCMMonitor")):
            try:  # pynvml (nvidia-ml-py) for NVIDIA GPUs; both fail without a GPU
                monitors.append(getattr(__import__(f"mlflow.system_metrics.metrics.{module}", fromlist=[name]), name)())
                break
            except Exception as e:  # noqa: BLE001
                _log.debug("No %s system metrics: %s", name, _brief(e))
        return monitors


def _system_metrics_settings() -> tuple[float, int]:
    """The sampling interval (s) and samples per logged value: MLflow's variables if set, else 10 s and 1."""
    def number(name: str, kind: type, default: float | int) -> Any:
        raw = os.environ.get(name)
        try:
            return kind(raw) if raw else default
        except ValueError:
            _log.warning("Ignoring %s=%r: not a number", name, raw)
            return default

    interval = number("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", float, SYSTEM_METRICS_INTERVAL_S)
    return max(interval, 0.1), number("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", int, 1)


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


# --------------------------------------------------------------------------- the tracker


def _check_key(kind: str, key: str) -> str:
    key = str(key)
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{kind} name {key!r} must have 1 to {MAX_KEY_LENGTH} characters")
    return key


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
        LOCAL, mlflow.user); ``system_metrics``: log this machine's (see `_SystemMetrics`) while the
        run lasts, from when the server has the run."""
        if not experiment:
            raise ValueError(f"experiment must be a non-empty name, got {experiment!r}")
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.journal_path = self.run_dir / JOURNAL_NAME
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self._drain_timeout = drain_timeout
        self._retry_interval = retry_interval

        self._journal = _Journal(self.journal_path)
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
        self._sender = _Sender(self._journal)
        self._system_metrics = system_metrics
        self._monitor: _SystemMetrics | None = None

        flat = {_check_key("param", k): str(v) for k, v in flatten(params).items()}
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
            tags=self._clean_tags(run_tags),
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

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log metric values at `step`; returns at once."""
        values = {_check_key("metric", k): float(v) for k, v in metrics.items()}
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
        self._enqueue("model", path=str(path), name=_check_key("model", name), step=int(step))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags; returns at once."""
        self._enqueue("tags", tags=self._clean_tags(tags))

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

    @staticmethod
    def _clean_tags(tags: dict[str, str]) -> dict[str, str]:
        return {_check_key("tag", k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}

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
                if _is_rejection(e):
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
            interval, samples = _system_metrics_settings()
            try:
                self._monitor = _SystemMetrics(self.tracking_uri, self.run_id, interval, samples)
            except Exception as e:  # noqa: BLE001 - not worth failing the start record for
                self._system_metrics = False
                _log.warning("MLflow system metrics are not logged: %s", _brief(e))

    def _on_outage(self, error: Exception) -> None:
        with self._cond:
            was_down, self._down = self._down, True
            self._cond.notify_all()
        if was_down:
            _log.debug("MLflow at %s still unreachable: %s", self.tracking_uri, _brief(error))
            return
        _log.warning(
            "MLflow tracking at %s is unreachable (%s). Training goes on; tracking calls are kept in %s "
            "and sent when the server is back, or later with: %s",
            self.tracking_uri,
            _brief(error),
            self.journal_path,
            sync_command(self.run_dir),
        )

    def _warn_rejected(self, record: dict[str, Any], error: Exception) -> None:
        self._rejections += 1
        level = logging.WARNING if self._rejections <= _MAX_REJECTION_WARNINGS else logging.DEBUG
        _log.log(level, "MLflow refused the %s call #%d: %s", record["op"], record["seq"], error)


# --------------------------------------------------------------------------- sync


def sync(run_dir: Path, *, final_status: str | None = None) -> tuple[int, int]:
    """Send what the journal in `run_dir` holds but MLflow never got; return (sent, still unsent)."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / JOURNAL_NAME
    if not path.exists():
        raise FileNotFoundError(f"no MLflow journal {path} in run_dir {run_dir}")
    if final_status is not None and final_status not in FINAL_STATUSES:
        raise ValueError(f"final_status must be one of {FINAL_STATUSES}, got {final_status!r}")
    journal = _Journal(path)
    last_op = max(journal.work, key=lambda r: r["seq"])["op"] if journal.work else None
    if final_status is not None and last_op not in (None, "finish"):
        journal.append(
            {"seq": journal.next_seq, "op": "finish", "time": int(time.time() * 1000), "status": final_status}
        )
    sender = _Sender(journal)
    sent, unsent, unreachable = 0, 0, set()
    for record in journal.pending():
        if record["_uri"] in unreachable:  # keeps each store's calls in order
            unsent += 1
            continue
        try:
            sender.send(record)
            sent += 1
        except Exception as e:  # noqa: BLE001 - reported, and the record stays in the journal
            if _is_rejection(e):
                sender.reject(record, e)
                _log.warning("MLflow refused the %s call #%d: %s", record["op"], record["seq"], e)
            else:
                _log.error("Could not reach MLflow at %s: %s", record["_uri"], _brief(e))
                unreachable.add(record["_uri"])
                unsent += 1
    return sent, unsent


def complete(
    run_dir: Path, status: str, *, tags: dict[str, str] | None = None, artifacts: tuple[Path, ...] = ()
) -> tuple[int, int]:
    """Makes the run of `run_dir` end as `status` (with `tags`), with `artifacts` logged once, and its
    MLflow model (``MODEL_DIR_NAME``, if the run saved one) too if FINISHED, and sends what its journal holds;
    (sent, still unsent). For a run whose own process may have ended it
    otherwise, or not at all (killed): the caller knows better, e.g. a sweep knows that its
    scheduler stopped a trial. Hold the run directory's lock: no other process may write here."""
    run_dir = Path(run_dir).resolve()
    if status not in FINAL_STATUSES:
        raise ValueError(f"status must be one of {FINAL_STATUSES}, got {status!r}")
    journal = _Journal(run_dir / JOURNAL_NAME)
    if not journal.work:
        return 0, 0  # the run never started tracking
    logged = journal.artifacts()
    for path in artifacts:
        path = Path(path).resolve()
        if path.exists() and (str(path), None) not in logged:
            journal.append({"seq": journal.next_seq, "op": "artifact", "time": int(time.time() * 1000),
                            "path": str(path), "artifact_path": None})
    model_dir = run_dir / MODEL_DIR_NAME
    if (status == "FINISHED" and (model_dir / "MLmodel").is_file()
            and not any(p == str(model_dir) for p, _, _ in journal.models())):
        # Saved by a process that died before it journaled it.
        journal.append({"seq": journal.next_seq, "op": "model", "time": int(time.time() * 1000),
                        "path": str(model_dir), "name": MODEL_NAME, "step": model_step(model_dir)})
    recorded: dict[str, str] = {}
    for record in sorted(journal.work, key=lambda r: r["seq"]):
        recorded.update(record.get("tags", {}) if record["op"] in ("start", "tags") else {})
    tags = {k: v for k, v in Tracker._clean_tags(tags or {}).items() if recorded.get(k) != v}
    if journal.ending() != status or tags:
        if tags:
            journal.append({"seq": journal.next_seq, "op": "tags", "time": int(time.time() * 1000), "tags": tags})
        journal.append({"seq": journal.next_seq, "op": "finish", "time": int(time.time() * 1000), "status": status})
    return sync(run_dir)


def model_step(model_dir: Path) -> int:
    """The step (epoch) that the engine saved in an MLflow model's MLmodel (metadata ``gunn``); 0 if none."""
    import yaml

    try:
        meta = (yaml.safe_load((Path(model_dir) / "MLmodel").read_text()).get("metadata") or {}).get("gunn") or {}
        return int(meta.get("step", 0))
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m gunn.train.tracking sync RUN_DIR`."""
    parser = argparse.ArgumentParser(prog="python -m gunn.train.tracking", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sync_parser = commands.add_parser("sync", help="send the tracking calls MLflow has not received")
    sync_parser.add_argument("run_dir", type=Path)
    sync_parser.add_argument(
        "--status",
        choices=FINAL_STATUSES,
        default=None,
        help="end the run with this status if training stopped without ending it (e.g. killed)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not (args.run_dir / JOURNAL_NAME).exists():
        parser.error(f"no {JOURNAL_NAME} in {args.run_dir}")
    sent, unsent = sync(args.run_dir, final_status=args.status)
    journal = _Journal(args.run_dir.resolve() / JOURNAL_NAME)
    runs = ", ".join(f"{run_id} at {uri}" for uri, run_id in journal.runs.items()) or "none"
    print(f"sent {sent} call(s), {unsent} still unsent; MLflow run: {runs}")
    if journal.work and max(journal.work, key=lambda r: r["seq"])["op"] != "finish":
        print("note: the run was not ended (still running, or killed); pass --status KILLED to end it")
    return 1 if unsent else 0


# --------------------------------------------------------------------------- plots


_PANEL_INCHES = (4.0, 3.2)  # 400 x 320 px per panel at the PNG's dpi of 100
_MAX_COLUMNS = 4  # at most 1600 px wide, however many panels
_MARKER_EPOCHS = 30  # fewer points than this: markers, so that a single epoch still shows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _curve_panels(history: list[dict[str, float]]) -> dict[str, list[tuple[str, str]]]:
    """Panel title -> (key, legend label) of each line, in the order keys first appear in `history`.

    Keys `group/<name>/<measure>` (the singularity diagnostics `singularity/<layer>/<measure>`)
    share one panel per measure, with one line per name; losses, errors and learning rates
    each share a panel; any other key gets its own.
    """
    keys = list(dict.fromkeys(k for row in history for k, v in row.items() if _is_number(v) and k != "epoch"))
    panels: dict[str, list[tuple[str, str]]] = {"loss": [], "error": [], "learning rate": []}
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 3 and all(parts):
            panels.setdefault(f"{parts[0]}: {parts[-1]}", []).append((key, "/".join(parts[1:-1])))
        elif "loss" in key:
            panels["loss"].append((key, key))
        elif "error" in key or "acc" in key:
            panels["error"].append((key, key))
        elif key == "lr" or key.startswith("lr"):
            panels["learning rate"].append((key, key))
        else:
            panels.setdefault(key, []).append((key, key))
    return {title: lines for title, lines in panels.items() if lines}


def _curves_figure(history: list[dict[str, float]]) -> Any:
    """The matplotlib Figure that `plot_curves` saves: a grid of at most 4 panels a row."""
    if not history:
        raise ValueError("history must hold at least one epoch, got an empty list")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = _curve_panels(history)
    if not panels:
        raise ValueError(f"history has no numeric values to plot; keys: {sorted(history[0])}")

    columns = min(_MAX_COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    width, height = _PANEL_INCHES
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    grid = list(figure.subplots(rows, columns, squeeze=False).flat)
    for axes, (title, lines) in zip(grid, panels.items()):
        for key, label in lines:
            # Keys may be missing in some epochs (e.g. evaluation every few epochs).
            points = [(row.get("epoch", i + 1), row[key]) for i, row in enumerate(history) if _is_number(row.get(key))]
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < _MARKER_EPOCHS else None, markersize=4, label=label)
        if title == "learning rate" and all(v > 0 for line in axes.get_lines() for v in line.get_ydata()):
            axes.set_yscale("log")
        axes.set_title(title, fontsize="medium")
        axes.set_xlabel("epoch", fontsize="small")
        axes.tick_params(labelsize="small")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.grid(alpha=0.3)
        many = len(lines) > 4
        axes.legend(fontsize="x-small" if many else "small", ncols=2 if many else 1, framealpha=0.6)
    for axes in grid[len(panels):]:  # the unused cells of the last row
        axes.set_visible(False)
    return figure


def plot_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Write a PNG of the training curves in `history` (one dict per epoch) to `path`.

    A grid of 400 x 320 px panels, at most 4 a row (1600 px), as many rows as needed.
    """
    figure = _curves_figure(history)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # whole or not there: a kill may come any time
    try:
        figure.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
