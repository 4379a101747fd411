#!/usr/bin/env python
"""Launch a training run: python jobs/launch.py [PRESET | CONFIG.yaml ...] [section.field=value ...]

With no arguments it trains the digits demo in this process and logs to a local MLflow store.
``--nproc N`` runs N data-parallel processes on this machine (gloo on the CPU, NCCL on GPUs).
``--cluster slurm`` submits the run to Slurm through submitit: each task is one DDP rank, and
the job checkpoints and requeues itself on SIGUSR2 (sent before the time limit, or on
preemption). Several presets or ``--seeds`` make a job array. Everything is checked before
anything is submitted or started; a bad value is reported with its field.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gunn import config as cfgmod
from gunn.config import ConfigError, RunConfig
from gunn.data import DataError

if TYPE_CHECKING:
    from gunn.train.engine import RunResult

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "slurm" / "profiles"
# Cluster options: profile key -> (type, default). The command line overrides the profile.
CLUSTER_OPTIONS: dict[str, tuple[type, Any]] = {
    "partition": (str, None),
    "account": (str, None),
    "qos": (str, None),
    "constraint": (str, None),
    "nodes": (int, 1),
    "tasks_per_node": (int, 1),
    "gpus_per_node": (int, 0),
    "cpus_per_task": (int, 1),
    "mem_gb": (int, None),
    "time_min": (int, 60),
    "signal_delay_s": (int, 120),
    "max_requeues": (int, 10),
    "sbatch": (dict, {}),
    "setup": (list, []),
}
# What each cluster option of the command line means, and its metavar.
CLUSTER_HELP: dict[str, tuple[str, str]] = {
    "partition": ("NAME", "Slurm partition (sbatch --partition; default: the cluster's default partition)"),
    "account": ("NAME", "account charged for the job (sbatch --account)"),
    "qos": ("NAME", "quality of service (sbatch --qos)"),
    "constraint": ("FEATURES", "node features the job needs, e.g. a100 (sbatch --constraint)"),
    "nodes": ("N", "nodes of the job (default 1); DDP runs nodes x tasks-per-node ranks"),
    "tasks_per_node": ("N", "tasks (DDP ranks) per node, one per GPU (default 1)"),
    "gpus_per_node": ("N", "GPUs per node (default 0); with GPUs the run trains on CUDA"),
    "cpus_per_task": ("N", "CPUs per task: data loader workers + the training process (default 1)"),
    "mem_gb": ("GB", "memory per node in GB (default: the partition's)"),
    "time_min": ("MINUTES", "time limit of each start of the job (default 60); it checkpoints and requeues "
                 "itself before it"),
    "signal_delay_s": ("SECONDS", "send SIGUSR2 (checkpoint and requeue) this long before the time limit "
                       "(default 120)"),
    "max_requeues": ("N", "give up after this many requeues, time limits and preemptions together (default 10)"),
}
# Signals that make a local run checkpoint at the next batch and stop (a second one aborts).
LOCAL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# Signals a Slurm task handles: SIGUSR2 checkpoints and requeues, SIGTERM checkpoints and stops.
JOB_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class LaunchError(Exception):
    """Bad input for the launcher itself (profile, cluster options); exit status 2."""


# -- command line --------------------------------------------------------------------------

def hoist_overrides(argv: list[str]) -> list[str]:
    """``field=value`` overrides first, so that ``--seeds 0 1 optim.lr=0.05`` parses as meant."""
    overrides, rest = [], []
    for i, token in enumerate(argv):
        is_override = "=" in token and not token.startswith("-") and (i == 0 or argv[i - 1] != "--sbatch")
        (overrides if is_override else rest).append(token)
    return overrides + rest


def build_parser() -> argparse.ArgumentParser:
    """The launcher's command line."""
    parser = argparse.ArgumentParser(
        prog="python jobs/launch.py", description=__doc__.split("\n\n")[0],
        epilog=f"presets: {', '.join(cfgmod.list_presets())}; profiles: {', '.join(list_profiles())}. "
        "Configuration fields: --fields.",
    )
    parser.add_argument("targets", nargs="*", metavar="PRESET|CONFIG|FIELD=VALUE",
                        help="presets or YAML files (default: digits), then section.field=value overrides")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="local data-parallel processes (default 1): gloo on the CPU, NCCL on GPUs")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="one run per seed (runtime.seed); a job array on Slurm")
    parser.add_argument("--fields", action="store_true",
                        help="list every configuration field with its schema default and meaning, and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the configuration(s) with the values the run will use (the model's own "
                        "where a model field is null) and exit; needs no data")
    add_cluster_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = hoist_overrides(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    args.configs = [t for t in args.targets if "=" not in t] or [None]
    args.overrides = [t for t in args.targets if "=" in t]
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    if args.cluster == "slurm" and args.nproc != 1:
        parser.error("--nproc is for local runs; on Slurm use --nodes and --tasks-per-node")
    return args


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say where and how a job runs (shared with pipelines/sweep.py)."""
    slurm = parser.add_argument_group(
        "Slurm (--cluster slurm)",
        "Where and how the job runs. Each option overrides the --profile's value; the defaults hold where neither "
        "sets it.")
    slurm.add_argument("--cluster", choices=["local", "slurm"], default="local",
                       help="local: run on this machine (default); slurm: submit a Slurm job through submitit")
    slurm.add_argument("--profile", metavar="NAME|FILE",
                       help=f"cluster profile: a name in slurm/profiles/ ({', '.join(list_profiles()) or 'none'}) or "
                       "a YAML file of the options below")
    for key, (kind, _) in CLUSTER_OPTIONS.items():
        if kind in (int, str):
            metavar, text = CLUSTER_HELP[key]
            slurm.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, default=None, metavar=metavar,
                               help=text)
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, repeatable, e.g. --sbatch exclusive=true --sbatch mail-type=END")
    slurm.add_argument("--logs", type=Path, default=Path("runs/slurm"), metavar="DIR",
                       help="folder of submitit's job files and the Slurm logs (default: runs/slurm)")
    slurm.add_argument("--wait", action="store_true",
                       help="follow the job(s) to the end and exit with their status (default: return once submitted)")


def resolve(args: argparse.Namespace, world_size: int, gpus_per_node: int = 0) -> list[RunConfig]:
    """The checked configuration of every run, each with its run directory fixed.

    With ``--print-config`` data that is missing is no error (a note on stderr says so): printing
    a configuration does not need the data, only training does.

    A Slurm job that asks for GPUs trains on them (runtime.device ``auto`` becomes ``cuda``), so that a
    job whose GPUs CUDA cannot use stops with the reason instead of training on the CPU. Whether
    the device is usable is checked here only for local runs: a login node may have no GPU.
    """
    from gunn.train.engine import default_run_dir, validate
    from gunn.train.rundir import check_usable

    seeds: list[int | None] = list(args.seeds) if args.seeds else [None]
    configs = []
    for source, seed in itertools.product(args.configs, seeds):
        overrides = list(args.overrides) + ([f"runtime.seed={seed}"] if seed is not None else [])
        config = cfgmod.load(source, overrides)
        if seed is not None and len(seeds) > 1:
            config.name = f"{config.name}-seed{seed}"
        if gpus_per_node > 0 and config.runtime.device == "auto":
            config.runtime.device = "cuda"
        try:
            validate(config, world_size=world_size, check_device=args.cluster != "slurm")
        except DataError as err:  # the data is checked last: everything else was checked
            if not args.print_config:  # printing a configuration does not need its data; training does
                raise
            print(f"note: {config.name} cannot train here yet: {err}", file=sys.stderr)
        configs.append(config)
    if len(configs) > 1 and any(c.checkpoint.dir for c in configs):
        raise ConfigError("checkpoint.dir names one directory, but this call starts several runs; leave it unset")
    for config in configs:
        config.checkpoint.dir = config.checkpoint.dir or str(default_run_dir(config).resolve())
        if not args.print_config:  # writable, and not trained by another process: before anything starts
            check_usable(Path(config.checkpoint.dir))
    return configs


# -- local runs ----------------------------------------------------------------------------

def say(line: str) -> None:
    """A line on stderr from a signal handler: written directly, since a handler may interrupt a
    ``print`` to stderr (a progress bar's), and a second buffered write there would fail."""
    os.write(sys.stderr.fileno(), f"{line}\n".encode())


class StopSignals:
    """Signals that make the run this process trains checkpoint at the next batch and return.

    Each signal is recorded and passed to the engine's ``request_stop``, also one that arrives
    before the engine is imported (``train`` passes it on): the handlers are meant to be set
    before anything slow. The signals are unblocked once the handlers are set, so one that came
    while the process started with them blocked (local ranks, Slurm tasks) is handled then.
    ``message``: say so on stderr. ``abort``: a second signal kills the process (default action).
    """

    def __init__(self, signals: tuple[signal.Signals, ...], message: bool = False, abort: bool = False) -> None:
        self.signals, self.message, self.abort = signals, message, abort
        self.received: list[int] = []
        for signum in signals:
            signal.signal(signum, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)
        if self.message:
            say(f"\nsignal {signal.Signals(signum).name}: checkpointing at the next batch"
                + (" (again to abort)" if self.abort else ""))
        if self.abort:
            for other in self.signals:
                signal.signal(other, signal.SIG_DFL)
        request = getattr(sys.modules.get("gunn.train.engine"), "request_stop", None)
        if request is not None:
            request()

    def train(self, config: RunConfig) -> RunResult:
        """The engine's ``train(config)``, asked to stop at once if a signal came already."""
        from gunn.train.engine import request_stop, train

        if self.received:  # before the engine was imported
            request_stop()
        return train(config)


def outcome(result: RunResult) -> dict[str, Any]:
    """How a run ended, as plain values (what rank 0 hands to the launcher)."""
    return {"status": result.status, "epochs_done": result.epochs_done, "run_dir": str(result.run_dir),
            "mlflow_run_id": result.mlflow_run_id, "tracking_uri": result.tracking_uri}


def mlflow_line(run_id: str, uri: str) -> str:
    return f"MLflow run {run_id} at {uri}  (browse: mlflow ui --backend-store-uri {uri})"


def report_local(config: RunConfig, ended: dict[str, Any], nproc: int) -> int:
    """Prints how a local run ended; its exit status: 0 finished, 3 interrupted (checkpointed)."""
    ranks = f" ({nproc} processes)" if nproc > 1 else ""
    print(f"{ended['status']}: {ended['epochs_done']}/{config.optim.epochs} epochs in {ended['run_dir']}{ranks}")
    if ended["mlflow_run_id"]:
        print(mlflow_line(ended["mlflow_run_id"], ended["tracking_uri"]))
    elif config.logging.mlflow:
        from gunn.train.tracking import JOURNAL_NAME, sync_command

        print(f"MLflow: {ended['tracking_uri']} never created the run; its records wait in "
              f"{Path(ended['run_dir']) / JOURNAL_NAME}: send them with {sync_command(Path(ended['run_dir']))}")
    return 0 if ended["status"] == "finished" else 3


def run_local(config: RunConfig, nproc: int) -> int:
    """Trains in this process, or in ``nproc`` local processes; returns an exit status.

    SIGINT (Ctrl-C), SIGTERM and SIGUSR1 checkpoint at the next batch and exit with status 3; a
    second signal aborts.
    """
    if nproc > 1:
        return run_ranks(config, nproc)
    from gunn.train.engine import RUN_ERRORS
    from gunn.train.rundir import RunDirError

    previous = {signum: signal.getsignal(signum) for signum in LOCAL_SIGNALS}
    try:
        result = StopSignals(LOCAL_SIGNALS, message=True, abort=True).train(config)
    except RUN_ERRORS as err:  # a run that cannot go on, said in one line (its checkpoint is intact)
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, RunDirError) else 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return report_local(config, outcome(result), 1)


def run_ranks(config: RunConfig, nproc: int) -> int:
    """``nproc`` local DDP ranks (torch.multiprocessing); returns an exit status.

    The launcher passes SIGINT, SIGTERM and SIGUSR1 on to every rank, and each rank handles them
    too (Ctrl-C in a terminal reaches the whole process group): the run checkpoints at the next
    batch and rank 0 writes how it ended to a file the launcher reads. A second signal kills the ranks.
    """
    from multiprocessing import resource_tracker

    import torch.multiprocessing as mp

    resource_tracker.ensure_running()  # started later, it would unblock SIGINT and SIGTERM here
    previous = {signum: signal.getsignal(signum) for signum in LOCAL_SIGNALS}
    received: list[int] = []
    with tempfile.TemporaryDirectory(prefix="gunn-ranks-") as tmp:
        ended = Path(tmp) / "outcome.json"
        # The ranks inherit the blocked signals: one sent while they start waits for their handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, LOCAL_SIGNALS)
        try:
            context = mp.start_processes(_rank_main, args=(nproc, _free_port(), cfgmod.to_dict(config), str(ended)),
                                         nprocs=nproc, start_method="spawn", join=False)

            def forward(signum: int, _frame: Any) -> None:
                received.append(signum)
                name = signal.Signals(signum).name
                if len(received) == 1:
                    say(f"\nsignal {name}: checkpointing at the next batch (again to abort)")
                for process in context.processes:
                    if process.is_alive():
                        os.kill(process.pid, signum if len(received) == 1 else signal.SIGKILL)

            for signum in LOCAL_SIGNALS:
                signal.signal(signum, forward)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, LOCAL_SIGNALS)
            while not context.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:  # raised, killed or exited early
            if len(received) > 1:
                print(f"error: aborted by a second {signal.Signals(received[-1]).name}: the ranks were killed without "
                      f"a checkpoint. Run the same command again to continue {config.checkpoint.dir} from its last "
                      "checkpoint.", file=sys.stderr)
                return 128 + received[-1]
            print(f"error: rank {err.error_index} of {nproc} failed: {str(err).strip()}\nThe other ranks were "
                  f"stopped. Run the same command again to continue {config.checkpoint.dir} from its last "
                  "checkpoint.", file=sys.stderr)
            return 1
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, LOCAL_SIGNALS)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if not ended.exists():
            print(f"error: rank 0 of {nproc} ended without saying how the run ended; see its output above",
                  file=sys.stderr)
            return 1
        return report_local(config, json.loads(ended.read_text()), nproc)


