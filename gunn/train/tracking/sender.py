"""Sending journal records to MLflow: one record at a time, with short HTTP timeouts, and telling a
record the server refused for good (a rejection) from an outage (try again later)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gunn.train.tracking.journal import REFERENCE_PREFIX, Journal, journaled_run_id, sync_command
from gunn.train.tracking.store import store_lock

# MLflow prints "🏃 View run ... at: URL" to stdout when a run on a server ends; the engine's own line names
# the run and how to browse it. Set it to false to have MLflow's lines back.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

__all__ = ["ParentNotSent", "brief", "experiment_id", "short_http_timeouts"]

_log = logging.getLogger(__package__)

# MLflow's own tag names (mlflow.utils.mlflow_tags), copied so that importing this module stays cheap.
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
MLFLOW_USER = "mlflow.user"

_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000

# MLflow's HTTP client defaults (7 retries, backoff factor 2, 120 s timeout) take minutes to
# give up on a dead server. These apply only on threads inside `short_http_timeouts()`
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


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment `name` in the store of `client`, created if it does not exist.

    Race-safe: runs that start at once (array jobs, sweeps) may all find it missing; one
    creates it and the others take its id. A fresh local SQLite store is locked meanwhile (see
    `store_lock`): MLflow creates its tables on first use, one process at a time."""
    from mlflow.exceptions import MlflowException

    with store_lock(client.tracking_uri):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException as e:  # created concurrently by another run
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(name).experiment_id


class ParentNotSent(RuntimeError):
    """The run's parent (a ``journal:DIR`` tag) is not in MLflow yet: not a rejection, sent again later."""


_http_local = threading.local()
_http_patch_lock = threading.Lock()
_http_patched = False


def _patch_mlflow_http_settings() -> None:
    """Make MLflow's HTTP settings fall back to `_HTTP_SETTINGS` on threads inside `short_http_timeouts()`."""
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
def short_http_timeouts() -> Iterator[None]:
    _patch_mlflow_http_settings()
    _http_local.active = True
    try:
        yield
    finally:
        _http_local.active = False


class _Rejected(Exception):
    """The server (or the local file system) refused one record for good."""


def is_rejection(error: Exception) -> bool:
    if isinstance(error, _Rejected):
        return True
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in _REJECTION_CODES


def brief(error: BaseException) -> str:
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


class Sender:
    """Sends journal records to MLflow, one at a time, and journals what was sent."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._clients: dict[str, Any] = {}

    def _client(self, uri: str) -> Any:
        if uri not in self._clients:
            from mlflow.tracking import MlflowClient

            self._clients[uri] = MlflowClient(tracking_uri=uri)
        return self._clients[uri]

    def send(self, record: dict[str, Any]) -> None:
        """Send one record; raise on failure (see `is_rejection` for which failures are final)."""
        with short_http_timeouts():
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

        tags = self._resolved(record["tags"], uri)
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
                self._log_tags(client, run_id, tags)
                return
        with store_lock(uri):  # MlflowClient opens its store when made, making a new store's tables: one at a time
            client = self._client(uri)
        run = client.create_run(
            experiment_id(client, record["experiment"]), start_time=record["time"], tags=tags,
            run_name=record["run_name"],
        )
        self.journal.append({"run_id": run.info.run_id, "tracking_uri": uri})

    @staticmethod
    def _resolved(tags: dict[str, str], uri: str) -> dict[str, str]:
        """`tags` with a ``journal:DIR`` value (the parent run) replaced by the id of the run journaled in DIR."""
        parent = tags.get(MLFLOW_PARENT_RUN_ID, "")
        if not parent.startswith(REFERENCE_PREFIX):
            return tags
        parent_dir = Path(parent[len(REFERENCE_PREFIX):])
        run_id = journaled_run_id(parent_dir, uri)
        if run_id is None:
            raise ParentNotSent(f"the parent run journaled in {parent_dir} is not in MLflow at {uri} yet "
                                f"(send it with: {sync_command(parent_dir)})")
        return {**tags, MLFLOW_PARENT_RUN_ID: run_id}

    def _send_params(self, record: dict[str, Any], uri: str) -> None:
        from mlflow.entities import Param

        client, run_id = self._client(uri), self._run_id(uri)
        refused: list[str] = []
        for chunk in _chunks(list(record["params"].items()), _PARAMS_PER_BATCH):
            try:
                client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
            except Exception as e:
                if not is_rejection(e):
                    raise
                # One param whose value changed (a resumed run) refuses its whole batch.
                for key, value in chunk:
                    try:
                        client.log_batch(run_id, params=[Param(key, value)])
                    except Exception as e:
                        if not is_rejection(e):
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
        self._log_tags(self._client(uri), self._run_id(uri), self._resolved(record["tags"], uri))

    def _send_finish(self, record: dict[str, Any], uri: str) -> None:
        self._client(uri).set_terminated(self._run_id(uri), status=record["status"], end_time=record["time"])

    @staticmethod
    def _log_tags(client: Any, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], _PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)

