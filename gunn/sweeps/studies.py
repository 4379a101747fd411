"""What a sweep compares: the configurations of each study, and every trial's checked configuration."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from gunn import config as cfgmod
from gunn.config import ConfigError, RunConfig
from gunn.sweeps import report

STUDIES = ("sunn-vs-gunn", "partitions", "residual", "peers", "paper-cifar", "paper-imagenet", "custom")
# The studies that compare models (--models): each trial's model.name.
MODEL_STUDIES = {"peers": None, "paper-cifar": "cifar10", "paper-imagenet": "imagenet"}
Point = tuple[dict[str, Any], dict[str, Any]]  # (what names the configuration, its overrides)


def study_points(args: argparse.Namespace, base: RunConfig) -> list[Point]:
    """The configurations a study compares (before seeds): each as its name's fields and its overrides."""
    if args.study == "sunn-vs-gunn":
        return [({"mode": m}, {"model.mode": m}) for m in ("sunn", "gunn")]
    if args.study in MODEL_STUDIES:
        return [({"model": m}, {"model.name": m}) for m in study_models(args.study, getattr(args, "models", None))]
    if args.study == "residual":
        return [({"residual": r}, {"model.mode": "gunn", "model.residual": r}) for r in (True, False)]
    if args.study == "partitions":
        layers = report.layer_widths(base)
        valid = [w for w in range(1, min(layers, default=1) + 1) if all(n % w == 0 for n in layers)]
        hint = (f"widths that divide every GUNN layer of {base.model.name} (widths {layers}): "
                f"{' '.join(map(str, valid))}")
        if not args.widths:
            raise ConfigError(f"--study partitions needs --widths, the segment widths to compare; {hint}")
        points: list[Point] = [({"mode": "sunn"}, {"model.mode": "sunn"})]
        for width in args.widths:
            if width <= 0:
                raise ConfigError(f"--widths: segment width {width} is not positive; {hint}")
            bad = [n for n in layers if n % width]
            if bad:
                raise ConfigError(f"--widths: segment width {width} does not divide the GUNN layer width(s) {bad} "
                                  f"of {base.model.name}; {hint}")
            points.append(({"width": width}, {"model.mode": "gunn", "model.segments": [n // width for n in layers]}))
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
    return [({k.split(".")[-1]: v for k, v in zip(keys, values)}, dict(zip(keys, values)))
            for values in itertools.product(*(space[k] for k in keys))]


def study_models(study: str, models: list[str] | None) -> list[str]:
    """The models a model study compares: ``--models`` (peers), or the rows of the paper's table that this
    project builds (paper-cifar: Tables 3 and 5; paper-imagenet: Table 4), all or those ``--models`` picks.
    timm's rows are left out, with a note, when timm is not installed."""
    from gunn.models import is_model, paper
    from gunn.models.registry import check_model

    if study == "peers":
        if not models:
            raise ConfigError("--study peers needs --models, the models to compare, e.g. --models gunn15 wrn28_10 "
                              "torchvision.resnet18 (registered names, torchvision.NAME or timm.NAME)")
        for model in models:
            try:
                check_model(model)
            except ValueError as err:
                raise ConfigError(f"--models: {err}") from None
    else:
        rows = list(dict.fromkeys(r.model for r in paper.results(MODEL_STUDIES[study], buildable=True)))
        if models:
            unknown = [m for m in models if m not in rows]
            if unknown:
                raise ConfigError(f"--models: {', '.join(unknown)} not in the paper's rows of --study {study}; "
                                  f"they are: {' '.join(rows)} (compare other models with --study peers)")
            rows = [m for m in rows if m in models]
        models = [m for m in rows if not m.startswith("timm.") or is_model(m)]
        if len(models) < len(rows):
            print(f"note: --study {study} leaves out {', '.join(m for m in rows if m not in models)}: they need "
                  "timm (pip install timm)", file=sys.stderr)
    twice = _repeated(models)
    if twice is not None:
        raise ConfigError(f"--models: {twice} given twice")
    return models


# Fields the sweep sets in every trial: an override of them on the command line would be ignored.
SWEEP_SETS = {"runtime.seed": "--seeds", "checkpoint.dir": "--dir",
              **{f"logging.{k}": "the sweep" for k in ("mlflow", "progress", "parent_run_id", "study", "run_name")}}


def _refuse_sweep_fields(args: argparse.Namespace, points: list[Point]) -> None:
    """An override on the command line of a field that the sweep or its study sets per trial is an error."""
    studied = {field for _, overrides in points for field in overrides}
    for override in args.overrides:
        field = override.split("=", 1)[0].strip()
        if field in SWEEP_SETS:
            raise ConfigError(f"{override}: {field} is set by the sweep for every trial (use {SWEEP_SETS[field]})")
        if field in studied:
            raise ConfigError(f"{override}: {field} is what --study {args.study} varies; leave it out, "
                              "or compare your own values with --study custom")


def _repeated(values: list[Any]) -> Any:
    """The first value that appears twice in ``values``, else None."""
    seen: set[str] = set()
    for value in values:
        text = json.dumps(value, sort_keys=True, default=str)  # 1 and true are different values
        if text in seen:
            return value
        seen.add(text)
    return None


def trial_key(name: dict[str, Any], seed: int) -> str:
    """A readable, unique and stable name of one trial (its directory and MLflow run name)."""
    parts = [f"{k}={json.dumps(v, separators=(',', ''))}" for k, v in name.items()]
    return "_".join(parts + [f"seed={seed}"]).replace('"', "").replace("/", "-")


def trial_configs(args: argparse.Namespace, sweep_dir: Path, parent_run_id: str, tracking_uri: str,
                  check_device: bool = True) -> list[dict]:
    """Every trial's fully resolved configuration, checked before Ray starts (``check_device``: that
    the device is usable; not on a Slurm login node). Trials given GPUs train on them.

    Seed-major order (every configuration with seed 0, then with seed 1, ...): trials that run at
    the same time share the machine, so no configuration systematically gets the busier half.
    ``parent_run_id``: the sweep's MLflow parent run, or ``journal:SWEEP_DIR`` while it has no id yet."""
    from gunn.train.engine import validate

    base = cfgmod.load(args.preset, args.overrides)
    for option, values in (("--seeds", args.seeds), ("--widths", args.widths or [])):
        twice = _repeated(values)
        if twice is not None:  # two trials would share one run directory and one name
            raise ConfigError(f"{option}: {twice} given twice")
    points = study_points(args, base)
    _refuse_sweep_fields(args, points)
    trials = []
    for seed, (name, point) in itertools.product(args.seeds, points):
        key = trial_key(name, seed)
        if any(t["key"] == key for t in trials):
            raise ConfigError(f"two trials would share the name and run directory {key}")
        # Diagnostics on by default (one batch per epoch), so the report compares them; the
        # user's overrides come next and may turn them off, the study's own values after that.
        overrides = ["logging.diagnostics=true", *args.overrides] + [f"{k}={json.dumps(v)}" for k, v in point.items()] + [
            f"runtime.seed={seed}",
            f"checkpoint.dir={sweep_dir / 'runs' / key}",
            "logging.progress=false", "logging.mlflow=true", f"logging.tracking_uri={tracking_uri}",
            f"logging.parent_run_id={json.dumps(parent_run_id)}", f"logging.study={args.study}", f"logging.run_name={key}",
        ]
        try:
            config = cfgmod.load(args.preset, overrides)
            if config.data.root:  # trials run elsewhere (Ray workers change directory)
                config.data.root = str(Path(config.data.root).expanduser().resolve())
            if args.gpus_per_trial > 0 and config.runtime.device == "auto":
                config.runtime.device = "cuda"  # a GPU CUDA cannot use is an error, not a CPU run
            validate(config, check_device=check_device)
        except ConfigError as err:
            raise ConfigError(f"trial {key}: {err}") from None
        trials.append({"key": key, "config": cfgmod.to_dict(config)})
    return trials
