"""MLflow tracking of a training run that survives the tracking server going away.

Every call is first appended to ``RUN_DIR/mlflow-journal.jsonl`` and then sent by a
background thread, in order. A dead server costs one warning; what it missed stays in
the journal and is sent when it comes back, or later with
``python -m gunn.train.tracking sync RUN_DIR``.

- `journal`: the journal file and its records (``{"seq": 3, "op": "metrics", ...}``, ``{"sent": 3}``,
  ``{"run_id": ..., "tracking_uri": ...}``);
- `sender`: sends records to MLflow and tells a refused record from an outage; the race-safe
  get-or-create of an experiment (`experiment_id`);
- `tracker`: `Tracker`, one MLflow run logged from rank 0 without ever blocking training;
- `system_metrics`: MLflow's system metrics of the machine while a run lasts (not journaled);
- `sync`: the ``sync`` command, and `complete` for a run whose own process could not end its record;
- `store`: tracking URIs and the lock of a local SQLite store.

A model record names an MLflow model directory that the training process saved
(``mlflow.pytorch.save_model``: weights, signature, input example); sending it makes it the
run's LoggedModel (MLflow 3), as ``mlflow.pytorch.log_model`` would, so that
``runs:/<run id>/<name>`` and ``models:/<model id>`` load and serve it.

A sweep's parent run is a Tracker too, journaled in the sweep directory; its trials name it
``journal:SWEEP_DIR`` while it has no id yet (see `journal.journal_reference`).
"""

from __future__ import annotations

from gunn.train.tracking.journal import (
    JOURNAL_NAME,
    MODEL_DIR_NAME,
    MODEL_NAME,
    journal_reference,
    journaled_run_id,
    sync_command,
)
from gunn.train.tracking.sender import experiment_id
from gunn.train.tracking.store import default_tracking_uri, resolve_tracking_uri
from gunn.train.tracking.sync import complete, model_step, sync
from gunn.train.tracking.tracker import Tracker

__all__ = [
    "JOURNAL_NAME",
    "MODEL_DIR_NAME",
    "MODEL_NAME",
    "Tracker",
    "complete",
    "default_tracking_uri",
    "experiment_id",
    "journal_reference",
    "journaled_run_id",
    "model_step",
    "resolve_tracking_uri",
    "sync",
    "sync_command",
]
