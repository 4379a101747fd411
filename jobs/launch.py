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
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from gunn import config as cfgmod
from gunn.config import ConfigError, RunConfig
from gunn.data import DataError

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = hoist_overrides(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(
        prog="python jobs/launch.py", description=__doc__.split("\n\n")[0],
        epilog=f"presets: {', '.join(cfgmod.list_presets())}; profiles: {', '.join(list_profiles())}. "
        "Configuration fields: --fields.",
    )
    parser.add_argument("targets", nargs="*", metavar="PRESET|CONFIG|FIELD=VALUE",
                        help="presets or YAML files (default: digits), then section.field=value overrides")
    parser.add_argument("--nproc", type=int, default=1, help="local data-parallel processes (default 1)")
    parser.add_argument("--seeds", type=int, nargs="+", help="one run per seed (runtime.seed); a job array on Slurm")
    parser.add_argument("--fields", action="store_true", help="list every configuration field and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration(s) and exit")
    add_cluster_arguments(parser)
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
    slurm = parser.add_argument_group("Slurm (--cluster slurm)")
    slurm.add_argument("--cluster", choices=["local", "slurm"], default="local", help="where to run (default: here)")
    slurm.add_argument("--profile", help="cluster profile: a name in slurm/profiles/ or a YAML file")
    for key, (kind, _) in CLUSTER_OPTIONS.items():
        if kind in (int, str):
            slurm.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, default=None)
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. --sbatch exclusive=true --sbatch mail-type=END")
    slurm.add_argument("--logs", type=Path, default=Path("runs/slurm"), help="submitit's job folder (logs)")
    slurm.add_argument("--wait", action="store_true", help="follow the job(s) to the end; exit with their status")


def resolve(args: argparse.Namespace, world_size: int, gpus_per_node: int = 0) -> list[RunConfig]:
    """The checked configuration of every run, each with its run directory fixed.

    A Slurm job that asks for GPUs trains on them (runtime.device ``auto`` becomes ``cuda``), so that a
    job whose GPUs CUDA cannot use stops with the reason instead of training on the CPU. Whether
    the device is usable is checked here only for local runs: a login node may have no GPU.
    """
    from gunn.train.engine import default_run_dir, validate

    seeds: list[int | None] = list(args.seeds) if args.seeds else [None]
    configs = []
    for source, seed in itertools.product(args.configs, seeds):
        overrides = list(args.overrides) + ([f"runtime.seed={seed}"] if seed is not None else [])
        config = cfgmod.load(source, overrides)
        if seed is not None and len(seeds) > 1:
            config.name = f"{config.name}-seed{seed}"
        if gpus_per_node > 0 and config.runtime.device == "auto":
            config.runtime.device = "cuda"
        validate(config, world_size=world_size, check_device=args.cluster != "slurm")
        configs.append(config)
    if len(configs) > 1 and any(c.checkpoint.dir for c in configs):
        raise ConfigError("checkpoint.dir names one directory, but this call starts several runs; leave it unset")
    for config in configs:
        config.checkpoint.dir = config.checkpoint.dir or str(default_run_dir(config).resolve())
    return configs


# -- local runs ----------------------------------------------------------------------------

def run_local(config: RunConfig, nproc: int) -> int:
    """Trains in this process, or in ``nproc`` local processes; returns an exit status."""
    from gunn.train.engine import request_stop, train

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"\nsignal {signal.Signals(signum).name}: checkpointing at the next batch (again to abort)",
              file=sys.stderr)
        request_stop()
        signal.signal(signum, signal.SIG_DFL)

    if nproc == 1:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, on_signal)
        result = train(config)
        print(f"{result.status}: {result.epochs_done}/{config.optim.epochs} epochs in {result.run_dir}")
        if result.mlflow_run_id:
            print(f"MLflow run {result.mlflow_run_id} at {result.tracking_uri}  (browse: mlflow ui "
                  f"--backend-store-uri {result.tracking_uri})")
        return 0 if result.status == "finished" else 3

    import torch.multiprocessing as mp

    port = _free_port()
    try:
        mp.start_processes(_rank_main, args=(nproc, port, cfgmod.to_dict(config)), nprocs=nproc,
                           start_method="spawn")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:  # raised, killed or exited early
        print(f"error: rank {err.error_index} of {nproc} failed: {str(err).strip()}\nThe other ranks were "
              f"stopped. Run the same command again to continue {config.checkpoint.dir} from its last "
              "checkpoint.", file=sys.stderr)
        return 1
    print(f"finished: {nproc} processes, run directory {config.checkpoint.dir}")
    return 0


