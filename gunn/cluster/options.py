"""Cluster options, and the profiles that hold them: where and how a Slurm job runs.

A profile holds a site's cluster options in a YAML file, written once. ``--profile`` takes a YAML
file, or a name: NAME.yaml in the user's folder (``$XDG_CONFIG_HOME/gunn/profiles``, by default
``~/.config/gunn/profiles``), else among the profiles that come with gunn (``gunn/cluster/profiles``).
Options given on the command line override the profile's.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import yaml

# The least work time a start of a job must leave (its time limit less the signal delay): a start
# (Python, torch, the data, the model, the process group) and one checkpoint take about a minute
# on a cluster node; a limit that leaves less requeues again and again with little or no progress.
MIN_WORK_S = 120
# The profiles that come with the package (package data).
PACKAGED = Path(__file__).resolve().parent / "profiles"
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


class LaunchError(Exception):
    """Bad input for the launcher itself (profile, cluster options); exit status 2."""


# -- profiles --------------------------------------------------------------------------------

def user_profiles() -> Path:
    """The user's folder of cluster profiles: $XDG_CONFIG_HOME/gunn/profiles, else ~/.config/gunn/profiles."""
    config = os.environ.get("XDG_CONFIG_HOME", "")
    return (Path(config) if os.path.isabs(config) else Path.home() / ".config") / "gunn" / "profiles"


def profile_folders() -> list[Path]:
    """Where a profile given by name is looked for, in this order: the user's folder, then the packaged ones."""
    return [user_profiles(), PACKAGED]


def list_profiles() -> list[str]:
    """Names of the cluster profiles: the user's and the packaged ones."""
    return sorted({p.stem for folder in profile_folders() for p in folder.glob("*.yaml")})


def find_profile(name: str) -> Path:
    """The file of cluster profile ``name``: a YAML file given by its path, else NAME.yaml in the user's
    folder, else a packaged profile. LaunchError, saying where it looked, if there is none."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    looked = [f"the file {name}"]
    if os.sep not in name and path.suffix not in (".yaml", ".yml"):  # a name, not a path
        for folder in profile_folders():
            candidate = folder / f"{name}.yaml"
            if candidate.is_file():
                return candidate
            looked.append(str(candidate))
    raise LaunchError(f"no cluster profile {name!r} (looked for {', '.join(looked)}); "
                      f"profiles: {', '.join(list_profiles()) or 'none'} (or a YAML file)")


def load_profile(name: str | None) -> dict[str, Any]:
    """A checked cluster profile (a name, see find_profile, or a YAML file); {} for None."""
    if name is None:
        return {}
    path = find_profile(name)
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
    if limit * 60 - delay < MIN_WORK_S:
        raise LaunchError(f"--time-min {limit} with --signal-delay-s {delay} leaves {limit * 60 - delay:g} s of work per "
                          f"start of the job, less than the {MIN_WORK_S} s that a start (Python, the data, the model, "
                          "the process group) and one checkpoint take: it would requeue again and again with "
                          f"little or no progress. Give --time-min {math.ceil((MIN_WORK_S + delay) / 60)} or more")
    return options


# -- command line --------------------------------------------------------------------------

def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say where and how a job runs (the launcher's and the sweeps')."""
    slurm = parser.add_argument_group(
        "Slurm (--cluster slurm)",
        "Where and how the job runs. Each option overrides the --profile's value; the defaults hold where neither "
        "sets it.")
    slurm.add_argument("--cluster", choices=["local", "slurm"], default="local",
                       help="local: run on this machine (default); slurm: submit a Slurm job through submitit")
    slurm.add_argument("--profile", metavar="NAME|FILE",
                       help=f"cluster profile: a YAML file of the options below, or a name "
                       f"({', '.join(list_profiles()) or 'none'}): NAME.yaml in "
                       f"{str(user_profiles()).replace('%', '%%')}/, else a profile that comes with gunn")
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
