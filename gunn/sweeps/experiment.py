"""The sweep as one Ray Tune experiment: its trials on a Ray cluster (``drive``; on this machine:
``run_locally``), then every trial's MLflow record completed and the report written."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import tempfile
from pathlib import Path
from typing import Any

from gunn import config as cfgmod
from gunn.cluster.commands import command, write_stderr
from gunn.sweeps.ray_nodes import auth_token, ray_head
from gunn.sweeps.records import complete_records, parent_run, rebuild_command, trial_error, warn_unsent, write_report
from gunn.sweeps.studies import trial_configs
from gunn.sweeps.trainable import run_trial


def drive(args: argparse.Namespace, sweep_dir: Path, address: str) -> tuple[int, bool]:
    """Runs (or resumes) the sweep on the Ray cluster at ``address``, completes every trial's MLflow
    record and writes the report; (the exit status: 0, 1 a trial failed or MLflow has not received
    everything, 3 interrupted; whether a trial failed: Ray's logs are worth keeping)."""
    import ray
    from ray import tune

    from gunn.sweeps.grid import GunnGrid, with_limit
    from gunn.train.tracking import journal_reference, resolve_tracking_uri

    base = cfgmod.load(args.preset, args.overrides)
    tracking_uri = resolve_tracking_uri(base.logging.tracking_uri)
    parent = parent_run(tracking_uri, base.logging.experiment, sweep_dir.name, args, sweep_dir)
    # Without a run id yet (MLflow unreachable), the trials name the parent by its journal; each
    # trial's run takes the parent's id when it is sent (see gunn.train.tracking.journal).
    trials = trial_configs(args, sweep_dir, parent.run_id or journal_reference(sweep_dir), tracking_uri)
    names = json.dumps([t["key"] for t in trials])
    # What the report needs to tell a partial sweep from a whole one (gunn.sweeps.report.progress_line).
    parent.set_tags({"gunn.trials": str(len(trials)), **({"gunn.trial_names": names} if len(names) <= 5000 else {})})
    named = parent.run_id or f"(not created yet; journaled in {sweep_dir})"
    print(f"sweep {sweep_dir.name}: {len(trials)} trials, MLflow parent run {named} at {tracking_uri}", flush=True)
    if not args.verbose:
        _quiet_ray()
    endings_file = sweep_dir / "tune-endings.json"
    interrupted = False
    try:
        ray.init(address=address, log_to_driver=args.verbose,
                 logging_level=logging.INFO if args.verbose else logging.WARNING)
        stop_on_signals()  # ray.init put its own SIGTERM handlers in place (Python's exit, its core's stack dump)
        trainable = tune.with_resources(run_trial, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
        tune_dir = sweep_dir / "tune"
        if args.resume and tune_dir.exists():
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
            if not with_limit(tuner, args.max_concurrent):
                write_stderr("warning: this sweep keeps its first --max-concurrent (it was started by an older gunn)")
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(trials)},
                tune_config=tune.TuneConfig(
                    metric="eval_top1_error", mode="min", scheduler=_scheduler(args, base.optim.epochs),
                    search_alg=GunnGrid(max_concurrent=args.max_concurrent),
                    trial_dirname_creator=lambda trial: trial.config["trial"]["key"][:120],
                    trial_name_creator=lambda trial: trial.config["trial"]["key"][:120],
                ),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(sweep_dir), verbose=1 if args.verbose else 0,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # pointers: a few bytes each
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    callbacks=[_progress_callback(str(endings_file), len(trials))],
                ),
            )
        tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune took over the signal
        interrupted = True
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        # Ray's shutdown leaves SIGTERM to its default action (the driver ended with status 143 while it
        # completed the records), and Tune leaves its SIGINT handler, which ignores one Ctrl-C after the run.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop_on_signals()
    statuses = json.loads(endings_file.read_text()) if endings_file.is_file() else {}
    parent.flush(timeout=30.0)  # the trials' runs are sent under the parent's id
    endings, unsent = complete_records(trials, sweep_dir, statuses)
    interrupted = interrupted or any(e in ("interrupted", "not started") for e in endings.values())
    failed = [k for k, e in endings.items() if e == "failed"]
    counts = ", ".join(f"{sum(e == what for e in endings.values())} {what}" for what in
                       ("finished", "stopped early", "failed", "interrupted", "not started")
                       if what in endings.values())
    if interrupted:
        parent.finish("KILLED")
        write_stderr(f"sweep {sweep_dir.name} interrupted ({counts} of {len(trials)} trials); the parent run and the "
            f"unfinished trials are KILLED in MLflow, and no report was written. To continue: "
            f"{shlex.join([*command('sweep', absolute=True), '--resume', str(sweep_dir)])}")
        warn_unsent(([sweep_dir] if parent.unsent else []) + unsent)
        return 3, bool(failed)
    for key in failed:
        error = trial_error(sweep_dir / "runs" / key)
        write_stderr(f"trial failed: {key}{f': {error}' if error else ''} (its log: {sweep_dir / 'tune' / key[:120]}, "
                   f"run directory: {sweep_dir / 'runs' / key})")
    table, why = write_report(parent, tracking_uri, sweep_dir / "report")
    if table is not None:
        print(table)
    parent.finish("FAILED" if failed or unsent or table is None else "FINISHED")
    print(f"sweep {sweep_dir.name}: {counts} of {len(trials)} trials")
    rebuild = rebuild_command(parent.run_id or sweep_dir.name, tracking_uri)
    if table is not None:
        print(f"report: {sweep_dir / 'report'}  (rebuild: {rebuild})")
    else:
        write_stderr(f"warning: no report: MLflow at {tracking_uri} could not give the sweep's runs ({why}); once it is back "
                   f"and the records listed below are sent, build it with: {rebuild}")
    warn_unsent(([sweep_dir] if parent.unsent else []) + unsent)  # the parent first: its trials need its id
    return (1 if failed or unsent or parent.unsent or table is None else 0), bool(failed)