def _rank_main(rank: int, world_size: int, port: int, config: dict[str, Any]) -> None:
    from gunn.train.engine import request_stop, train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    signal.signal(signal.SIGTERM, lambda *_: request_stop())
    signal.signal(signal.SIGUSR1, lambda *_: request_stop())
    train(cfgmod.from_dict(config))


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
    options.update({key: getattr(args, key) for key in CLUSTER_OPTIONS if getattr(args, key, None) is not None})
    sbatch = dict(options["sbatch"])
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--sbatch takes KEY=VALUE, got {item!r}")
        sbatch[key] = True if value.lower() == "true" else value
    options["sbatch"] = sbatch
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
        if options[key] < 1:
            raise LaunchError(f"--{key.replace('_', '-')} must be at least 1, got {options[key]}")
    return options


def requeue_job(job_id: str, max_requeues: int, resumes_from: object) -> None:
    """``scontrol requeue`` of this job, unless it was requeued ``max_requeues`` times already."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        print(f"not requeued: the job was requeued {restarts} times already (max_requeues)", flush=True)
        return
    print(f"requeueing job {job_id} (restart {restarts + 1}); it continues from {resumes_from}", flush=True)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)


class TrainingJob:
    """What every Slurm task runs: one DDP rank of a training run, requeued on SIGUSR2.

    SIGUSR2 (the time limit is near, or a site's preemption notice) makes every rank
    checkpoint at the next batch, then rank 0 requeues the job with ``scontrol requeue``;
    the requeued job continues from that checkpoint in the same run directory and MLflow run.
    SIGTERM (``scancel``, or preemption that Slurm itself requeues) checkpoints and exits.
    """

    def __init__(self, config: dict[str, Any], max_requeues: int) -> None:
        self.config, self.max_requeues = config, max_requeues

    def __call__(self) -> dict[str, Any]:
        import submitit

        from gunn.train.engine import request_stop, train

        job = submitit.JobEnvironment()
        # Rank, world size, local rank and master address/port from Slurm, as torch.distributed wants them.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        requeue = []

        def on_usr2(signum: int, _frame: Any) -> None:
            requeue.append(signum)
            request_stop()

        signal.signal(signal.SIGUSR2, on_usr2)
        signal.signal(signal.SIGTERM, lambda *_: request_stop())
        result = train(cfgmod.from_dict(self.config))
        if result.status == "interrupted" and requeue and job.global_rank == 0:
            requeue_job(job.job_id, self.max_requeues, result.run_dir)
        error = result.metrics.get("eval_top1_error", float("nan"))
        return {"status": result.status, "summary": f"{result.status}, {result.epochs_done} epochs, eval top-1 error "
                f"{error:.2f}%, run directory {result.run_dir}"}

    def checkpoint(self) -> Any:
        """submitit's own requeue path (a signal before ``__call__`` set its handlers): rerun as is."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def submit(tasks: list[Any], options: dict[str, Any], logs: Path, name: str) -> list[Any]:
    """Submits one Slurm job per callable in ``tasks`` (a job array when several); submitit's jobs."""
    import submitit

    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: --cluster slurm needs a Slurm login node "
                          "(or a development cluster: slurm/dev-cluster up)")
    executor = submitit.AutoExecutor(folder=str(logs / "%j"), cluster="slurm")
    params: dict[str, Any] = dict(
        nodes=options["nodes"], tasks_per_node=options["tasks_per_node"], cpus_per_task=options["cpus_per_task"],
        timeout_min=options["time_min"], slurm_signal_delay_s=options["signal_delay_s"],
        slurm_additional_parameters=dict(options["sbatch"]), slurm_setup=list(options["setup"]), name=name,
    )
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
    """``submit``, or None after printing sbatch's own words if it refused the job."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # submitit prints sbatch's complaint itself
            return submit(tasks, options, logs, name)
    except (FailedJobError, FailedSubmissionError) as err:
        # sbatch refused the job (unknown partition, too many resources...): show sbatch's words.
        print(f"error: sbatch refused the job:\n{str(err).strip() or captured.getvalue().strip()}", file=sys.stderr)
        return None


def describe(jobs: list[Any], names: list[str], directories: list[str]) -> None:
    """Prints job ids, logs and the commands to follow and cancel them."""
    for job, name, directory in zip(jobs, names, directories):
        print(f"submitted job {job.job_id}: {name}")
        print(f"  run directory  {directory}")
        print(f"  log            {job.paths.stdout}")
        print(f"  errors         {job.paths.stderr}")
    ids = ",".join(sorted({str(j.job_id).split("_")[0] for j in jobs}))
    print(f"follow:  squeue -j {ids}   |   tail -f {jobs[0].paths.stdout}")
    print(f"cancel:  scancel {ids}")


def wait(jobs: list[Any], poll_s: float = 2.0) -> int:
    """Follows the jobs until they end (requeues included); 0 if every run finished."""
    states: dict[str, str] = {}
    pending = list(jobs)
    failed = 0
    while pending:
        for job in list(pending):
            state = _queue_state(job.job_id)
            if state and states.get(job.job_id) != state:
                print(f"job {job.job_id}: {state}", flush=True)
                states[job.job_id] = state
            if state is None:  # gone from the queue: finished, failed, or cancelled
                if not job.paths.result_pickle.exists():
                    time.sleep(poll_s)  # the result may still be being written
                failed += not _report(job)
                pending.remove(job)
        if pending:
            time.sleep(poll_s)
    return 0 if failed == 0 else 1


def _queue_state(job_id: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if lines and lines[0] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None


def _report(job: Any) -> bool:
    if not job.paths.result_pickle.exists():
        print(f"job {job.job_id} ended without a result (cancelled or killed); see {job.paths.stderr}")
        return False
    try:
        result = job.results()[0]  # one result per task; rank 0's describes the run
    except Exception as err:  # submitit re-raises the job's exception with its traceback
        print(f"job {job.job_id} failed:\n{err}\nlog: {job.paths.stderr}")
        return False
    print(f"job {job.job_id}: {result['summary']}")
    return result["status"] == "finished"


def run_slurm(configs: list[RunConfig], args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Submits the runs; with ``--wait`` follows them to the end."""
    tasks = [TrainingJob(cfgmod.to_dict(c), options["max_requeues"]) for c in configs]
    jobs = submit_reporting_refusal(tasks, options, args.logs, configs[0].name if len(configs) == 1 else "gunn-array")
    if jobs is None:
        return 1
    return follow(jobs, [c.name for c in configs], [c.checkpoint.dir for c in configs], args.wait)


def follow(jobs: list[Any], names: list[str], directories: list[str], wait_for_end: bool) -> int:
    """Describes the submitted jobs and, with ``wait_for_end``, follows them to the end.

    Ctrl-C from here on stops following and leaves the jobs running.
    """
    try:
        describe(jobs, names, directories)
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
    except (ConfigError, DataError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print("---\n".join(cfgmod.dump(c) for c in configs), end="")
        return 0
    if args.cluster == "slurm":
        return run_slurm(configs, args, options)
    status = 0
    for config in configs:
        status = max(status, run_local(config, args.nproc))
    return status


if __name__ == "__main__":
    sys.exit(main())
