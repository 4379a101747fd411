"""The one configuration schema of a training run, its presets and command-line overrides.

A run is described by a ``RunConfig``: plain dataclasses, one per concern, whose fields are
checked (type, range, choices) before anything expensive starts. Presets are YAML files in
``gunn/presets``; any field can be overridden with ``section.field=value`` (the value is
read as YAML, so ``optim.lr=0.05``, ``model.segments=[10,10,10]``, ``runtime.amp=bf16``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: YAML 1.1 reads ``1e-3`` (an exponent without a dot) as a string,
    so every decimal number YAML 1.2 knows is read as a float as well."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``1e-3`` as a number (configurations, overrides, profiles)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def _meta(help: str, **checks: Any) -> dict[str, Any]:
    return {"help": help, **checks}


@dataclass
class ModelConfig:
    """Which network, and the overrides that the ablations need (None keeps the model's)."""

    name: str = field(default="gunn_tiny", metadata=_meta("registered model name (gunn.models.list_models()), or torchvision.NAME / timm.NAME"))
    mode: Literal["gunn", "sunn"] | None = field(default=None, metadata=_meta("update order: gunn (gradual) or sunn (simultaneous); null: the model's"))
    residual: bool | None = field(default=None, metadata=_meta("residual updates (false: the NoRes ablation); null: the model's"))
    segments: list[int] | None = field(default=None, metadata=_meta("segment count of each GUNN layer, e.g. [10, 10, 10]; null: the model's"))
    expansion: int | None = field(default=None, metadata=_meta("bottleneck expansion K; null: the model's", min=1))
    depth: int | None = field(default=None, metadata=_meta("bottlenecks stacked in each update unit M; null: the model's", min=1))
    memory: Literal["efficient", "recompute", "autograd"] = field(
        default="efficient", metadata=_meta("backward strategy of the GUNN layers")
    )


def _data_sets() -> list[str]:
    """The registered data sets (gunn.data.registry: imported when a name is checked, not with this module)."""
    from gunn.data.registry import list_datasets

    return list_datasets()


@dataclass
class DataConfig:
    """The data set and how it is read."""

    name: str = field(
        default="digits", metadata=_meta("registered data set name (gunn.data.list_datasets())", choices=_data_sets)
    )
    root: str | None = field(default=None, metadata=_meta("data directory (cifar10/100, imagenet)"))
    loader: Literal["auto", "dali", "torchvision"] = field(
        default="auto", metadata=_meta("imagenet reader: DALI when installed (auto), or torchvision")
    )
    workers: int = field(default=2, metadata=_meta("loader worker processes per rank", min=0))
    image_size: int = field(default=32, metadata=_meta("synthetic: image side in pixels", min=1))
    samples: int = field(default=512, metadata=_meta("synthetic: training images", min=1))
    classes: int = field(default=10, metadata=_meta("synthetic: number of classes", min=2))


@dataclass
class OptimConfig:
    """The paper's recipe: SGD with Nesterov momentum, step or cyclic cosine schedule."""

    epochs: int = field(default=300, metadata=_meta("training epochs", min=1))
    batch_size: int = field(default=64, metadata=_meta("global batch size, split across ranks", min=1))
    lr: float = field(default=0.1, metadata=_meta("initial learning rate", min=0.0))
    momentum: float = field(default=0.9, metadata=_meta("SGD momentum", min=0.0, max=1.0))
    nesterov: bool = field(default=True, metadata=_meta("Nesterov momentum"))
    weight_decay: float = field(default=1e-4, metadata=_meta("L2 weight decay", min=0.0))
    schedule: Literal["step", "snapshot"] = field(
        default="step", metadata=_meta("step decay, or cyclic cosine with snapshots (Snapshot Ensemble)")
    )
    lr_steps: list[float] = field(
        default_factory=lambda: [0.5, 0.75],
        metadata=_meta("step: fractions of the epochs at which the LR is multiplied by gamma"),
    )
    gamma: float = field(default=0.1, metadata=_meta("step: LR factor at each step", min=0.0, max=1.0))
    snapshots: int = field(default=6, metadata=_meta("snapshot: cosine cycles M, one snapshot each", min=1))


@dataclass
class DistributedConfig:
    """Data parallel training over the ranks that torchrun or Slurm started."""

    backend: Literal["auto", "nccl", "gloo"] = field(default="auto", metadata=_meta(
        "auto: nccl on GPUs, gloo on CPU, and with one process no process group; nccl or gloo with one process: a "
        "process group of one rank, which takes every multi-rank code path (DDP, the collectives)"))
    sync_bn: bool = field(default=False, metadata=_meta("SyncBatchNorm across ranks (CUDA only)"))
    timeout_s: float = field(default=600.0, metadata=_meta(
        "seconds a rank waits in a collective for the others before the run fails (NCCL's own default: 600); "
        "nobody waits for rank 0's work at the end (final weights, MLflow model)", min=1.0))


@dataclass
class RuntimeConfig:
    """Device, precision and compilation switches; the seed of everything random."""

    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_meta("auto: cuda when available"))
    amp: Literal["none", "bf16", "fp16"] = field(default="none", metadata=_meta("autocast dtype"))
    channels_last: bool = field(default=True, metadata=_meta("channels_last memory format"))
    tf32: bool = field(default=True, metadata=_meta(
        "CUDA: TF32 tensor cores for float32 matrix products and convolutions alike (false: full float32)"))
    compile: bool = field(default=False, metadata=_meta("torch.compile the model (docs/gpus.md: which to use when)"))
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = field(
        default="default", metadata=_meta(
            "torch.compile's mode with runtime.compile: reduce-overhead also replays the compiled step as CUDA graphs "
            "(on CUDA; as default elsewhere)"))
    cuda_graphs: bool = field(default=False, metadata=_meta(
        "CUDA: capture the model's training forward and backward once and replay them as CUDA graphs"))
    threads: int = field(default=0, metadata=_meta(
        "CPU threads per process (0: torch's default for a node's only rank or with OMP_NUM_THREADS set; "
        "else Slurm's CPUs per task, or the CPUs shared out among this node's ranks)", min=0))
    seed: int = field(default=0, metadata=_meta("seed of data order, augmentation and initialisation"))