def _quiet_ray() -> None:
    """Hides Ray's own chatter (TensorBoard hints, token notices, restore warnings); --verbose shows it."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the experiment box and TensorBoard hint
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        # CRITICAL: a failed trial's traceback is Ray's ERROR; the sweep says it in one line, and keeps the
        # traceback in the trial's run directory (TRIAL_ERROR) and MLflow run.
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _scheduler(args: argparse.Namespace, epochs: int) -> Any:
    """ASHA on eval_top1_error with --asha, else None (every trial runs every epoch).

    A trial that reaches the full budget is never stopped by it at its last report: it ends by
    itself, so that its last epoch's files and MLflow record are complete."""
    if not args.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class FullBudgetEndsByItself(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            if result.get(self._time_attr, 0) >= self._max_t:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return FullBudgetEndsByItself(time_attr="training_iteration", max_t=epochs, grace_period=args.asha_grace,
                                  reduction_factor=2)


def _progress_callback(endings_file: str, total: int) -> Any:
    """A Tune callback that prints one line per trial event (started, each epoch with its error,
    finished, stopped early, failed) with how many trials have ended, and writes every trial's Tune
    status and last epoch to ``endings_file`` when the experiment ends (also when interrupted)."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self, endings: str, total: int) -> None:
            self.endings, self.total = endings, total

        def _line(self, trials: list[Any], trial: Any, text: str, ending: bool = False) -> None:
            ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial) + ending
            print(f"[{ended}/{self.total} done] {trial.config['trial']['key']}: {text}", flush=True)

        @staticmethod
        def _epochs(trial: Any) -> int:
            return trial.config["trial"]["config"]["optim"]["epochs"]

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._line(trials, trial, "started")

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
            if "epoch" in result and "eval_top1_error" in result:
                self._line(trials, trial, f"epoch {int(result['epoch'])}/{self._epochs(trial)}, "
                                          f"eval top-1 error {result['eval_top1_error']:.2f}%")

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            epoch = int((trial.last_result or {}).get("epoch", 0))
            text = "finished" if epoch >= self._epochs(trial) else f"stopped early by ASHA after epoch {epoch}"
            self._line(trials, trial, text, ending=True)
            self._record(trial, "TERMINATED", epoch)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._line(trials, trial, "failed", ending=True)
            self._record(trial, "ERROR", int((trial.last_result or {}).get("epoch", 0)))

        def _record(self, trial: Any, status: str, epoch: int) -> None:
            """Tune's decision on the trial, kept across --resume. (Trials that an interrupted sweep stops
            get no decision: Tune marks them TERMINATED, too, when it cleans up.)"""
            path = Path(self.endings)
            endings = json.loads(path.read_text()) if path.is_file() else {}
            endings[trial.config["trial"]["key"]] = {"status": status, "epoch": epoch}
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(endings))
            os.replace(tmp, path)

    return Progress(endings_file, total)


def run_locally(args: argparse.Namespace, sweep_dir: Path) -> int:
    """The sweep on this machine: its own Ray head (127.0.0.1, free ports) and the driver."""
    auth_token(sweep_dir, create=True)
    temp = Path(tempfile.gettempdir()) / f"gunn-ray-{os.getpid()}"  # short: Ray's socket paths have a limit
    with ray_head(temp, ip="127.0.0.1", port=0, cpus=args.ray_cpus or os.cpu_count() or 1,
                  verbose=args.verbose) as (address, keep):
        status, failed = drive(args, sweep_dir, address)
        if failed:
            keep.append("keep")
            write_stderr(f"Ray's logs: {temp}")
    return status


def stop_on_signals() -> None:
    """SIGTERM interrupts the sweep as Ctrl-C does (Tune's own SIGINT handler ends it cleanly)."""
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
