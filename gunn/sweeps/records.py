"""The sweep's MLflow records: its parent run, every trial's record completed as the sweep saw the trial
end, the report logged to the parent, and the commands that send what MLflow missed or rebuild the report."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from gunn import config as cfgmod
from gunn.cluster.commands import command, write_stderr
from gunn.sweeps import report
from gunn.sweeps.trainable import TRIAL_ERROR

if TYPE_CHECKING:
    from gunn.train.tracking import Tracker

def parent_run(tracking_uri: str, experiment: str, name: str, args: argparse.Namespace, sweep_dir: Path) -> Tracker:
    """The sweep's MLflow parent run, a Tracker journaled in the sweep directory: created once (sent
    when MLflow is reachable, kept for ``sync`` when it is not), found again on --resume."""
    from gunn.train.tracking import Tracker

    params = {"study": args.study, "preset": args.preset or "digits", "seeds": args.seeds, "widths": args.widths,
              "models": getattr(args, "models", None), "overrides": args.overrides}
    return Tracker(run_dir=sweep_dir, tracking_uri=tracking_uri, experiment=experiment, run_name=name,
                   params={k: json.dumps(v) for k, v in params.items()},
                   tags={"study": args.study, "sweep": name, "sweep_dir": str(sweep_dir)}, drain_timeout=30.0)


def warn_unsent(run_dirs: list[Path]) -> None:
    """One warning per run directory (the sweep's own: its parent run) whose records MLflow has not received."""
    from gunn.train.tracking import sync_command

    for run_dir in run_dirs:
        write_stderr(f"warning: MLflow has not received all of {run_dir}'s records; send them with: {sync_command(run_dir)}")


def write_report(parent: Tracker, tracking_uri: str, out: Path) -> tuple[str | None, str]:
    """Builds the report of the sweep whose parent run is the Tracker ``parent`` into ``out`` and logs it to
    that run through its journal; (the report's table, None when MLflow could not give the runs; why not)."""
    from mlflow.exceptions import MlflowException

    from gunn.train.tracking.sender import brief

    if not parent.flush(timeout=60.0) or parent.run_id is None:
        return None, "unreachable"
    try:
        table = report.build(tracking_uri, parent.run_id, out, log=False, ended=True)
    except (MlflowException, report.ReportError, OSError) as err:  # it went away meanwhile
        return None, brief(err)
    if out.is_dir():  # as report.py --attach logs it (gunn.sweeps.report._attach), through the journal
        parent.log_artifact(report.mlflow_copy(out, parent.run_id, out.parent / ".report-mlflow", tracking_uri), "report")
        parent.log_metrics(report.summary_metrics(report.read_rows(out)), step=0)
    return table, ""


def complete_records(trials: list[dict], sweep_dir: Path, statuses: dict[str, dict]) -> tuple[dict[str, str], list[Path]]:
    """Ends every trial's MLflow run as the sweep saw the trial end, from its run directory and journal.

    A trial's own process may have been killed before its record was complete (Ctrl-C, SIGKILL, or Tune
    ending it right after a report), and only the sweep knows why a trial stopped. Endings:
    finished (model-final.pt: FINISHED, with its curves, configuration and weights logged), failed
    (FAILED), stopped early by ASHA (FINISHED, tags stopped_early=true and stopped_epoch), interrupted
    (KILLED; --resume continues it) and not started (no run). Returns the endings by trial name and the
    run directories whose records MLflow has not all received (it did not answer).
    """
    from gunn.train.rundir import RunDirError, RunDirLock
    from gunn.train.tracking import JOURNAL_NAME, complete

    endings: dict[str, str] = {}
    unsent: list[Path] = []
    for trial in trials:
        key, run_dir = trial["key"], sweep_dir / "runs" / trial["key"]
        seen = statuses.get(key, {})
        if (run_dir / "model-final.pt").exists():
            ending, status, tags = "finished", "FINISHED", {}
        elif seen.get("status") == "ERROR":
            ending, status, tags = "failed", "FAILED", {}
        elif seen.get("status") == "TERMINATED":
            ending, status = "stopped early", "FINISHED"
            tags = {"stopped_early": "true", "stopped_epoch": str(seen.get("epoch", 0))}
        elif (run_dir / JOURNAL_NAME).exists():
            ending, status, tags = "interrupted", "KILLED", {}
        else:
            endings[key] = "not started"
            continue
        endings[key] = ending
        error = trial_error(run_dir) if ending == "failed" else None
        if not (run_dir / JOURNAL_NAME).exists():
            if ending != "failed":
                continue
            _start_failed_record(trial, run_dir)  # it failed before its MLflow run existed
        lock = RunDirLock(run_dir)
        deadline = time.monotonic() + 60
        while True:  # the trial's process may still be ending
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # taking over from a killed trial is the point
                    lock.acquire()
                break
            except RunDirError as err:
                if time.monotonic() > deadline:
                    write_stderr(f"warning: {err}; its MLflow record is completed by --resume")
                    lock = None
                    break
                time.sleep(1)
        if lock is None:
            continue
        try:
            if ending == "finished" and not (run_dir / "curves.png").exists():
                _plot_from_checkpoint(run_dir)  # the trial was killed before it drew them
            files = (run_dir / "curves.png", run_dir / "config.yaml", run_dir / "model-final.pt")
            kept = files if ending == "finished" else (*files[1:2], run_dir / TRIAL_ERROR)
            if error:
                tags["error"] = error
            _, left = complete(run_dir, status, tags=tags, artifacts=kept)
        finally:
            lock.release()
        if left:
            unsent.append(run_dir)
    return endings, unsent


def trial_error(run_dir: Path) -> str | None:
    """The last line of the failed trial's traceback (the exception and its message), if it left one."""
    path = run_dir / TRIAL_ERROR
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1][:1000] if lines else None


def _start_failed_record(trial: dict, run_dir: Path) -> None:
    """Journals an MLflow run for a trial that failed before it made its own: a FAILED child of the sweep,
    with the trial's configuration as params, so that it shows in the MLflow UI and as a report row."""
    from gunn.train.tracking.run import run_tracker

    config = cfgmod.resolve(cfgmod.from_dict(trial["config"]))  # the model's own values, as the engine logs them
    run_tracker(config, run_dir, name=trial["key"], start_timeout=10.0).finish("FAILED")


def _plot_from_checkpoint(run_dir: Path) -> None:
    """curves.png of the run in ``run_dir`` from the history in its newest checkpoint, if it can."""
    from gunn.train import checkpoint as ckpt
    from gunn.train.plots import plot_curves

    with contextlib.suppress(Exception):  # a plot is not worth failing the record for
        loaded = ckpt.load_latest(run_dir)
        if loaded is not None and loaded[0].get("history"):
            plot_curves(loaded[0]["history"], run_dir / "curves.png")


def rebuild_command(parent: str, tracking_uri: str) -> str:
    """The command that rebuilds the report of the sweep ``parent`` from MLflow, from any folder."""
    return shlex.join([*command("report", absolute=True), parent, "--tracking-uri", tracking_uri])
