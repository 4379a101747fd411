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
import itertools
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gunn import config as cfgmod
from gunn.cluster.commands import command, plain_warnings, program, write_stderr
from gunn.cluster.options import CLUSTER_OPTIONS, LaunchError, add_cluster_arguments, cluster_options, list_profiles
from gunn.cluster.slurm import (JOB_SIGNALS, RequeueingJob, check_not_submitted, check_partition, follow,
                                mlflow_line, record_submitted, requeues_done, submit_reporting_refusal)
from gunn.config import ConfigError, RunConfig
from gunn.data import DataError

if TYPE_CHECKING:
    from gunn.train.engine import RunResult

# Signals that make a local run checkpoint at the next batch and stop (a second one aborts).
LOCAL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


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
        prog=program("launch"),
        description=__doc__.split("\n\n")[0].replace("python jobs/launch.py", program("launch")),
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
    args = parser.parse_intermixed_args(argv)  # a preset anywhere on the line
    args.configs = [t for t in args.targets if "=" not in t] or [None]
    args.overrides = [t for t in args.targets if "=" in t]
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    if args.cluster == "slurm" and args.nproc != 1:
        parser.error("--nproc is for local runs; on Slurm use --nodes and --tasks-per-node")
    twice = sorted({s for s in args.seeds or [] if args.seeds.count(s) > 1})
    if twice:  # two runs would be one run (one run directory)
        parser.error(f"--seeds: {', '.join(map(str, twice))} given twice")
    return args

def resolve(args: argparse.Namespace, world_size: int, gpus_per_node: int = 0) -> list[RunConfig]:
    """The checked configuration of every run, each with its run directory fixed.

    With ``--print-config`` data that is missing is no error (a note on stderr says so): printing
    a configuration does not need the data, only training does.

    A Slurm job that asks for GPUs trains on them (runtime.device ``auto`` becomes ``cuda``), so that a
    job whose GPUs CUDA cannot use stops with the reason instead of training on the CPU. Whether
    the device is usable is checked here only for local runs: a login node may have no GPU.
    """
    from gunn.train.checks import validate
    from gunn.train.rundir import check_usable, default_run_dir

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
            validate(config, world_size=world_size, check_device=args.cluster != "slurm",
                     check_tracking=not args.print_config)
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
            write_stderr(f"\nsignal {signal.Signals(signum).name}: checkpointing at the next batch"
                         + (" (again to abort)" if self.abort else ""))
        if self.abort:
            for other in self.signals:
                signal.signal(other, signal.SIG_DFL)
        request = getattr(sys.modules.get("gunn.train.stop"), "request_stop", None)
        if request is not None:
            request()

    def train(self, config: RunConfig) -> RunResult:
        """The engine's ``train(config)``, asked to stop at once if a signal came already."""
        from gunn.train.engine import train
        from gunn.train.stop import request_stop

        if self.received:  # before the engine was imported
            request_stop()
        return train(config)


def outcome(result: RunResult) -> dict[str, Any]:
    """How a run ended, as plain values (what rank 0 hands to the launcher)."""
    return {"status": result.status, "epochs_done": result.epochs_done, "run_dir": str(result.run_dir),
            "mlflow_run_id": result.mlflow_run_id, "tracking_uri": result.tracking_uri, "unsent": result.unsent}


def report_local(config: RunConfig, ended: dict[str, Any], nproc: int) -> int:
    """Prints how a local run ended; its exit status: 0 finished, 3 interrupted (checkpointed)."""
    ranks = f" ({nproc} processes)" if nproc > 1 else ""
    print(f"{ended['status']}: {ended['epochs_done']}/{config.optim.epochs} epochs in {ended['run_dir']}{ranks}")
    from gunn.train.tracking import JOURNAL_NAME, sync_command

    journal, sync = Path(ended["run_dir"]) / JOURNAL_NAME, sync_command(Path(ended["run_dir"]))
    if ended["mlflow_run_id"]:
        print(mlflow_line(ended["mlflow_run_id"], ended["tracking_uri"]))
        if ended.get("unsent"):
            print(f"MLflow: {ended['unsent']} record(s) of this run did not reach {ended['tracking_uri']} (down at the "
                  f"end); they wait in {journal}: send them with {sync} (add --tracking-uri URI if the store moved)")
    elif config.logging.mlflow:
        count = f"{ended['unsent']} record(s)" if ended.get("unsent") else "records"
        print(f"MLflow: {ended['tracking_uri']} never created the run; its {count} wait in {journal}: send them "
              f"with {sync} (add --tracking-uri URI if the store moved)")
    if ended["status"] == "interrupted":
        print("to continue: run the same command again (it resumes from the newest checkpoint there)")
    return 0 if ended["status"] == "finished" else 3


