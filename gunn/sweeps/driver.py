"""Ablation sweeps with Ray Tune: python pipelines/sweep.py --study STUDY [PRESET] [field=value ...]

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
import os
import shlex
import sys
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from gunn import config as cfgmod
from gunn.cluster import slurm
from gunn.cluster.commands import command, plain_warnings, program, write_stderr
from gunn.cluster.launch import hoist_overrides
from gunn.cluster.options import CLUSTER_OPTIONS, LaunchError, add_cluster_arguments, cluster_options
from gunn.config import ConfigError
from gunn.data import DataError
from gunn.sweeps import studies
from gunn.sweeps.experiment import run_locally, stop_on_signals
from gunn.sweeps.slurm_job import SweepJob
from gunn.sweeps.studies import trial_configs

SETTINGS = "sweep.yaml"  # the sweep's arguments, read back by --resume
# The layout of a sweep directory, saved in its settings as "format"; raised when the layout changes (a sweep
# directory without one was started before formats were numbered, in format 1's layout).
FORMAT = 1
# Options that say where and how a sweep runs: not saved with it, taken anew on --resume.
WHERE_TO_RUN = ("cluster", "wait", "logs", "verbose", "profile", "sbatch", "ray_cpus", *CLUSTER_OPTIONS)
# Saved with the sweep, and changed by --resume when given: how the trials share the machine.
MAY_CHANGE = ("max_concurrent",)


# -- command line ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The sweep's arguments: a new sweep's, or, with --resume, the saved ones of the sweep it continues."""
    argv = hoist_overrides(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(prog=program("sweep"),
                                     description=__doc__.split("\n\n")[0].replace("python pipelines/sweep.py",
                                                                                   program("sweep")),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=_studies_help() + "\n" + __doc__.split("\n", 2)[2])
    parser.add_argument("targets", nargs="*", metavar="PRESET|CONFIG|FIELD=VALUE",
                        help="the base configuration (default: digits) and section.field=value overrides")
    parser.add_argument("--study", choices=studies.list_studies(), help="what to compare (listed below)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every configuration (default 0)")
    for option in studies.study_options():
        parser.add_argument(option.flag, type=option.type, nargs=option.nargs, metavar=option.metavar,
                            help=f"{', '.join(studies.studies_taking(option))}: {option.help}")
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
        settings = yaml.safe_load(saved.read_text())
        found = settings.pop("format", 1)
        if not (type(found) is int and found <= FORMAT):
            parser.error(f"--resume {args.resume}: the sweep directory is in format {found!r}, written by a newer gunn; "
                         f"this gunn reads sweep directories up to format {FORMAT}: continue it with the gunn that "
                         "started it, or upgrade gunn")
        resumed = argparse.Namespace(**settings)
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
    for option in studies.study_options():
        takes = studies.studies_taking(option)
        if getattr(args, option.dest) and args.study not in takes:
            parser.error(f"{option.flag} is for --study {' or '.join(takes)}; --study {args.study} does not use it")
    if args.cluster != "slurm":  # a trial that can never get its CPUs would wait for them for ever
        cpus = args.ray_cpus or os.cpu_count() or 1
        if args.cpus_per_trial > cpus:
            parser.error(f"--cpus-per-trial {args.cpus_per_trial:g} exceeds the {cpus} CPUs that Ray may use here "
                         f"({'--ray-cpus' if args.ray_cpus else 'this machine'}): no trial could start")
    return args


def _studies_help() -> str:
    """The registered studies, one line each (name and the first line of its function's docstring)."""
    width = max(map(len, studies.list_studies()), default=0) + 2
    lines = ["Studies, on any preset (the paper's comparisons, Table 5):"]
    for name in studies.list_studies():
        summary = studies.get_study(name).summary
        lines += textwrap.wrap(f"{name:{width}}{summary}", 110,
                               initial_indent="  ", subsequent_indent=" " * (width + 2))
    return "\n".join(lines)


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
    files = {o.dest for o in studies.study_options() if o.file}
    for key, value in given.items():
        if key in ("resume", *WHERE_TO_RUN, *MAY_CHANGE) or not hasattr(saved, key):
            continue
        old = getattr(saved, key)
        if key == "dir":
            same = Path(value).resolve() == Path(old).resolve()
        elif key in files:
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
        for option in studies.study_options():
            if option.file and settings.get(option.dest):  # --resume may run from another folder
                settings[option.dest] = str(Path(settings[option.dest]).resolve())
        try:
            sweep_dir = args.dir = _claim(sweep_dir, unique)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        (sweep_dir / SETTINGS).write_text(yaml.safe_dump({"format": FORMAT, **settings, "dir": str(sweep_dir)},
                                                         sort_keys=False))
    if args.cluster != "slurm":
        stop_on_signals()
        try:
            return run_locally(args, sweep_dir)
        except KeyboardInterrupt:  # before the trials started, or a second Ctrl-C while the sweep ended
            write_stderr(f"sweep {sweep_dir.name} interrupted; to continue: "
                f"{shlex.join([*command('sweep', absolute=True), '--resume', str(sweep_dir)])}")
            return 3
    job = SweepJob(args, sweep_dir, options["max_requeues"])
    jobs = slurm.submit_reporting_refusal([job], options, args.logs, sweep_dir.name)
    if jobs is None:
        return 1
    return slurm.follow(jobs, [sweep_dir.name], [str(sweep_dir)], args.wait)


if __name__ == "__main__":
    sys.exit(main())