@dataclass
class CheckpointConfig:
    """Where and how often the run saves everything it needs to continue."""

    dir: str | None = field(default=None, metadata=_meta("run directory (default: runs/<name>-<time>)"))
    every: int = field(default=1, metadata=_meta("epochs between checkpoints", min=1))
    keep: int = field(default=3, metadata=_meta("newest checkpoints kept", min=1))


@dataclass
class LoggingConfig:
    """MLflow tracking and console output."""

    mlflow: bool = field(default=True, metadata=_meta("log the run to MLflow"))
    tracking_uri: str | None = field(
        default=None, metadata=_meta("MLflow tracking URI (default: MLFLOW_TRACKING_URI, else a local store)")
    )
    experiment: str = field(default="gunn", metadata=_meta("MLflow experiment name"))
    run_name: str | None = field(default=None, metadata=_meta("MLflow run name (default: the run directory's name)"))
    parent_run_id: str | None = field(
        default=None,
        metadata=_meta("MLflow parent run (a sweep's): nest this run under it; journal:DIR names the run journaled "
                       "in DIR (a sweep directory), whose id is taken when this run is sent"),
    )
    study: str | None = field(default=None, metadata=_meta("study tag (set by the sweeps)"))
    progress: bool = field(default=True, metadata=_meta("progress bar per epoch on rank 0"))
    diagnostics: bool = field(
        default=False, metadata=_meta("log collapsed channel pairs and effective dimension per GUNN layer each epoch")
    )
    system_metrics: bool = field(
        default=True,
        metadata=_meta("log MLflow's system metrics (system/: CPU, memory, disk, network, GPU) of rank 0's machine "
                       "every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL), and once at the end"),
    )
    model: bool = field(
        default=True,
        metadata=_meta("log the finished run's model as an MLflow model named 'model' (mlflow.pytorch.load_model, "
                       "mlflow models serve)"),
    )


@dataclass
class RunConfig:
    """Everything that defines a training run."""

    name: str = field(default="run", metadata=_meta("short name of the run (the preset's)"))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# -- presets -------------------------------------------------------------------------------

def list_presets() -> list[str]:
    """Names of the presets shipped in gunn/presets."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("gunn.presets").iterdir() if p.name.endswith(".yaml"))


def load(source: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """A checked RunConfig from a preset name or YAML file (default: the digits demo) and overrides."""
    source = "digits" if source is None else source
    if str(source) in list_presets():
        text = resources.files("gunn.presets").joinpath(f"{source}.yaml").read_text()
        origin = f"preset {source!r}"
    else:
        path = Path(source)
        if not path.is_file():
            import difflib

            close = difflib.get_close_matches(str(source), list_presets(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"no preset or configuration file {str(source)!r}; {hint}presets: "
                              f"{', '.join(list_presets())}")
        text, origin = path.read_text(), str(path)
    try:
        data = read_yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    return from_dict(data)


def parse_override(item: str) -> tuple[str, Any]:
    """Splits ``section.field=value`` and reads the value as YAML."""
    if "=" not in item:
        raise ConfigError(f"an override must look like section.field=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
    node[last] = value


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Builds and checks a RunConfig from nested mappings (unknown keys are errors)."""
    return _build(RunConfig, data, "")


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The configuration as nested plain mappings (what is saved and logged)."""
    return dataclasses.asdict(config)


def flatten(config: RunConfig | typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``section.field -> value`` for every field of a RunConfig or nested mappings (MLflow params)."""
    node = to_dict(config) if isinstance(config, RunConfig) else config
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, typing.Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_knobs(model: ModelConfig) -> dict[str, Any]:
    """The ``MODEL_KNOBS`` a model configuration sets, as ``create_model`` takes them (None: the model's)."""
    from gunn.models import MODEL_KNOBS

    return {knob: getattr(model, knob) for knob in MODEL_KNOBS}


