"""Ablation sweeps with Ray Tune: python pipelines/sweep.py --study STUDY [PRESET] [field=value ...]

Studies, on any preset (the paper's comparisons, Table 5):
  sunn-vs-gunn  both update orders x seeds
  partitions    the segment width of every GUNN layer over --widths, SUNN as reference
  residual      GUNN with and without residual updates
  peers         --models NAME ...: GUNN against other networks at one recipe (any model.name)
  paper-cifar   the rows of the paper's Tables 3 and 5 that gunn builds (a preset such as gunn15-cifar10 gives
                the paper's recipe; --models picks rows)
  paper-imagenet  the rows of Table 4 that gunn builds (preset gunn18-imagenet; timm's rows with timm)
  custom        --space FILE: a YAML mapping of configuration fields to lists of values (a grid)
Every trial runs the training engine (gunn.train.engine.train, as jobs/launch.py does), reports
each epoch's metrics and checkpoint to Tune, and logs an MLflow child run under the sweep's
parent run. At the end the comparison report (pipelines/report.py) is printed and logged.
The parent run is journaled in the sweep directory, as a trial's run is in its own: a tracking
server that is down costs no trial, and python -m gunn.train.tracking sync DIR sends it later.
``--resume DIR`` finishes an interrupted sweep without redoing finished trials;
``--cluster slurm`` runs the whole sweep inside one Slurm allocation (Ray head on the first
node, Ray workers on the others). Each sweep runs its own Ray (own process group, temporary
folder and ports) and stops only that.

Exit status: 0 every trial finished (or was stopped early by --asha); 1 a trial failed, or
MLflow did not receive every record (the commands that send them are printed);
2 bad arguments; 3 interrupted (Ctrl-C, SIGTERM): the parent run and the unfinished trials
are KILLED in MLflow, no report is written, and --resume DIR continues.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from gunn import config as cfgmod
from gunn.cluster import launch, slurm
from gunn.cluster.commands import command, plain_warnings, program
from gunn.cluster.options import CLUSTER_OPTIONS, LaunchError, add_cluster_arguments, cluster_options
from gunn.config import ConfigError
from gunn.data import DataError
from gunn.sweeps import report
from gunn.sweeps.ray_nodes import RAY, auth_token, ray_head, ray_worker, wait_for_nodes
from gunn.sweeps.studies import MODEL_STUDIES, STUDIES, trial_configs
from gunn.train.distributed import job_port

SETTINGS = "sweep.yaml"  # the sweep's arguments, read back by --resume
TRIAL_ERROR = "trial-error.txt"  # in a failed trial's run directory: its last attempt's traceback
# Options that say where and how a sweep runs: not saved with it, taken anew on --resume.
WHERE_TO_RUN = ("cluster", "wait", "logs", "verbose", "profile", "sbatch", "ray_cpus", *CLUSTER_OPTIONS)
# Saved with the sweep, and changed by --resume when given: how the trials share the machine.
MAY_CHANGE = ("max_concurrent",)


# -- one trial, in a Ray worker --------------------------------------------------------------

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


# -- the driver ------------------------------------------------------------------------------

LEGACY_PARENT_MARKER = "parent_run_id"  # where sweeps started before the parent's journal kept its run id


def parent_run(tracking_uri: str, experiment: str, name: str, args: argparse.Namespace, sweep_dir: Path) -> Any:
    """The sweep's MLflow parent run, a Tracker journaled in the sweep directory: created once (sent
    when MLflow is reachable, kept for ``sync`` when it is not), found again on --resume."""
    from gunn.train.tracking import JOURNAL_NAME, Tracker, journaled_run_id
    from gunn.train.tracking.journal import adopt_run

    marker = sweep_dir / LEGACY_PARENT_MARKER
    if marker.is_file() and journaled_run_id(sweep_dir, tracking_uri) is None:
        adopt_run(sweep_dir / JOURNAL_NAME, marker.read_text().strip(), tracking_uri)  # a sweep started before
    params = {"study": args.study, "preset": args.preset or "digits", "seeds": args.seeds, "widths": args.widths,
              "models": getattr(args, "models", None), "overrides": args.overrides}
    return Tracker(run_dir=sweep_dir, tracking_uri=tracking_uri, experiment=experiment, run_name=name,
                   params={k: json.dumps(v) for k, v in params.items()},
                   tags={"study": args.study, "sweep": name, "sweep_dir": str(sweep_dir)}, drain_timeout=30.0)


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
        _stop_on_signals()  # ray.init put its own SIGTERM handlers in place (Python's exit, its core's stack dump)
        trainable = tune.with_resources(run_trial, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
        tune_dir = sweep_dir / "tune"
        if args.resume and tune_dir.exists():
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
            if not with_limit(tuner, args.max_concurrent):
                launch.say("warning: this sweep keeps its first --max-concurrent (it was started by an older gunn)")
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
        _stop_on_signals()
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
        launch.say(f"sweep {sweep_dir.name} interrupted ({counts} of {len(trials)} trials); the parent run and the "
            f"unfinished trials are KILLED in MLflow, and no report was written. To continue: "
            f"{shlex.join([*command('sweep', absolute=True), '--resume', str(sweep_dir)])}")
        _warn_unsent(([sweep_dir] if parent.unsent else []) + unsent)
        return 3, bool(failed)
    for key in failed:
        error = _trial_error(sweep_dir / "runs" / key)
        launch.say(f"trial failed: {key}{f': {error}' if error else ''} (its log: {sweep_dir / 'tune' / key[:120]}, "
                   f"run directory: {sweep_dir / 'runs' / key})")
    table, why = _write_report(parent, tracking_uri, sweep_dir / "report")
    if table is not None:
        print(table)
    parent.finish("FAILED" if failed or unsent or table is None else "FINISHED")
    print(f"sweep {sweep_dir.name}: {counts} of {len(trials)} trials")
    rebuild = rebuild_command(parent.run_id or sweep_dir.name, tracking_uri)
    if table is not None:
        print(f"report: {sweep_dir / 'report'}  (rebuild: {rebuild})")
    else:
        launch.say(f"warning: no report: MLflow at {tracking_uri} could not give the sweep's runs ({why}); once it is back "
                   f"and the records listed below are sent, build it with: {rebuild}")
    _warn_unsent(([sweep_dir] if parent.unsent else []) + unsent)  # the parent first: its trials need its id
    return (1 if failed or unsent or parent.unsent or table is None else 0), bool(failed)


def _warn_unsent(run_dirs: list[Path]) -> None:
    """One warning per run directory (the sweep's own: its parent run) whose records MLflow has not received."""
    from gunn.train.tracking import sync_command

    for run_dir in run_dirs:
        launch.say(f"warning: MLflow has not received all of {run_dir}'s records; send them with: {sync_command(run_dir)}")


def _write_report(parent: Any, tracking_uri: str, out: Path) -> tuple[str | None, str]:
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
        error = _trial_error(run_dir) if ending == "failed" else None
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
                    launch.say(f"warning: {err}; its MLflow record is completed by --resume")
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


def _trial_error(run_dir: Path) -> str | None:
    """The last line of the failed trial's traceback (the exception and its message), if it left one."""
    path = run_dir / TRIAL_ERROR
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1][:1000] if lines else None


