#!/usr/bin/env python
"""Ablation sweeps with Ray Tune: python pipelines/sweep.py --study STUDY [PRESET] [field=value ...]

Studies, on any preset (the paper's comparisons, Table 5):
  sunn-vs-gunn  both update orders x seeds
  partitions    the segment width of every GUNN layer over --widths, SUNN as reference
  residual      GUNN with and without residual updates
  custom        --space FILE: a YAML mapping of configuration fields to lists of values (a grid)
Every trial runs the training engine (gunn.train.engine.train, as jobs/launch.py does), reports
each epoch's metrics and checkpoint to Tune, and logs an MLflow child run under the sweep's
parent run. At the end the comparison report (pipelines/report.py) is printed and logged.
``--resume DIR`` finishes an interrupted sweep without redoing finished trials;
``--cluster slurm`` runs the whole sweep inside one Slurm allocation (Ray head on the first
node, Ray workers on the others).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "jobs")]  # report.py and launch.py beside us

import launch  # noqa: E402  (jobs/launch.py: cluster options and submission)
import report  # noqa: E402

from gunn import config as cfgmod  # noqa: E402
from gunn.config import ConfigError, RunConfig  # noqa: E402
from gunn.data import DataError  # noqa: E402

STUDIES = ("sunn-vs-gunn", "partitions", "residual", "custom")
SETTINGS = "sweep.yaml"  # the sweep's arguments, read back by --resume
# Options that say where and how a sweep runs: not saved with it, taken anew on --resume.
WHERE_TO_RUN = ("cluster", "wait", "logs", "verbose", "profile", "sbatch", "ray_cpus", *launch.CLUSTER_OPTIONS)
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # Ray's command line, from this environment


# -- what the trials are -------------------------------------------------------------------

def study_points(args: argparse.Namespace, base: RunConfig) -> list[dict[str, Any]]:
    """The configurations a study compares, as {field: value} overrides (before seeds)."""
    if args.study == "sunn-vs-gunn":
        return [{"model.mode": "sunn"}, {"model.mode": "gunn"}]
    if args.study == "residual":
        return [{"model.mode": "gunn", "model.residual": True}, {"model.mode": "gunn", "model.residual": False}]
    if args.study == "partitions":
        layers = report.layer_widths(base)
        valid = [w for w in range(1, min(layers, default=1) + 1) if all(n % w == 0 for n in layers)]
        hint = (f"widths that divide every GUNN layer of {base.model.name} (widths {layers}): "
                f"{' '.join(map(str, valid))}")
        if not args.widths:
            raise ConfigError(f"--study partitions needs --widths, the segment widths to compare; {hint}")
        points: list[dict[str, Any]] = [{"model.mode": "sunn"}]
        for width in args.widths:
            if width <= 0:
                raise ConfigError(f"--widths: segment width {width} is not positive; {hint}")
            bad = [n for n in layers if n % width]
            if bad:
                raise ConfigError(f"--widths: segment width {width} does not divide the GUNN layer width(s) {bad} "
                                  f"of {base.model.name}; {hint}")
            points.append({"model.mode": "gunn", "model.segments": [n // width for n in layers]})
        return points
    if not args.space:
        raise ConfigError("--study custom needs --space FILE: a YAML mapping of fields to lists of values")
    try:
        space = cfgmod.read_yaml(Path(args.space).read_text())  # 1e-3 is a number
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--space {args.space}: {err}") from None
    if not isinstance(space, dict) or not all(isinstance(v, list) and v for v in space.values()):
        raise ConfigError(f"--space {args.space} must map configuration fields to non-empty lists of values")
    for field, values in space.items():
        if str(field).startswith(report.PER_TRIAL):
            raise ConfigError(f"--space {args.space}: {field} is set by the sweep for every trial "
                              "(seeds: --seeds; logging: an override on the command line)")
        twice = _repeated(values)
        if twice is not None:
            raise ConfigError(f"--space {args.space}: {field} lists {json.dumps(twice)} twice")
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def _repeated(values: list[Any]) -> Any:
    """The first value that appears twice in ``values``, else None."""
    seen: set[str] = set()
    for value in values:
        text = json.dumps(value, sort_keys=True, default=str)  # 1 and true are different values
        if text in seen:
            return value
        seen.add(text)
    return None


def trial_key(point: dict[str, Any], seed: int) -> str:
    """A readable, unique and stable name of one trial (its directory and MLflow run name)."""
    parts = [f"{k.split('.')[-1]}={json.dumps(v, separators=(',', ''))}" for k, v in point.items()]
    return "_".join(parts + [f"seed={seed}"]).replace('"', "").replace("/", "-")


def trial_configs(args: argparse.Namespace, sweep_dir: Path, parent_run_id: str, tracking_uri: str,
                  check_device: bool = True) -> list[dict]:
    """Every trial's fully resolved configuration, checked before Ray starts (``check_device``: that
    the device is usable; not on a Slurm login node). Trials given GPUs train on them."""
    from gunn.train.engine import validate

    base = cfgmod.load(args.preset, args.overrides)
    for option, values in (("--seeds", args.seeds), ("--widths", args.widths or [])):
        twice = _repeated(values)
        if twice is not None:  # two trials would share one run directory and one name
            raise ConfigError(f"{option}: {twice} given twice")
    trials = []
    for point, seed in itertools.product(study_points(args, base), args.seeds):
        key = trial_key(point, seed)
        if any(t["key"] == key for t in trials):
            raise ConfigError(f"two trials would share the name and run directory {key}")
        # Diagnostics on by default (one batch per epoch), so the report compares them; the
        # user's overrides come next and may turn them off, the study's own values after that.
        overrides = ["logging.diagnostics=true", *args.overrides] + [f"{k}={json.dumps(v)}" for k, v in point.items()] + [
            f"runtime.seed={seed}",
            f"checkpoint.dir={sweep_dir / 'runs' / key}",
            "logging.progress=false", "logging.mlflow=true", f"logging.tracking_uri={tracking_uri}",
            f"logging.parent_run_id={parent_run_id}", f"logging.study={args.study}", f"logging.run_name={key}",
        ]
        config = cfgmod.load(args.preset, overrides)
        if config.data.root:  # trials run elsewhere (Ray workers change directory)
            config.data.root = str(Path(config.data.root).expanduser().resolve())
        if args.gpus_per_trial > 0 and config.runtime.device == "auto":
            config.runtime.device = "cuda"  # a GPU CUDA cannot use is an error, not a CPU run
        validate(config, check_device=check_device)
        trials.append({"key": key, "config": cfgmod.to_dict(config)})
    return trials


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

    def report_epoch(metrics: dict[str, float], checkpoint: Path | None) -> None:
        reported.append(metrics["epoch"])
        if checkpoint is None:
            tune.report(dict(metrics))
            return
        with tempfile.TemporaryDirectory() as folder:
            pointer = {"run_dir": str(checkpoint.parent), "checkpoint": checkpoint.name, "epoch": metrics["epoch"]}
            (Path(folder) / "pointer.json").write_text(json.dumps(pointer))
            tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(folder))

    result = train(config, on_epoch=report_epoch)
    if not reported and result.history:
        # Restarted after it had finished (the driver died before Tune recorded the end):
        # nothing was trained again; give Tune the run's final metrics.
        tune.report(dict(result.history[-1]))


# -- the driver ------------------------------------------------------------------------------

def parent_run(tracking_uri: str, experiment: str, name: str, args: argparse.Namespace, sweep_dir: Path) -> str:
    """The sweep's MLflow parent run: created once, found again on --resume."""
    from mlflow.tracking import MlflowClient

    marker = sweep_dir / "parent_run_id"
    client = MlflowClient(tracking_uri)
    if marker.exists():
        run_id = marker.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return run_id
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=name, tags={"study": args.study, "sweep": name,
                                                                 "sweep_dir": str(sweep_dir)})
    for key, value in {"study": args.study, "preset": args.preset or "digits", "seeds": args.seeds,
                       "widths": args.widths, "overrides": args.overrides}.items():
        client.log_param(run.info.run_id, key, json.dumps(value))
    marker.write_text(run.info.run_id)
    return run.info.run_id


