"""The checks of a run's configuration that the schema cannot make: values that depend on each other, the
device, the MLflow store and the data. Every entry point runs them before any expensive work starts."""

from __future__ import annotations

import os

from gunn import config as cfgmod
from gunn.config import ConfigError, RunConfig
from gunn.data import check_data, train_size
from gunn.train.device import resolve as resolve_device


def validate(config: RunConfig, world_size: int = 1, check_device: bool = True, check_tracking: bool = True) -> None:
    """Checks what the schema cannot: values that depend on each other, the model, the data path,
    (``check_device``, where the run will train) that the device it asks for is usable, and
    (``check_tracking``) that the MLflow store is one runs can log to."""
    o = config.optim
    if o.schedule == "step" and any(not 0 < f <= 1 for f in o.lr_steps):
        raise ConfigError(f"optim.lr_steps must be fractions of the epochs in (0, 1], got {o.lr_steps}")
    if o.schedule == "step" and o.lr_steps != sorted(o.lr_steps):
        raise ConfigError(f"optim.lr_steps must be increasing, got {o.lr_steps}")
    if o.schedule == "snapshot" and o.epochs % o.snapshots:
        raise ConfigError(f"optim.snapshots={o.snapshots} must divide optim.epochs={o.epochs} (whole-epoch cycles)")
    if o.batch_size % world_size:
        raise ConfigError(f"optim.batch_size={o.batch_size} must be a multiple of the {world_size} ranks")
    resolved = cfgmod.resolve(config)  # builds the model on the meta device: ConfigError for values it rejects
    r = config.runtime
    if r.cuda_graphs and r.compile:
        raise ConfigError("runtime.cuda_graphs and runtime.compile exclude each other: choose one")
    if r.cuda_graphs and config.model.memory == "recompute" and resolved.model.mode != "sunn":
        raise ConfigError("runtime.cuda_graphs=true cannot capture model.memory='recompute': its backward reads and "
                          "forks the CUDA random state, which a capture forbids. Use model.memory='efficient', or "
                          "runtime.cuda_graphs=false")
    kind = resolve_device(r.device) if check_device else r.device
    if r.amp == "fp16" and kind == "cpu":
        raise ConfigError("runtime.amp='fp16' needs a GPU; use 'bf16' on the CPU")
    if r.cuda_graphs and config.dist.sync_bn and world_size > 1:
        raise ConfigError("runtime.cuda_graphs=true cannot capture dist.sync_bn's collectives; turn one of them off")
    if r.cuda_graphs and kind == "cpu":
        raise ConfigError("runtime.cuda_graphs=true needs a GPU (CUDA graphs); set it to false on the CPU")
    if config.logging.mlflow and check_tracking:
        check_tracking_store(config)
    check_data(config.data)
    size = train_size(config.data)
    if size is not None and o.batch_size > size:
        raise ConfigError(too_large(o.batch_size, size, config.data.name))


def too_large(batch_size: int, images: int, data: str) -> str:
    return (f"optim.batch_size={batch_size} is larger than the {images} training images of {data}: an epoch would "
            "hold no batch (the last partial batch is dropped)")


def check_tracking_store(config: RunConfig) -> None:
    """ConfigError naming where the tracking URI came from if runs cannot log there (`check_tracking_uri`)."""
    from gunn.train.tracking.store import check_tracking_uri, resolve_tracking_uri

    given = config.logging.tracking_uri
    uri = resolve_tracking_uri(given)
    why = check_tracking_uri(uri)
    if why is None:
        return
    source = (f"logging.tracking_uri={given}" if given else f"MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']}"
              if os.environ.get("MLFLOW_TRACKING_URI") else f"the default MLflow store {uri}")
    raise ConfigError(f"{source}: {why}; set logging.tracking_uri to a store runs can log to, or logging.mlflow=false")