def _start_failed_record(trial: dict, run_dir: Path) -> None:
    """Journals an MLflow run for a trial that failed before it made its own: a FAILED child of the sweep,
    with the trial's configuration as params, so that it shows in the MLflow UI and as a report row."""
    from gunn.train.tracking import Tracker

    c = cfgmod.resolve(cfgmod.from_dict(trial["config"]))  # the model's own values, as the engine logs them
    tags = {"model": c.model.name, "data": c.data.name, "study": c.logging.study or "",
            "mlflow.parentRunId": c.logging.parent_run_id or ""}
    Tracker(run_dir=run_dir, tracking_uri=c.logging.tracking_uri, experiment=c.logging.experiment,
            run_name=c.logging.run_name or trial["key"], params=cfgmod.flatten(c),
            tags={k: v for k, v in tags.items() if v}, start_timeout=10.0).finish("FAILED")


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


# -- where the sweep runs: here, or in one Slurm allocation ---------------------------------

def run_locally(args: argparse.Namespace, sweep_dir: Path) -> int:
    """The sweep on this machine: its own Ray head (127.0.0.1, free ports) and the driver."""
    auth_token(sweep_dir, create=True)
    temp = Path(tempfile.gettempdir()) / f"gunn-ray-{os.getpid()}"  # short: Ray's socket paths have a limit
    with ray_head(temp, ip="127.0.0.1", port=0, cpus=args.ray_cpus or os.cpu_count() or 1,
                  verbose=args.verbose) as (address, keep):
        status, failed = drive(args, sweep_dir, address)
        if failed:
            keep.append("keep")
            launch.say(f"Ray's logs: {temp}")
    return status


