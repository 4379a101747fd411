"""Slurm: submitting jobs through submitit, checking a request against its partition before
it is submitted, following jobs to their end, and requeueing a running job."""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gunn.cluster.options import LaunchError

# Signals a Slurm task handles: SIGUSR2 checkpoints and requeues, SIGTERM checkpoints and stops.
JOB_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def mlflow_line(run_id: str, uri: str) -> str:
    """Where a run logged, and how to see it: a server's own address, or ``mlflow ui`` on a local store."""
    if uri.startswith(("http://", "https://")):
        return f"MLflow run {run_id} at {uri}  (browse: open {uri.rstrip('/')}/#/runs/{run_id})"
    return f"MLflow run {run_id} at {uri}  (browse: mlflow ui --backend-store-uri {uri})"


# -- the partition ------------------------------------------------------------------------

def _minutes(text: str) -> float | None:
    """A Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in minutes; None if unlimited or unreadable."""
    days, _, rest = text.rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        if days:
            hours, minutes, seconds = (parts + [0, 0])[:3]
        else:
            hours, minutes, seconds = {1: [0, *parts, 0], 2: [0, *parts], 3: parts}[len(parts)]
        return (int(days or 0) * 24 + hours) * 60 + minutes + seconds / 60
    except (ValueError, KeyError):
        return None