def run_local(config: RunConfig, nproc: int) -> int:
    """Trains in this process, or in ``nproc`` local processes; returns an exit status.

    SIGINT (Ctrl-C), SIGTERM and SIGUSR1 checkpoint at the next batch and exit with status 3; a
    second signal aborts.
    """
    if nproc > 1:
        return run_ranks(config, nproc)
    from gunn.train.engine import RUN_ERRORS

    previous = {signum: signal.getsignal(signum) for signum in LOCAL_SIGNALS}
    try:
        result = StopSignals(LOCAL_SIGNALS, message=True, abort=True).train(config)
    except RUN_ERRORS as err:  # a run that cannot go on, said in one line (its checkpoint is intact)
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1  # the run directory or its checkpoints refuse it
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
    import logging

    import torch.multiprocessing as mp

    _start_resource_tracker()
    # torch says "Terminating process N via signal SIGTERM" when one rank ends early; the launcher says why.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
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
                    write_stderr(f"\nsignal {name}: checkpointing at the next batch (again to abort)")
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
            said = sorted(Path(tmp).glob(f"{ended.name}.rank*"))
            if said:  # a run that cannot go on, said by the rank in one line (the same on every rank)
                first = json.loads(said[0].read_text())
                print(f"error: {first['error']}", file=sys.stderr)
                return first["status"]
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


def _start_resource_tracker() -> None:
    """Starts multiprocessing's resource tracker now: started later, it would unblock SIGINT and SIGTERM
    here. It cleans up the semaphores of ranks killed by a second signal; it is told not to warn about
    them ("leaked semaphore objects"): the launcher has said that it killed the ranks."""
    from multiprocessing import resource_tracker

    saved = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [saved, "ignore:resource_tracker:UserWarning"]))
    try:
        resource_tracker.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = saved


def _rank_main(rank: int, world_size: int, port: int, config: dict[str, Any], ended: str) -> None:
    # No message, no abort: the launcher says what happens and kills the ranks on a second signal.
    stop = StopSignals(LOCAL_SIGNALS)
    plain_warnings()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from gunn.train.engine import RUN_ERRORS

    try:
        result = stop.train(cfgmod.from_dict(config))
    except RUN_ERRORS as err:  # said in one line by the launcher, without this rank's traceback
        Path(f"{ended}.rank{rank}").write_text(json.dumps({"error": str(err),
                                                          "status": 2 if isinstance(err, ConfigError) else 1}))
        raise SystemExit(1) from None
    if rank == 0:
        Path(ended).write_text(json.dumps(outcome(result)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- Slurm jobs ----------------------------------------------------------------------------

def continue_command(args: argparse.Namespace, source: str | None, seed: int | None, config: RunConfig) -> str:
    """The launch command that submits one run of this call again, to continue it in its run directory."""
    words = command("launch")
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


class TrainingJob(RequeueingJob):
    """What every Slurm task runs: one DDP rank of a training run, requeued on SIGUSR2.

    SIGUSR2 (the time limit is near, or a site's preemption notice) makes every rank
    checkpoint at the next batch, then rank 0 requeues the job with ``scontrol requeue``;
    the requeued job continues from that checkpoint in the same run directory and MLflow run.
    SIGTERM (``scancel``, or preemption that Slurm itself requeues) checkpoints and exits.
    Both hold from the task's first instant: the task starts with them blocked (``job_python``)
    and takes them once its handlers are set. ``command`` submits the run again (to continue it).
    """

    def __init__(self, config: dict[str, Any], max_requeues: int, command: str | None = None) -> None:
        super().__init__(max_requeues)
        self.config, self.command = config, command

    def __call__(self) -> dict[str, Any]:
        stop = StopSignals(JOB_SIGNALS)  # before the slow imports: a signal is kept from here on
        import submitit

        from gunn.train.distributed import slurm_environment

        job = submitit.JobEnvironment()
        # Rank, world size, local rank and master address/port of this task, from Slurm's own variables (the one
        # mapping, also torch.distributed's fallback): a MASTER_ADDR or MASTER_PORT that the job inherited from
        # where it was submitted (sbatch exports the environment) does not point at this job's first node.
        os.environ.update(slurm_environment({k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}))
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
            status, problem = self.requeue(job.job_id, resumes, self.command)
            if status == "requeued":
                summary = f"interrupted {done} and requeued; run directory {run_dir}"
            elif status == "requeue limit":
                summary = (f"stopped at its requeue limit ({requeues_done()} requeues) {done}; {where}. {again} "
                           "(or raise --max-requeues)")
            else:
                summary = f"interrupted {done}, but not requeued: {problem}; {where}. {again}"
        else:
            summary = f"interrupted {done}; {where}. {again}"
        return {"status": status, "summary": summary,
                "mlflow_run_id": result.mlflow_run_id if result is not None else None,
                "tracking_uri": result.tracking_uri if result is not None else None}


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
    for c in configs:  # a pending job holds its run directory too
        check_not_submitted(Path(c.checkpoint.dir))
    tasks = [TrainingJob(cfgmod.to_dict(c), options["max_requeues"], continue_command(args, source, seed, c))
             for c, (source, seed) in zip(configs, runs)]
    jobs = submit_reporting_refusal(tasks, options, args.logs, configs[0].name if len(configs) == 1 else "gunn-array")
    if jobs is None:
        return 1
    record_submitted([c.checkpoint.dir for c in configs], jobs)
    return follow(jobs, [c.name for c in configs], [c.checkpoint.dir for c in configs], args.wait,
                  [tracking_store(c) for c in configs])


# -- main ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plain_warnings()
    if args.fields:
        try:
            print(cfgmod.help_text(), flush=True)
        except BrokenPipeError:  # `--fields | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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