def _stop_on_signals() -> None:
    """SIGTERM interrupts the sweep as Ctrl-C does (Tune's own SIGINT handler ends it cleanly)."""
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))


class SweepJob:
    """The whole sweep inside one Slurm allocation: one task per node, a Ray node each.

    Task 0 starts the Ray head, waits for the other nodes and drives the sweep; the other
    tasks start Ray workers that join it. On SIGUSR2 (time limit, preemption) task 0 requeues
    the job and interrupts the sweep, and the requeued job resumes it from its directory;
    SIGTERM interrupts it. Both hold from the task's first instant (see gunn.cluster.slurm.job_python).
    """

    takes_blocked_signals = True

    def __init__(self, args: argparse.Namespace, sweep_dir: Path, max_requeues: int) -> None:
        self.args, self.sweep_dir, self.max_requeues = args, sweep_dir, max_requeues

    def __call__(self) -> dict[str, Any]:
        import submitit

        env = submitit.JobEnvironment()
        if env.global_rank == 0:
            def requeue(*_: Any) -> None:
                slurm.requeue_job(env.job_id, self.max_requeues, self.sweep_dir)
                signal.raise_signal(signal.SIGINT)

            signal.signal(signal.SIGUSR2, requeue)
            _stop_on_signals()
        else:
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # task 0 requeues the job
        signal.pthread_sigmask(signal.SIG_UNBLOCK, slurm.JOB_SIGNALS)
        auth_token(self.sweep_dir, create=env.global_rank == 0)
        head = socket.gethostbyname(env.hostnames[0])
        port = job_port(env.job_id)
        cpus = float(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        # A Ray folder per node of this job: nodes that share /tmp (several on one host, as in
        # slurm/dev-cluster) would otherwise share sockets.
        temp = Path(tempfile.gettempdir()) / f"ray-{env.job_id}-{env.node}"
        done = self.sweep_dir / f"ray-done-{env.job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        if env.global_rank != 0:
            ray_worker([*RAY, "start", "--address", f"{head}:{port}", "--block", "--num-cpus", str(int(cpus)),
                         "--disable-usage-stats", "--temp-dir", str(temp)], done)
            if done.is_file() and done.read_text() != "1":
                shutil.rmtree(temp, ignore_errors=True)  # Ray's logs are kept when a trial failed
            return {"status": "worker", "summary": "Ray worker stopped"}
        done.unlink(missing_ok=True)
        status, failed = 1, True
        try:
            with ray_head(temp, ip=head, port=port, cpus=cpus, verbose=self.args.verbose) as (address, keep):
                wait_for_nodes(address, env.num_nodes)
                self.args.resume = True  # a requeued job continues the sweep it started
                status, failed = drive(self.args, self.sweep_dir, address)
                if failed:
                    keep.append("keep")
        finally:
            done.write_text("1" if failed else "0")  # tells the workers to stop their Ray nodes; 1: keep their logs
        ending = {0: "finished", 1: "had failed trials" if failed else "left MLflow records unsent",
                  3: "was interrupted"}.get(status, "failed")
        report = self.sweep_dir / "report"
        where = f", report in {report}" if (report / "report.csv").is_file() else ", no report written"
        return {"status": "finished" if status == 0 else "failed", "summary": f"sweep {self.sweep_dir.name} {ending}{where}"}

    def checkpoint(self) -> Any:
        """submitit's own requeue path: rerun as is (the sweep resumes from its directory)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


# -- command line ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = launch.hoist_overrides(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(prog=program("sweep"),
                                     description=__doc__.split("\n\n")[0].replace("python pipelines/sweep.py",
                                                                                   program("sweep")),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("targets", nargs="*", metavar="PRESET|CONFIG|FIELD=VALUE",
                        help="the base configuration (default: digits) and section.field=value overrides")
    parser.add_argument("--study", choices=STUDIES, help="what to compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every configuration (default 0)")
    parser.add_argument("--widths", type=int, nargs="+", help="partitions: segment widths to compare")
    parser.add_argument("--space", help="custom: YAML file mapping fields to lists of values")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="peers: the models to compare; paper-cifar, paper-imagenet: which of the paper's rows")
    parser.add_argument("--dir", type=Path, help="sweep directory (default: sweeps/<study>-<preset>-<time>)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="finish the interrupted sweep in DIR")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs of each trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs of each trial, fractions allowed")
    parser.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as resources allow)")
    parser.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial (default 1)")
    parser.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA on eval_top1_error)")
    parser.add_argument("--asha-grace", type=int, default=1, help="ASHA: epochs every trial gets (default 1)")
    parser.add_argument("--ray-cpus", type=int, default=0, help="local Ray: CPUs it may use (default: all)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the trials' output")
    add_cluster_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # a preset anywhere on the line
    if args.resume:
        saved = args.resume / SETTINGS
        if not saved.is_file():
            parser.error(f"--resume {args.resume}: no sweep there ({saved} is missing)")
        resumed = argparse.Namespace(**yaml.safe_load(saved.read_text()))
        differ, given = _changed_settings(parser, argv, resumed)
        if differ:
            parser.error(f"--resume {args.resume} continues the sweep as it was started ({saved}); "
                         f"these arguments differ: {'; '.join(differ)} (start a new sweep to change them)")
        resumed.resume, resumed.dir = args.resume, args.resume
        for key in MAY_CHANGE:
            if key in given:
                if given[key] < 0:
                    parser.error(f"--{key.replace('_', '-')} must be at least 0, got {given[key]}")
                setattr(resumed, key, given[key])
        # Where and how to run now comes from this command line, not from the first one.
        for key in WHERE_TO_RUN:
            if hasattr(args, key):
                setattr(resumed, key, getattr(args, key))
        return resumed
    if args.study is None:
        parser.error("--study is required (or --resume DIR)")
    configs = [t for t in args.targets if "=" not in t]
    if len(configs) > 1:
        parser.error(f"one base configuration per sweep, got {configs}")
    args.preset = configs[0] if configs else None
    args.overrides = [t for t in args.targets if "=" in t]
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        parser.error("--cpus-per-trial must be positive and --gpus-per-trial not negative")
    for option, value, least in (("--asha-grace", args.asha_grace, 1), ("--ray-cpus", args.ray_cpus, 0),
                                 ("--max-concurrent", args.max_concurrent, 0), ("--max-failures", args.max_failures, 0)):
        if value < least:
            parser.error(f"{option} must be at least {least}, got {value}")
    for option, value, study in (("--widths", args.widths, ("partitions",)), ("--space", args.space, ("custom",)),
                                 ("--models", args.models, tuple(MODEL_STUDIES))):
        if value and args.study not in study:
            parser.error(f"{option} is for --study {' or '.join(study)}; --study {args.study} does not use it")
    if args.cluster != "slurm":  # a trial that can never get its CPUs would wait for them for ever
        cpus = args.ray_cpus or os.cpu_count() or 1
        if args.cpus_per_trial > cpus:
            parser.error(f"--cpus-per-trial {args.cpus_per_trial:g} exceeds the {cpus} CPUs that Ray may use here "
                         f"({'--ray-cpus' if args.ray_cpus else 'this machine'}): no trial could start")
    return args


def _in_use(sweep_dir: Path) -> str:
    return (f"--dir {sweep_dir} holds another sweep already: continue that one with --resume {sweep_dir}, "
            "or choose a new --dir")


def _check_new(sweep_dir: Path) -> None:
    """ConfigError if ``sweep_dir`` exists and is not empty: a second sweep would mix its trials into it."""
    if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        raise ConfigError(_in_use(sweep_dir))


def _claim(sweep_dir: Path, unique: bool) -> Path:
    """Makes ``sweep_dir`` this sweep's by creating its settings file exclusively: one sweep per directory, even
    for two started in the same instant. With ``unique`` (a default name, by the second) a taken one is
    passed over for a free name beside it (``-2``, ``-3``, ...); otherwise ConfigError."""
    for k in range(1, 1000):
        path = sweep_dir if k == 1 else sweep_dir.with_name(f"{sweep_dir.name}-{k}")
        try:
            _check_new(path)
            path.mkdir(parents=True, exist_ok=True)
            with open(path / SETTINGS, "x"):
                return path
        except (ConfigError, FileExistsError):
            if not unique:
                raise ConfigError(_in_use(path)) from None
        except OSError as err:
            raise ConfigError(f"--dir {path} cannot be made: {err.strerror or err}") from None
    raise ConfigError(f"no free sweep directory beside {sweep_dir}")


def _changed_settings(parser: argparse.ArgumentParser, argv: list[str],
                      saved: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The arguments given with --resume that differ from the sweep's saved ones, as 'NAME: saved X, given Y';
    and the arguments on this command line, by name.

    Only arguments on this command line count (a default does not undo a saved value); where to
    run (WHERE_TO_RUN) and MAY_CHANGE may change."""
    defaults = {a.dest: a.default for a in parser._actions}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    try:
        given = vars(parser.parse_intermixed_args(argv))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]
    targets = given.pop("targets", None) or []
    configs = [t for t in targets if "=" not in t]
    if configs:
        given["preset"] = configs[0] if len(configs) == 1 else configs
    if any("=" in t for t in targets):
        given["overrides"] = [t for t in targets if "=" in t]
    differ = []
    for key, value in given.items():
        if key in ("resume", *WHERE_TO_RUN, *MAY_CHANGE) or not hasattr(saved, key):
            continue
        old = getattr(saved, key)
        if key == "dir":
            same = Path(value).resolve() == Path(old).resolve()
        elif key == "space":
            same = value == old or old is not None and Path(value).resolve() == Path(old).resolve()
        else:
            old = (old or "digits") if key == "preset" else old
            same = value == old
        if not same:
            name = key if key in ("preset", "overrides") else f"--{key.replace('_', '-')}"
            differ.append(f"{name}: saved {old}, given {value}")
    return differ, given


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plain_warnings()
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported: Ray reads its settings once, on first import
        print('error: the sweeps need Ray Tune: pip install -e ".[sweeps]"', file=sys.stderr)
        return 2
    try:
        base = cfgmod.load(args.preset, args.overrides)
        if not args.resume:
            name = f"{args.study}-{base.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            if args.asha and args.asha_grace > base.optim.epochs:
                raise ConfigError(f"--asha-grace {args.asha_grace} exceeds the {base.optim.epochs} epochs of every "
                                  "trial (optim.epochs): ASHA could never stop one")
            args.unique_dir = args.dir is None
            args.dir = (args.dir or Path("sweeps") / name).resolve()
            if not args.unique_dir:
                _check_new(args.dir)
            # Checked now, before Ray or Slurm: every trial's configuration and the data.
            trial_configs(args, args.dir, "unknown", "unknown", check_device=args.cluster != "slurm")
        options = cluster_options(args) if args.cluster == "slurm" else {}
        if options:
            slurm.check_partition(options)  # a request the partition can never run: refused now
    except (ConfigError, DataError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sweep_dir = Path(args.dir).resolve()
    if not args.resume:
        unique = args.__dict__.pop("unique_dir")
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("targets", "resume", "dir", *WHERE_TO_RUN)}
        if settings["space"]:  # --resume may run from another folder
            settings["space"] = str(Path(settings["space"]).resolve())
        try:
            sweep_dir = args.dir = _claim(sweep_dir, unique)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        (sweep_dir / SETTINGS).write_text(yaml.safe_dump({**settings, "dir": str(sweep_dir)}))
    if args.cluster != "slurm":
        _stop_on_signals()
        try:
            return run_locally(args, sweep_dir)
        except KeyboardInterrupt:  # before the trials started, or a second Ctrl-C while the sweep ended
            launch.say(f"sweep {sweep_dir.name} interrupted; to continue: "
                f"{shlex.join([*command('sweep', absolute=True), '--resume', str(sweep_dir)])}")
            return 3
    job = SweepJob(args, sweep_dir, options["max_requeues"])
    jobs = slurm.submit_reporting_refusal([job], options, args.logs, sweep_dir.name)
    if jobs is None:
        return 1
    return slurm.follow(jobs, [sweep_dir.name], [str(sweep_dir)], args.wait)


if __name__ == "__main__":
    sys.exit(main())
