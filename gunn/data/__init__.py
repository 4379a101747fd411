"""Data sets of the training engine, registered by name (``registry``; gunn's own in ``datasets``); every
data set returns the same per-rank batch interface."""

from __future__ import annotations

import torch

from gunn.config import DataConfig
from gunn.data import datasets  # noqa: F401  (registers gunn's data sets)
from gunn.data.base import Batch, DataBundle, DataError, EpochLoader, Loading
from gunn.data.loader import map_style
from gunn.data.registry import DataSet, find_dataset, list_datasets, register_dataset

__all__ = ["Batch", "DataBundle", "DataError", "DataSet", "EpochLoader", "Loading", "build_data", "check_data",
           "get_dataset", "list_datasets", "map_style", "register_dataset", "train_size"]


def get_dataset(name: str) -> DataSet:
    """The data set registered as ``name``; DataError naming the data sets there are."""
    found = find_dataset(name)
    if found is None:
        raise DataError(f"unknown data set {name!r}; data sets: {', '.join(list_datasets())}")
    return found


def check_data(cfg: DataConfig) -> None:
    """Cheap checks that the data is where the configuration says, before anything expensive."""
    check = get_dataset(cfg.name).check
    if check is not None:
        check(cfg)


def train_size(cfg: DataConfig) -> int | None:
    """Images in the training set where that is known without reading the images (None for ImageNet:
    counting its files costs minutes on a cluster's file system)."""
    known = get_dataset(cfg.name).train_images
    return known(cfg) if callable(known) else known


def build_data(
    cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int, device: torch.device
) -> DataBundle:
    """The training and evaluation loaders of one rank; ``batch_size`` is per rank."""
    check_data(cfg)
    return get_dataset(cfg.name).read(cfg, Loading(batch_size, rank, world_size, seed, device))
