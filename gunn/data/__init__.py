"""Data sets of the training engine; every backend returns the same per-rank batch interface."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from gunn.config import DataConfig
from gunn.data.base import Batch, DataBundle, DataError, EpochLoader
from gunn.data.loader import Samples, ShardedLoader

__all__ = ["Batch", "DataBundle", "DataError", "EpochLoader", "build_data", "check_data", "train_size"]

CIFAR_TRAIN_IMAGES = 50_000  # both CIFAR-10 and CIFAR-100


def check_data(cfg: DataConfig) -> None:
    """Cheap checks that the data is where the configuration says, before anything expensive."""
    if cfg.name in ("cifar10", "cifar100"):
        from gunn.data.cifar import check_cifar

        check_cifar(cfg.root, int(cfg.name[5:]))
    elif cfg.name == "imagenet":
        from gunn.data.imagenet import check_tree

        if cfg.root is None:
            raise DataError("data.root is required for imagenet: the directory that holds train/ and val/")
        check_tree(Path(cfg.root).expanduser())  # class folders listed, no image decoded


def train_size(cfg: DataConfig) -> int | None:
    """Images in the training set where that is known without reading the images (None for ImageNet:
    counting its files costs minutes on a cluster's file system)."""
    if cfg.name == "digits":
        return _digits_train_size()
    if cfg.name in ("cifar10", "cifar100"):
        return CIFAR_TRAIN_IMAGES
    if cfg.name == "synthetic":
        return cfg.samples
    return None


@functools.cache
def _digits_train_size() -> int:
    from gunn.data.digits import Digits

    return len(Digits(train=True))


def build_data(
    cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int, device: torch.device
) -> DataBundle:
    """The training and evaluation loaders of one rank; ``batch_size`` is per rank."""
    check_data(cfg)
    if cfg.name == "imagenet":
        from gunn.data.imagenet import build_imagenet

        return build_imagenet(
            Path(cfg.root).expanduser(), loader=cfg.loader, batch_size=batch_size, rank=rank,
            world_size=world_size, seed=seed, device=device, workers=cfg.workers,
        )
    train, test = _map_style(cfg, seed)
    common = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, workers=cfg.workers,
                  pin_memory=device.type == "cuda")
    return DataBundle(
        train=ShardedLoader(train, train=True, **common),
        eval=ShardedLoader(test, train=False, **common),
        num_classes=train.num_classes,
        in_chans=train.in_chans,
        train_images=len(train),
        eval_images=len(test),
        image_size=train.load(0, augment=False)[0].shape[-1],  # every image of a map-style set has one size
    )


def _map_style(cfg: DataConfig, seed: int) -> tuple[Samples, Samples]:
    if cfg.name == "digits":
        from gunn.data.digits import Digits

        return Digits(train=True), Digits(train=False)
    if cfg.name in ("cifar10", "cifar100"):
        from gunn.data.cifar import Cifar

        classes = int(cfg.name[5:])
        return Cifar(cfg.root, classes, train=True), Cifar(cfg.root, classes, train=False)
    if cfg.name == "synthetic":
        from gunn.data.synthetic import Synthetic

        return (
            Synthetic(cfg.samples, cfg.image_size, cfg.classes, seed=1),
            Synthetic(max(1, cfg.samples // 4), cfg.image_size, cfg.classes, seed=2),
        )
    raise DataError(f"unknown data set {cfg.name!r}")  # the schema allows no other name