def partition_limits(name: str | None) -> dict[str, Any] | None:
    """What partition ``name`` (the default one for None) has and allows; None if Slurm cannot say."""
    try:
        shown = subprocess.run(["scontrol", "show", "partition", "-o", *([name] if name else [])],
                               check=False, capture_output=True, text=True, timeout=30)
        rows = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in shown.stdout.splitlines()]
        rows = [r for r in rows if r.get("PartitionName") == name or name is None and r.get("Default") == "YES"]
        if shown.returncode != 0 or len(rows) != 1:
            return None
        row = rows[0]
        listed = subprocess.run(["sinfo", "-h", "-N", "-p", row["PartitionName"], "-o", "%N|%c|%G"],
                                check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    nodes = [line.split("|") for line in set(listed.stdout.split())] if listed.returncode == 0 else []
    nodes = [n for n in nodes if len(n) == 3 and n[1].isdigit()]

    def number(key: str) -> int | None:
        return int(row[key]) if row.get(key, "").isdigit() else None

    return {
        "name": row["PartitionName"], "nodes": number("TotalNodes"), "max_nodes": number("MaxNodes"),
        "max_cpus_per_node": number("MaxCPUsPerNode"), "max_time": _minutes(row.get("MaxTime", "")),
        "node_cpus": max((int(n[1]) for n in nodes), default=None),
        "node_gpus": max((sum(int(g) for g in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", n[2])) for n in nodes),
                         default=None),
    }


def check_partition(options: dict[str, Any]) -> None:
    """LaunchError for a job its partition can never run (it would pend forever); nothing if Slurm cannot say."""
    limits = partition_limits(options["partition"])
    if limits is None:
        return
    where = f"partition {limits['name']}"
    nodes, cpus, tasks = options["nodes"], options["cpus_per_task"], options["tasks_per_node"]
    if limits["nodes"] is not None and nodes > limits["nodes"]:
        raise LaunchError(f"--nodes {nodes} exceeds {where}'s {limits['nodes']} nodes")
    if limits["max_nodes"] is not None and nodes > limits["max_nodes"]:
        raise LaunchError(f"--nodes {nodes} exceeds {where}'s limit of {limits['max_nodes']} nodes a job (MaxNodes)")
    asked = f"--cpus-per-task {cpus}" + (f" x --tasks-per-node {tasks} = {cpus * tasks} CPUs a node" if tasks > 1 else "")
    if limits["node_cpus"] is not None and cpus * tasks > limits["node_cpus"]:
        raise LaunchError(f"{asked} exceeds the {limits['node_cpus']} CPUs of {where}'s largest node")
    if limits["max_cpus_per_node"] is not None and cpus * tasks > limits["max_cpus_per_node"]:
        raise LaunchError(f"{asked} exceeds {where}'s limit of {limits['max_cpus_per_node']} CPUs a node "
                          "(MaxCPUsPerNode)")
    gpus, most = options["gpus_per_node"], limits["node_gpus"]
    if gpus and most is not None and gpus > most:
        raise LaunchError(f"--gpus-per-node {gpus} exceeds the {most} GPUs of {where}'s largest node" if most else
                          f"--gpus-per-node {gpus}, but {where}'s nodes have no GPUs (no gpu GRES)")
    if limits["max_time"] is not None and options["time_min"] > limits["max_time"]:
        raise LaunchError(f"--time-min {options['time_min']} exceeds {where}'s time limit of "
                          f"{math.floor(limits['max_time'])} minutes (MaxTime)")


# -- requeueing a running job -------------------------------------------------------------

def requeues_done() -> int:
    """How often this Slurm job was requeued so far."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def requeue_job(job_id: str, max_requeues: int, resumes_from: object, command: str | None = None) -> str | None:
    """``scontrol requeue`` of this job, unless it was requeued ``max_requeues`` times already.

    Returns None once requeued, else why not (also printed, with ``command``: what continues the run).
    """
    restarts = requeues_done()
    then = f"; to continue the run: {command}" if command else ""
    if restarts >= max_requeues:
        problem = f"stopped at its requeue limit ({restarts} requeues, max_requeues {max_requeues})"
        print(f"not requeued: the job {problem}{then}", flush=True)
        return problem
    print(f"requeueing job {job_id} (restart {restarts + 1}); it continues from {resumes_from}", flush=True)
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)
        return None
    except subprocess.CalledProcessError as err:
        said = (err.stderr or err.stdout or "").strip() or f"exit status {err.returncode}"
    except (OSError, subprocess.TimeoutExpired) as err:
        said = str(err)
    problem = f"scontrol requeue {job_id} failed: {said}"
    print(f"error: {problem}{then}", file=sys.stderr, flush=True)
    return problem


class RequeueingJob:
    """What a Slurm job runs when it requeues itself on SIGUSR2, at most ``max_requeues`` times: the base of
    the training job (gunn.cluster.launch.TrainingJob) and the sweep's (gunn.sweeps.slurm_job.SweepJob).

    Its tasks start with JOB_SIGNALS blocked (``takes_blocked_signals``, see ``job_python``) and take them once
    the subclass has set its handlers, so the signals hold from the task's first instant. ``requeue`` asks
    Slurm to requeue the job; ``checkpoint`` is submitit's own requeue path (a signal that came before the
    handlers were set): the requeued job reruns this callable as it is, and continues from what is on disk.
    """

    takes_blocked_signals = True  # see job_python

    def __init__(self, max_requeues: int) -> None:
        self.max_requeues = max_requeues

    def requeue(self, job_id: str, resumes_from: object, command: str | None = None) -> tuple[str, str | None]:
        """``scontrol requeue`` of this job within its limit (``requeue_job``, which prints what happens): the
        status ``requeued``, ``requeue limit`` or ``requeue failed``, and why it was not requeued (None once it is)."""
        problem = requeue_job(job_id, self.max_requeues, resumes_from, command)
        if problem is None:
            return "requeued", None
        return ("requeue limit" if requeues_done() >= self.max_requeues else "requeue failed"), problem

    def checkpoint(self) -> Any:
        """submitit's own requeue path: rerun as is (the job continues from its files)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


# -- submitting and following jobs --------------------------------------------------------

def job_python() -> str:
    """The command that starts a task's Python with JOB_SIGNALS blocked, for tasks that unblock them.

    Starting Python and importing submitit, the job and torch takes seconds; a SIGUSR2 then would kill
    the task (its default action) or go to submitit's handler. Blocked, it waits for the task's own
    handler (the mask survives exec); only this first interpreter's few milliseconds remain exposed.
    """
    blocked = ", ".join(f"signal.{s.name}" for s in JOB_SIGNALS)
    code = (f"import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, ({blocked},)); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    return f"{shlex.quote(sys.executable)} -S -c {shlex.quote(code)}"


def submit(tasks: list[Any], options: dict[str, Any], logs: Path, name: str) -> list[Any]:
    """Submits one Slurm job per callable in ``tasks`` (a job array when several); submitit's jobs."""
    import submitit

    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: --cluster slurm needs a Slurm login node "
                          "(or a development cluster: slurm/dev-cluster up)")
    python = job_python() if all(getattr(t, "takes_blocked_signals", False) for t in tasks) else None
    executor = submitit.AutoExecutor(folder=str(logs / "%j"), cluster="slurm", slurm_python=python)
    params: dict[str, Any] = {
        "nodes": options["nodes"], "tasks_per_node": options["tasks_per_node"],
        "cpus_per_task": options["cpus_per_task"], "timeout_min": options["time_min"],
        "slurm_signal_delay_s": options["signal_delay_s"], "slurm_additional_parameters": dict(options["sbatch"]),
        "slurm_setup": list(options["setup"]), "name": name,
    }
    if options["gpus_per_node"]:
        params["gpus_per_node"] = options["gpus_per_node"]
    if options["mem_gb"]:
        params["mem_gb"] = options["mem_gb"]
    for key in ("partition", "account", "qos", "constraint"):
        if options[key]:
            params[f"slurm_{key}"] = options[key]
    executor.update_parameters(**params)
    if len(tasks) == 1:
        return [executor.submit(tasks[0])]
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    return jobs


def submit_reporting_refusal(tasks: list[Any], options: dict[str, Any], logs: Path, name: str) -> list[Any] | None:
    """``submit``, or None after printing sbatch's own words if it refused the job (and removing what
    submitit wrote for it: its pickles, its sbatch script, the folders it made)."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    made = [p for p in [logs, *logs.parents] if not p.exists()]  # deepest first
    before = set(logs.iterdir()) if logs.is_dir() else set()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # submitit prints sbatch's complaint itself
            return submit(tasks, options, logs, name)
    except (FailedJobError, FailedSubmissionError) as err:
        # sbatch refused the job (unknown partition, too many resources...): show sbatch's words.
        print(f"error: sbatch refused the job:\n{str(err).strip() or captured.getvalue().strip()}", file=sys.stderr)
        for path in set(logs.iterdir()) - before if logs.is_dir() else ():
            if path.is_file() and (path.name.startswith(".submission_file_") or path.suffix == ".pkl"):
                path.unlink(missing_ok=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        return None


def describe(jobs: list[Any], names: list[str], directories: list[str], stores: list[str | None] | None = None) -> None:
    """Prints job ids, logs, MLflow stores and the commands to follow and cancel them."""
    for job, name, directory, store in zip(jobs, names, directories, stores or [None] * len(jobs)):
        print(f"submitted job {job.job_id}: {name}")
        print(f"  run directory  {directory}")
        print(f"  log            {job.paths.stdout}")
        print(f"  errors         {job.paths.stderr}")
        if store:
            print(f"  MLflow store   {store}  (browse: mlflow ui --backend-store-uri {store})")
    ids = ",".join(sorted({str(j.job_id).split("_")[0] for j in jobs}))
    print(f"follow:  squeue -j {ids}   |   tail -f {jobs[0].paths.stdout}")
    print(f"cancel:  scancel {ids}")


# Why a pending job will never start as it is: only a changed job, partition or account lets it run.
NEVER_STARTS = {
    "BadConstraints": "no node of its partition has the features or resources it asks for",
    "PartitionNodeLimit": "it asks for more nodes than its partition has or allows a job (or they are down)",
    "PartitionConfig": "it asks for more than its partition's nodes have (CPUs, memory or GPUs a node)",
    "PartitionTimeLimit": "its time limit exceeds its partition's",
    "InvalidAccount": "its account is not valid",
    "InvalidQOS": "its QOS is not valid",
    "AccountNotAllowed": "its account may not use its partition",
    "DependencyNeverSatisfied": "it depends on a job that ended in a way that can never satisfy the dependency",
}


def never_starts(reason: str) -> str | None:
    """Why a job pending for ``reason`` (squeue's %r) can never start, or None if the reason may clear."""
    if reason in NEVER_STARTS:
        return NEVER_STARTS[reason]
    if re.fullmatch(r"(QOS|Assoc)Max\w*PerJob\w*", reason):  # a per-job limit, not a count of running jobs
        return "it asks for more than a per-job limit of its QOS or account allows"
    return None


def wait(jobs: list[Any], poll_s: float = 2.0) -> int:
    """Follows the jobs until they end (requeues included); 0 if every run finished.

    A job pending for a reason that never clears by itself is reported, and no longer followed.
    """
    states: dict[str, str] = {}
    pending = list(jobs)
    failed = 0
    while pending:
        for job in list(pending):
            state, reason = _queue_state(job.job_id)
            if state and states.get(job.job_id) != state:
                shown = state == "PENDING" and reason not in ("", "None")  # Slurm writes "None" for no reason
                print(f"job {job.job_id}: {state}" + (f" ({reason})" if shown else ""), flush=True)
                states[job.job_id] = state
            why = never_starts(reason) if state == "PENDING" else None
            if why is not None:
                print(f"job {job.job_id} will never start: it is pending for {reason}: {why}. Cancel it with "
                      f"scancel {job.job_id} and submit it again with what it asks for changed", flush=True)
                failed += 1
                pending.remove(job)
            elif state is None:  # gone from the queue: finished, failed, or cancelled
                if not job.paths.result_pickle.exists():
                    time.sleep(poll_s)  # the result may still be being written
                failed += not _report(job)
                pending.remove(job)
        if pending:
            time.sleep(poll_s)
    return 0 if failed == 0 else 1


def _queue_state(job_id: str) -> tuple[str | None, str]:
    """The job's state and reason in the queue; None once it has ended."""
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r"], check=False, capture_output=True,
                         text=True)
    lines = [line.strip().split("|", 1) for line in out.stdout.splitlines() if "|" in line]
    if not lines or lines[0][0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        return None, ""
    return lines[0][0], lines[0][1]


SUBMITTED_NAME = ".slurm-job"  # in a run directory: the Slurm job submitted to train it


def check_not_submitted(directory: Path) -> None:
    """LaunchError if a Slurm job submitted for run directory ``directory`` is still in the queue (pending
    or running): a pending job holds its directory as a running one does with its lock."""
    try:
        job, when = (directory / SUBMITTED_NAME).read_text().split()[:2]
    except (OSError, ValueError):
        return
    state, reason = _queue_state(job)
    if state is not None:
        raise LaunchError(f"checkpoint.dir {directory} is claimed by Slurm job {job} ({state}"
                          + (f", {reason}" if reason and reason != "None" else "") + f"), submitted {when}: wait for "
                          f"it to end, scancel {job}, or choose another checkpoint.dir")


def record_submitted(directories: list[str], jobs: list[Any]) -> None:
    """Notes in each run directory the job submitted to train it (``check_not_submitted`` reads it)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for directory, job in zip(directories, jobs):
        with contextlib.suppress(OSError):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / SUBMITTED_NAME).write_text(f"{job.job_id} {stamp}\n")


def _report(job: Any) -> bool:
    if not job.paths.result_pickle.exists():
        print(f"job {job.job_id} ended without a result (cancelled or killed); see {job.paths.stderr}")
        return False
    try:
        result = job.results()[0]  # one result per task; rank 0's describes the run
    except Exception as err:  # noqa: BLE001  (submitit re-raises the job's exception with its traceback)
        print(f"job {job.job_id} failed:\n{err}\nlog: {job.paths.stderr}")
        return False
    print(f"job {job.job_id}: {result['summary']}")
    if result.get("mlflow_run_id"):
        print(f"job {job.job_id}: {mlflow_line(result['mlflow_run_id'], result['tracking_uri'])}")
    return result["status"] == "finished"


def follow(jobs: list[Any], names: list[str], directories: list[str], wait_for_end: bool,
           stores: list[str | None] | None = None) -> int:
    """Describes the submitted jobs and, with ``wait_for_end``, follows them to the end.

    Ctrl-C from here on stops following and leaves the jobs running.
    """
    try:
        describe(jobs, names, directories, stores)
        sys.stdout.flush()  # the job id, at once, also when the output goes to a pipe or file
        return wait(jobs) if wait_for_end else 0
    except KeyboardInterrupt:
        ids = ",".join(sorted({str(j.job_id).split("_")[0] for j in jobs}))
        print(f"\nstopped following; the job keeps running (cancel: scancel {ids})", file=sys.stderr)
        return 130