def drive(args: argparse.Namespace, sweep_dir: Path, address: str | None = None) -> int:
    """Runs (or resumes) the sweep on a Ray cluster and writes the report; an exit status."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from gunn.train.tracking import resolve_tracking_uri

    base = cfgmod.load(args.preset, args.overrides)
    tracking_uri = resolve_tracking_uri(base.logging.tracking_uri)
    parent = parent_run(tracking_uri, base.logging.experiment, sweep_dir.name, args, sweep_dir)
    trials = trial_configs(args, sweep_dir, parent, tracking_uri)
    print(f"sweep {sweep_dir.name}: {len(trials)} trials, MLflow parent run {parent} at {tracking_uri}", flush=True)

    ray.init(address=address, include_dashboard=False, log_to_driver=args.verbose,
             **({} if address else {"num_cpus": args.ray_cpus or os.cpu_count()}))
    trainable = tune.with_resources(run_trial, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    tune_dir = sweep_dir / "tune"
    if args.resume and tune_dir.exists():
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        epochs = base.optim.epochs
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=args.asha_grace,
                                  reduction_factor=2) if args.asha else None
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(
                metric="eval_top1_error", mode="min", scheduler=scheduler,
                max_concurrent_trials=args.max_concurrent or None,
                trial_dirname_creator=lambda trial: trial.config["trial"]["key"][:120],
                trial_name_creator=lambda trial: trial.config["trial"]["key"][:120],
            ),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(sweep_dir), verbose=1 if args.verbose else 0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # pointers: a few bytes each
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
            ),
        )
    results = tuner.fit()
    ray.shutdown()
    failed = [r for r in results if r.error is not None]
    for result in failed:
        print(f"trial failed: {result.path}\n{result.error}", file=sys.stderr)
    table = report.build(tracking_uri, parent, sweep_dir / "report")
    print(table)
    MlflowClient(tracking_uri).set_terminated(parent, status="FAILED" if failed else "FINISHED")
    print(f"report: {sweep_dir / 'report'}  (rebuild: {rebuild_command(parent, tracking_uri)})")
    return 1 if failed else 0


def rebuild_command(parent: str, tracking_uri: str) -> str:
    """The command that rebuilds the report of the sweep ``parent`` from MLflow, from any folder."""
    return shlex.join(["python", str(HERE / "report.py"), parent, "--tracking-uri", tracking_uri])


class SweepJob:
    """The whole sweep inside one Slurm allocation: one task per node, a Ray node each.

    Task 0 starts the Ray head, waits for the other nodes and drives the sweep; the other
    tasks start Ray workers that join it. On SIGUSR2 (time limit, preemption) task 0 requeues
    the job, and the requeued job resumes the sweep from its directory.
    """

    def __init__(self, args: argparse.Namespace, sweep_dir: Path, max_requeues: int) -> None:
        self.args, self.sweep_dir, self.max_requeues = args, sweep_dir, max_requeues

    def __call__(self) -> dict[str, Any]:
        import submitit

        env = submitit.JobEnvironment()
        # Token authentication with a secret of this sweep (on the shared file system): on a
        # shared cluster an open Ray head would run anyone's code as you.
        token = self.sweep_dir / "ray-auth-token"
        if env.global_rank == 0 and not token.exists():
            token.touch(mode=0o600)
            token.write_text(secrets.token_hex(32))
        deadline = time.monotonic() + 120
        while not (token.exists() and token.stat().st_size):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{token} did not appear: is the sweep directory on a shared file system?")
            time.sleep(1)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        head = socket.gethostbyname(env.hostnames[0])
        port = 20000 + int(env.job_id.split("_")[0]) % 20000
        cpus = os.environ.get("SLURM_CPUS_PER_TASK", "1")
        # A Ray directory per node of this job: nodes that share /tmp (several on one host,
        # as in slurm/dev-cluster) would otherwise share sockets.
        temp = Path(tempfile.gettempdir()) / f"ray-{env.job_id}-{env.node}"
        common = ["--num-cpus", cpus, "--disable-usage-stats", "--temp-dir", str(temp)]
        done = self.sweep_dir / f"ray-done-{env.job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        if env.global_rank != 0:
            _ray_worker([*RAY, "start", "--address", f"{head}:{port}", "--block", *common], done)
            if done.is_file() and done.read_text() == "0":
                shutil.rmtree(temp, ignore_errors=True)  # Ray's logs are kept when the sweep failed
            return {"status": "worker", "summary": "Ray worker stopped"}
        done.unlink(missing_ok=True)
        signal.signal(signal.SIGUSR2, lambda *_: launch.requeue_job(env.job_id, self.max_requeues, self.sweep_dir))
        subprocess.run([*RAY, "start", "--head", "--node-ip-address", head, "--port", str(port),
                        "--include-dashboard=false", *common], check=True)
        status = 1
        try:
            _wait_for_nodes(f"{head}:{port}", env.num_nodes)
            self.args.resume = True  # a requeued job continues the sweep it started
            status = drive(self.args, self.sweep_dir, address=f"{head}:{port}")
        finally:
            done.write_text(str(status))  # tells the workers to stop their Ray nodes
            subprocess.run([*RAY, "stop", "--force"], check=False, capture_output=True)
        if status == 0:
            shutil.rmtree(temp, ignore_errors=True)
        return {"status": "finished" if status == 0 else "failed",
                "summary": f"sweep {self.sweep_dir.name} {'finished' if status == 0 else 'had failed trials'}, "
                           f"report in {self.sweep_dir / 'report'}"}

    def checkpoint(self) -> Any:
        """submitit's own requeue path: rerun as is (the sweep resumes from its directory)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def _ray_worker(command: list[str], done: Path) -> None:
    """Runs a Ray worker node until the head marks the sweep done (or the node dies)."""
    node = subprocess.Popen(command, start_new_session=True)
    while node.poll() is None and not done.exists():
        time.sleep(1)
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(node.pid, sig)  # the node's raylet and workers are in its process group
        except ProcessLookupError:
            break
        try:
            node.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _wait_for_nodes(address: str, nodes: int, timeout: float = 300) -> None:
    import ray

    ray.init(address=address)
    deadline = time.monotonic() + timeout
    while sum(n["Alive"] for n in ray.nodes()) < nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(n['Alive'] for n in ray.nodes())} of {nodes} Ray nodes joined")
        time.sleep(1)
    ray.shutdown()


