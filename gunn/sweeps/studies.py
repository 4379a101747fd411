"""What a sweep compares: the studies, registered by name, and every trial's checked configuration.

A study is a function registered with ``register_study``: from the base configuration and its own
command-line options to the configurations it compares (its points). The registry is the only way the
command line finds studies: ``--study`` takes its names, ``--help`` lists them with the first line of
each function's docstring, and an option given to a study that does not declare it is refused.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from gunn import config as cfgmod
from gunn.config import ConfigError, RunConfig
from gunn.sweeps import report

Point = tuple[dict[str, Any], dict[str, Any]]  # (what names the configuration, its overrides)


@dataclass(frozen=True)
class StudyOption:
    """A command-line option of the studies that declare it, passed to them by its name (``--widths``:
    ``widths``; None when not given). ``file``: it names a file, which the sweep saves as an absolute path
    and ``--resume`` compares as one."""

    flag: str
    help: str
    type: Callable[[str], Any] | None = None
    nargs: str | None = None
    metavar: str | None = None
    file: bool = False

    @property
    def dest(self) -> str:
        """The option's name in the parsed arguments and as the study function's keyword argument."""
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Study:
    """A registered study: its function (base configuration and options to points) and its options."""

    name: str
    points: Callable[..., list[Point]]
    options: tuple[StudyOption, ...] = ()

    @property
    def summary(self) -> str:
        """The first paragraph of the function's docstring, on one line (the study's line in ``--help``)."""
        return " ".join((inspect.getdoc(self.points) or "").split("\n\n")[0].split())


_STUDIES: dict[str, Study] = {}


def register_study(name: str, *, options: tuple[StudyOption, ...] = ()) -> Callable[[Callable[..., list[Point]]],
                                                                                 Callable[..., list[Point]]]:
    """Decorator: registers a study ``name`` made by the function, which takes the base configuration and,
    by keyword, each of ``options`` (an option several studies share is one StudyOption, declared by each)."""

    def register(points: Callable[..., list[Point]]) -> Callable[..., list[Point]]:
        if name in _STUDIES:
            raise ValueError(f"study {name!r} is already registered")
        for option in options:
            other = next((o for o in study_options() if o.flag == option.flag), option)
            if other != option:
                raise ValueError(f"study {name!r}: {option.flag} is declared otherwise by --study "
                                 f"{' or '.join(studies_taking(other))}")
        _STUDIES[name] = Study(name, points, tuple(options))
        return points

    return register


def list_studies() -> list[str]:
    """The registered studies' names, in the order they were registered."""
    return list(_STUDIES)


def get_study(name: str) -> Study:
    """The study registered as ``name``; ConfigError naming the studies there are."""
    if name not in _STUDIES:
        raise ConfigError(f"unknown study {name!r}; studies: {', '.join(_STUDIES)}")
    return _STUDIES[name]


def study_options() -> list[StudyOption]:
    """Every option some study declares, once each, in the order of registration."""
    return list({o.flag: o for study in _STUDIES.values() for o in study.options}.values())


def studies_taking(option: StudyOption) -> list[str]:
    """The studies that declare ``option``."""
    return [s.name for s in _STUDIES.values() if any(o.flag == option.flag for o in s.options)]


def study_points(args: argparse.Namespace, base: RunConfig) -> list[Point]:
    """The configurations the study ``args.study`` compares (before seeds): each as its name's fields and its
    overrides. (A sweep saved before an option existed resumes with the option None.)"""
    study = get_study(args.study)
    return study.points(base, **{o.dest: getattr(args, o.dest, None) for o in study.options})


# -- the studies ---------------------------------------------------------------------------------

WIDTHS = StudyOption("--widths", "segment widths to compare", type=int, nargs="+")
MODELS = StudyOption("--models", "the models to compare (the paper's studies: which of the paper's rows)",
                     nargs="+", metavar="NAME")
SPACE = StudyOption("--space", "YAML file mapping fields to lists of values", file=True)


@register_study("sunn-vs-gunn")
def sunn_vs_gunn(base: RunConfig) -> list[Point]:
    """Both update orders x seeds."""
    return [({"mode": m}, {"model.mode": m}) for m in ("sunn", "gunn")]


