"""The sweep's Ray Tune trainable: one trial, in a Ray worker (``run_trial``, which Ray pickles by this
module's path)."""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any

from gunn import config as cfgmod

TRIAL_ERROR = "trial-error.txt"  # in a failed trial's run directory: its last attempt's traceback


def run_trial(space: dict[str, Any]) -> None:
    """Ray Tune trainable: trains one configuration and reports every epoch to Tune.

    The engine keeps its own checkpoints in the trial's run directory and always continues
    from the newest, so a restarted trial resumes by itself (on the shared file system of a
    cluster). What Tune stores per epoch is a pointer to that checkpoint, a few bytes, which
    keeps Tune's experiment state consistent however the driver dies.
    """
    from ray import tune

    from gunn.train.engine import train

    # A trial is one process. The rank variables that the Slurm task (or torchrun) starting
    # this Ray node left in the environment describe the sweep's allocation, not the trial.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(name, None)
    config = cfgmod.from_dict(space["trial"]["config"])
    reported = []

    def report_epoch(metrics: dict[str, float], checkpoint: Path | None) -> bool:
        """Reports the epoch to Tune; True when Tune ends the trial here (its scheduler stopped it, or the
        sweep is interrupted): the engine then stops as on a stop request, and the driver, which knows
        why, completes the trial's MLflow record (complete_records)."""
        reported.append(metrics["epoch"])
        try:
            if checkpoint is None:
                tune.report(dict(metrics))
                return False
            with tempfile.TemporaryDirectory() as folder:
                pointer = {"run_dir": str(checkpoint.parent), "checkpoint": checkpoint.name, "epoch": metrics["epoch"]}
                (Path(folder) / "pointer.json").write_text(json.dumps(pointer))
                tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(folder))
        except SystemExit:  # how Tune's report ends a trial that it stops
            return True
        return False

    try:
        result = train(config, on_epoch=report_epoch)
    except Exception:
        # Kept for the sweep's record of the trial: it may fail before its MLflow run exists.
        run_dir = Path(config.checkpoint.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / TRIAL_ERROR).write_text(traceback.format_exc())
        raise
    if not reported and result.history:
        # Restarted after it had finished (the driver died before Tune recorded the end):
        # nothing was trained again; give Tune the run's final metrics.
        tune.report(dict(result.history[-1]))