# -- command line ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = launch.hoist_overrides(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(prog="python pipelines/sweep.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("targets", nargs="*", metavar="PRESET|CONFIG|FIELD=VALUE",
                        help="the base configuration (default: digits) and section.field=value overrides")
    parser.add_argument("--study", choices=STUDIES, help="what to compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every configuration (default 0)")
    parser.add_argument("--widths", type=int, nargs="+", help="partitions: segment widths to compare")
    parser.add_argument("--space", help="custom: YAML file mapping fields to lists of values")
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
    launch.add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    if args.resume:
        saved = args.resume / SETTINGS
        if not saved.is_file():
            parser.error(f"--resume {args.resume}: no sweep there ({saved} is missing)")
        resumed = argparse.Namespace(**yaml.safe_load(saved.read_text()))
        differ = _changed_settings(parser, argv, resumed)
        if differ:
            parser.error(f"--resume {args.resume} continues the sweep as it was started ({saved}); "
                         f"these arguments differ: {'; '.join(differ)} (start a new sweep to change them)")
        resumed.resume, resumed.dir = args.resume, args.resume
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
    return args


def _changed_settings(parser: argparse.ArgumentParser, argv: list[str], saved: argparse.Namespace) -> list[str]:
    """The arguments given with --resume that differ from the sweep's saved ones, as 'NAME: saved X, given Y'.

    Only arguments on this command line count (a default does not undo a saved value); where to
    run (WHERE_TO_RUN) may change."""
    defaults = {a.dest: a.default for a in parser._actions}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    try:
        given = vars(parser.parse_args(argv))
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
        if key in ("resume", *WHERE_TO_RUN) or not hasattr(saved, key):
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
    return differ


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        print('error: the sweeps need Ray Tune: pip install -e ".[sweeps]"', file=sys.stderr)
        return 2
    try:
        base = cfgmod.load(args.preset, args.overrides)
        if not args.resume:
            name = f"{args.study}-{base.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            args.dir = (args.dir or Path("sweeps") / name).resolve()
            # Checked now, before Ray or Slurm: every trial's configuration and the data.
            trial_configs(args, args.dir, "unknown", "unknown", check_device=args.cluster != "slurm")
        options = launch.cluster_options(args) if args.cluster == "slurm" else {}
        if options:
            launch.check_partition(options)  # a request the partition can never run: refused now
    except (ConfigError, DataError, launch.LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sweep_dir = Path(args.dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("targets", "resume", *WHERE_TO_RUN)}
        (sweep_dir / SETTINGS).write_text(yaml.safe_dump(settings))
    if args.cluster != "slurm":
        return drive(args, sweep_dir)
    # The job unpickles this script's SweepJob, which imports report.py and launch.py by name.
    options["setup"] = [*options["setup"], f'export PYTHONPATH="{HERE}:{HERE.parent / "jobs"}${{PYTHONPATH:+:$PYTHONPATH}}"']
    job = SweepJob(args, sweep_dir, options["max_requeues"])
    jobs = launch.submit_reporting_refusal([job], options, args.logs, sweep_dir.name)
    if jobs is None:
        return 1
    return launch.follow(jobs, [sweep_dir.name], [str(sweep_dir)], args.wait)


if __name__ == "__main__":
    sys.exit(main())