def _rank_main(rank: int, world_size: int, port: int, config: dict[str, Any], ended: str) -> None:
    # No message, no abort: the launcher says what happens and kills the ranks on a second signal.
    stop = StopSignals(LOCAL_SIGNALS)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = stop.train(cfgmod.from_dict(config))
    if rank == 0:
        Path(ended).write_text(json.dumps(outcome(result)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- Slurm ---------------------------------------------------------------------------------

def list_profiles() -> list[str]:
    """Names of the cluster profiles in slurm/profiles/."""
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def load_profile(name: str | None) -> dict[str, Any]:
    """A checked cluster profile (a name in slurm/profiles/ or a YAML file); {} for None."""
    if name is None:
        return {}
    path = PROFILES / f"{name}.yaml" if name in list_profiles() else Path(name)
    if not path.is_file():
        raise LaunchError(f"no cluster profile {name!r}; profiles: {', '.join(list_profiles())} (or a YAML file)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise LaunchError(f"cluster profile {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise LaunchError(f"cluster profile {path} must be a mapping of options")
    for key, value in data.items():
        if key not in CLUSTER_OPTIONS:
            raise LaunchError(f"{path}: unknown option {key!r}; options: {', '.join(CLUSTER_OPTIONS)}")
        kind = CLUSTER_OPTIONS[key][0]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise LaunchError(f"{path}: {key} must be a {kind.__name__}, got {value!r}")
    return data


def cluster_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the profile, then the command line."""
    options = {key: default for key, (_, default) in CLUSTER_OPTIONS.items()}
    options.update(load_profile(args.profile))
    options.update({key: getattr(args, key) for key, (kind, _) in CLUSTER_OPTIONS.items()
                    if kind in (int, str) and getattr(args, key, None) is not None})
    sbatch = dict(options["sbatch"])  # the profile's, then --sbatch
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--sbatch takes KEY=VALUE, got {item!r}")
        sbatch[key] = True if value.lower() == "true" else value
    options["sbatch"] = sbatch
    for key, least in [("nodes", 1), ("tasks_per_node", 1), ("cpus_per_task", 1), ("time_min", 1),
                       ("signal_delay_s", 1), ("gpus_per_node", 0), ("max_requeues", 0)]:
        if options[key] < least:
            raise LaunchError(f"--{key.replace('_', '-')} must be at least {least}, got {options[key]}")
    delay, limit = options["signal_delay_s"], options["time_min"]
    if delay >= limit * 60:
        raise LaunchError(f"--signal-delay-s {delay} is not shorter than the time limit, --time-min {limit} "
                          f"({limit * 60} s): every start of the job would be told at once to checkpoint and "
                          "requeue. Give a smaller --signal-delay-s or a longer --time-min")
    return options


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


def continue_command(args: argparse.Namespace, source: str | None, seed: int | None, config: RunConfig) -> str:
    """The launch command that submits one run of this call again, to continue it in its run directory."""
    launcher = Path(__file__).resolve()
    here = Path.cwd()
    words = ["python", str(launcher.relative_to(here) if launcher.is_relative_to(here) else launcher)]
    words += [source] if source else []
    words += [o for o in args.overrides if not o.startswith("checkpoint.dir=")]
    words += [f"runtime.seed={seed}", f"name={config.name}"] if seed is not None else []
    words += [f"checkpoint.dir={config.checkpoint.dir}", "--cluster", "slurm"]
    words += ["--profile", args.profile] if args.profile else []
    for key, (kind, _) in CLUSTER_OPTIONS.items():
        if kind in (int, str) and getattr(args, key, None) is not None:
            words += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    words += [w for item in args.sbatch for w in ("--sbatch", item)]
    words += ["--logs", str(args.logs)] if args.logs != Path("runs/slurm") else []
    return shlex.join(words)


class TrainingJob:
    """What every Slurm task runs: one DDP rank of a training run, requeued on SIGUSR2.

    SIGUSR2 (the time limit is near, or a site's preemption notice) makes every rank
    checkpoint at the next batch, then rank 0 requeues the job with ``scontrol requeue``;
    the requeued job continues from that checkpoint in the same run directory and MLflow run.
    SIGTERM (``scancel``, or preemption that Slurm itself requeues) checkpoints and exits.
    Both hold from the task's first instant: the task starts with them blocked (``job_python``)
    and takes them once its handlers are set. ``command`` submits the run again (to continue it).
    """

    takes_blocked_signals = True  # see job_python

    def __init__(self, config: dict[str, Any], max_requeues: int, command: str | None = None) -> None:
        self.config, self.max_requeues, self.command = config, max_requeues, command

    def __call__(self) -> dict[str, Any]:
        stop = StopSignals(JOB_SIGNALS)  # before the slow imports: a signal is kept from here on
        import submitit

        job = submitit.JobEnvironment()
        # Rank, world size, local rank and master address/port from Slurm, as torch.distributed wants them.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        config = cfgmod.from_dict(self.config)
        result: RunResult | None = None
        if stop.received and job.num_tasks == 1:  # one task alone can skip training; ranks agree in train()
            print(f"signal {', '.join(signal.Signals(s).name for s in stop.received)} before training started: "
                  "not training", flush=True)
        else:
            result = stop.train(config)
        status = result.status if result is not None else "interrupted"
        run_dir = result.run_dir if result is not None else config.checkpoint.dir
        done = f"after {result.epochs_done} epochs" if result is not None else "before training started"
        where = f"its checkpoint is in {run_dir}" if result is not None else f"its run directory is {run_dir}"
        again = f"To continue: {self.command}" if self.command else "Submit it again to continue"
        if status == "finished":
            error = result.metrics.get("eval_top1_error", float("nan"))
            summary = f"finished, {result.epochs_done} epochs, eval top-1 error {error:.2f}%, run directory {run_dir}"
        elif signal.SIGUSR2 in stop.received and job.global_rank == 0:
            resumes = f"its checkpoint in {run_dir}" if result is not None else f"the start in {run_dir} (no checkpoint)"
            problem = requeue_job(job.job_id, self.max_requeues, resumes, self.command)
            if problem is None:
                status, summary = "requeued", f"interrupted {done} and requeued; run directory {run_dir}"
            elif requeues_done() >= self.max_requeues:
                status = "requeue limit"
                summary = (f"stopped at its requeue limit ({requeues_done()} requeues) {done}; {where}. {again} "
                           "(or raise --max-requeues)")
            else:
                status, summary = "requeue failed", f"interrupted {done}, but not requeued: {problem}; {where}. {again}"
        else:
            summary = f"interrupted {done}; {where}. {again}"
        return {"status": status, "summary": summary,
                "mlflow_run_id": result.mlflow_run_id if result is not None else None,
                "tracking_uri": result.tracking_uri if result is not None else None}

    def checkpoint(self) -> Any:
        """submitit's own requeue path (a signal before ``__call__`` set its handlers): rerun as is."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


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


def tracking_store(config: RunConfig) -> str | None:
    """The MLflow store a job of ``config`` submitted from here logs to (it runs in this directory)."""
    if not config.logging.mlflow:
        return None
    from gunn.train.tracking import resolve_tracking_uri

    return resolve_tracking_uri(config.logging.tracking_uri)


def run_slurm(configs: list[RunConfig], args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Submits the runs; with ``--wait`` follows them to the end."""
    seeds: list[int | None] = list(args.seeds) if args.seeds else [None]
    runs = list(itertools.product(args.configs, seeds))  # as resolve() made the configs
    tasks = [TrainingJob(cfgmod.to_dict(c), options["max_requeues"], continue_command(args, source, seed, c))
             for c, (source, seed) in zip(configs, runs)]
    jobs = submit_reporting_refusal(tasks, options, args.logs, configs[0].name if len(configs) == 1 else "gunn-array")
    if jobs is None:
        return 1
    return follow(jobs, [c.name for c in configs], [c.checkpoint.dir for c in configs], args.wait,
                  [tracking_store(c) for c in configs])


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


# -- main ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fields:
        print(cfgmod.help_text())
        return 0
    try:
        options = cluster_options(args) if args.cluster == "slurm" else {}
        world = options["nodes"] * options["tasks_per_node"] if options else args.nproc
        configs = resolve(args, world, options.get("gpus_per_node") or 0)
        if options and not args.print_config:
            check_partition(options)
    except (ConfigError, DataError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        try:  # the values the model uses where the configuration leaves them to the model
            printed = [cfgmod.dump(cfgmod.resolve(c)) for c in configs]
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print("---\n".join(printed), end="")
        return 0
    if args.cluster == "slurm":
        try:
            return run_slurm(configs, args, options)
        except LaunchError as err:  # raised before anything is submitted
            print(f"error: {err}", file=sys.stderr)
            return 2
    status = 0
    for config in configs:
        status = max(status, run_local(config, args.nproc))
    return status


if __name__ == "__main__":
    sys.exit(main())