def model_arguments(model: ModelConfig) -> dict[str, Any]:
    """What ``create_model`` is given from a model configuration: the knobs it sets, and its backward
    strategy (``memory``) where the model takes one; a model without GUNN layers is not given the
    default strategy (another one is an error that names it)."""
    from gunn.models import takes

    arguments = model_knobs(model)
    if model.memory != ModelConfig.memory or takes(model.name, "memory"):
        arguments["memory"] = model.memory
    return arguments


def model_arguments_for(config: RunConfig, num_classes: int, in_chans: int) -> dict[str, Any]:
    """What ``create_model`` is given for ``config``'s model on data of ``num_classes`` classes and
    ``in_chans`` channels."""
    return dict(num_classes=num_classes, in_chans=in_chans, **model_arguments(config.model))


def resolve(config: RunConfig) -> RunConfig:
    """A copy of ``config`` whose model fields left None (``gunn.models.MODEL_KNOBS``: ``mode``,
    ``residual``, ``segments``, ``expansion``, ``depth``) hold the values its model actually uses:
    the values to print, save and log.

    The model is built on the meta device (nothing allocated). ``segments`` becomes one count per
    GUNN layer; a field whose value differs between layers (no registered model does that) stays
    None. Resolving a resolved configuration changes nothing, and it builds the same model.
    ConfigError if the model cannot be built from these values.
    """
    import torch

    from gunn.layers import GunnLayer
    from gunn.models import create_model

    m = config.model
    try:
        with torch.device("meta"):
            model = create_model(m.name, **model_arguments(m))
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    layers = [layer for layer in model.modules() if isinstance(layer, GunnLayer)]
    resolved = copy.deepcopy(config)
    if not layers:
        return resolved

    def shared(attribute: str) -> Any:
        values = {getattr(layer, attribute) for layer in layers}
        return values.pop() if len(values) == 1 else None

    r = resolved.model
    r.mode, r.residual = shared("mode"), shared("residual")
    r.expansion, r.depth = shared("expansion"), shared("depth")
    r.segments = [int(layer.segments) for layer in layers]
    return resolved


def dump(config: RunConfig) -> str:
    """The configuration as YAML; ``load`` of this text gives the same configuration."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'configuration'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown field {prefix}{key}{hint}; {prefix.rstrip('.') or 'top level'} has: "
                              f"{', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        hint = hints[name]
        path = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, data.get(name, {}), f"{path}.")
        elif name in data:
            values[name] = _check(path, data[name], hint, f.metadata)
    return cls(**values)


def _check(path: str, value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    if "choices" in meta:  # a registry's names, known when the value is checked
        choices = meta["choices"]()
        if value not in choices:
            raise ConfigError(f"{path} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    value = _coerce(path, value, hint)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            raise ConfigError(f"{path} must be >= {meta['min']}, got {value!r}")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(f"{path} must be <= {meta['max']}, got {value!r}")
    return value


def _coerce(path: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(path, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        if not math.isfinite(value):  # .nan passes every min/max check, and .inf trains to nan
            raise ConfigError(f"{path} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type {hint} for {path}")  # a schema bug, not a user error


def _as_written(value: Any) -> str:
    """A value as it is written in YAML or an override (``null``, ``true``, ``[0.5, 0.75]``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def help_text() -> str:
    """Every field with its default and meaning, in aligned columns (``jobs/launch.py --fields``)."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"{prefix}{f.name}", _as_written(default), f.metadata.get("help", "")))

    walk(RunConfig, "")
    rows.insert(0, ("FIELD", "DEFAULT", "MEANING"))
    name_width, default_width = (max(len(row[i]) for row in rows) for i in (0, 1))
    head = ("Configuration fields. DEFAULT is the schema's default, used where the preset or YAML file does not\n"
            "set the field: a preset sets its own values (see them with: python jobs/launch.py PRESET --print-config).\n"
            "Set any field with section.field=value (a YAML value).\n")
    return head + "\n".join(f"  {n:{name_width}}  {d:{default_width}}  {h}".rstrip() for n, d, h in rows)