@register_study("partitions", options=(WIDTHS,))
def partitions(base: RunConfig, *, widths: list[int] | None) -> list[Point]:
    """The segment width of every GUNN layer over --widths, SUNN as reference."""
    twice = _repeated(widths or [])
    if twice is not None:  # two trials would share one run directory and one name
        raise ConfigError(f"--widths: {twice} given twice")
    layers = report.layer_widths(base)
    valid = [w for w in range(1, min(layers, default=1) + 1) if all(n % w == 0 for n in layers)]
    hint = (f"widths that divide every GUNN layer of {base.model.name} (widths {layers}): "
            f"{' '.join(map(str, valid))}")
    if not widths:
        raise ConfigError(f"--study partitions needs --widths, the segment widths to compare; {hint}")
    points: list[Point] = [({"mode": "sunn"}, {"model.mode": "sunn"})]
    for width in widths:
        if width <= 0:
            raise ConfigError(f"--widths: segment width {width} is not positive; {hint}")
        bad = [n for n in layers if n % width]
        if bad:
            raise ConfigError(f"--widths: segment width {width} does not divide the GUNN layer width(s) {bad} "
                              f"of {base.model.name}; {hint}")
        points.append(({"width": width}, {"model.mode": "gunn", "model.segments": [n // width for n in layers]}))
    return points


@register_study("residual")
def residual(base: RunConfig) -> list[Point]:
    """GUNN with and without residual updates."""
    return [({"residual": r}, {"model.mode": "gunn", "model.residual": r}) for r in (True, False)]


@register_study("peers", options=(MODELS,))
def peers(base: RunConfig, *, models: list[str] | None) -> list[Point]:
    """--models NAME ...: GUNN against other networks at one recipe (any model.name)."""
    from gunn.models.registry import check_model

    if not models:
        raise ConfigError("--study peers needs --models, the models to compare, e.g. --models gunn15 wrn28_10 "
                          "torchvision.resnet18 (registered names, torchvision.NAME or timm.NAME)")
    for model in models:
        try:
            check_model(model)
        except ValueError as err:
            raise ConfigError(f"--models: {err}") from None
    return _model_points(models)


@register_study("paper-cifar", options=(MODELS,))
def paper_cifar(base: RunConfig, *, models: list[str] | None) -> list[Point]:
    """The rows of the paper's Tables 3 and 5 that gunn builds (a preset such as gunn15-cifar10 gives the paper's
    recipe; --models picks rows)."""
    return _model_points(paper_models("paper-cifar", "cifar10", models))


@register_study("paper-imagenet", options=(MODELS,))
def paper_imagenet(base: RunConfig, *, models: list[str] | None) -> list[Point]:
    """The rows of Table 4 that gunn builds (preset gunn18-imagenet; timm's rows with timm)."""
    return _model_points(paper_models("paper-imagenet", "imagenet", models))


@register_study("custom", options=(SPACE,))
def custom(base: RunConfig, *, space: str | None) -> list[Point]:
    """--space FILE: a YAML mapping of configuration fields to lists of values (a grid)."""
    if not space:
        raise ConfigError("--study custom needs --space FILE: a YAML mapping of fields to lists of values")
    try:
        grid = cfgmod.read_yaml(Path(space).read_text())  # 1e-3 is a number
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--space {space}: {err}") from None
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"--space {space} must map configuration fields to non-empty lists of values")
    for field, values in grid.items():
        if str(field).startswith(report.PER_TRIAL):
            raise ConfigError(f"--space {space}: {field} is set by the sweep for every trial "
                              "(seeds: --seeds; logging: an override on the command line)")
        twice = _repeated(values)
        if twice is not None:
            raise ConfigError(f"--space {space}: {field} lists {json.dumps(twice)} twice")
    keys = list(grid)
    return [({k.split(".")[-1]: v for k, v in zip(keys, values)}, dict(zip(keys, values)))
            for values in itertools.product(*(grid[k] for k in keys))]


def _model_points(models: list[str]) -> list[Point]:
    """One point per model (model.name), each model once."""
    twice = _repeated(models)
    if twice is not None:
        raise ConfigError(f"--models: {twice} given twice")
    return [({"model": m}, {"model.name": m}) for m in models]


def paper_models(study: str, data: str, models: list[str] | None) -> list[str]:
    """The rows of the paper's tables of ``data`` that this project builds, all or those ``models`` picks, in the
    paper's order. timm's rows are left out, with a note, when timm is not installed."""
    from gunn.models import is_model, paper

    rows = list(dict.fromkeys(r.model for r in paper.results(data, buildable=True)))
    if models:
        unknown = [m for m in models if m not in rows]
        if unknown:
            raise ConfigError(f"--models: {', '.join(unknown)} not in the paper's rows of --study {study}; "
                              f"they are: {' '.join(rows)} (compare other models with --study peers)")
        rows = [m for m in rows if m in models]
    kept = [m for m in rows if not m.startswith("timm.") or is_model(m)]
    if len(kept) < len(rows):
        print(f"note: --study {study} leaves out {', '.join(m for m in rows if m not in kept)}: they need "
              "timm (pip install timm)", file=sys.stderr)
    return kept


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
    from gunn.train.checks import validate

    base = cfgmod.load(args.preset, args.overrides)
    twice = _repeated(args.seeds)
    if twice is not None:  # two trials would share one run directory and one name
        raise ConfigError(f"--seeds: {twice} given twice")
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
