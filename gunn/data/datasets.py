"""The data sets that come with gunn, registered by name (``gunn.data.registry``): digits, CIFAR-10/100,
ImageNet and synthetic images. Each is a function from the data configuration and one rank's ``Loading``
to its ``DataBundle``; the backends it reads with are imported when it is read."""

from __future__ import annotations

import functools
from pathlib import Path

from gunn.config import DataConfig
from gunn.data.base import DataBundle, DataError, Loading
from gunn.data.loader import map_style
from gunn.data.registry import register_dataset

CIFAR_TRAIN_IMAGES = 50_000  # both CIFAR-10 and CIFAR-100


@functools.cache
def _digits_train_size() -> int:
    from gunn.data.digits import Digits

    return len(Digits(train=True))


@register_dataset("digits", in_chans=1, image_size=32, num_classes=10, train_images=lambda cfg: _digits_train_size())
def digits(cfg: DataConfig, loading: Loading) -> DataBundle:
    """scikit-learn's handwritten digits, upsampled to 32x32: shipped with scikit-learn, no download."""
    from gunn.data.digits import Digits

    return map_style(Digits(train=True), Digits(train=False), cfg.workers, loading)


def _check_cifar(cfg: DataConfig) -> None:
    from gunn.data.cifar import check_cifar

    check_cifar(cfg.root, int(cfg.name[5:]))


def _cifar(cfg: DataConfig, loading: Loading) -> DataBundle:
    from gunn.data.cifar import Cifar

    classes = int(cfg.name[5:])
    return map_style(Cifar(cfg.root, classes, train=True), Cifar(cfg.root, classes, train=False), cfg.workers, loading)


@register_dataset("cifar10", in_chans=3, image_size=32, num_classes=10, train_images=CIFAR_TRAIN_IMAGES,
                  check=_check_cifar)
def cifar10(cfg: DataConfig, loading: Loading) -> DataBundle:
    """CIFAR-10 in data.root (python -m gunn.data download cifar10), with the paper's augmentation."""
    return _cifar(cfg, loading)


@register_dataset("cifar100", in_chans=3, image_size=32, num_classes=100, train_images=CIFAR_TRAIN_IMAGES,
                  check=_check_cifar)
def cifar100(cfg: DataConfig, loading: Loading) -> DataBundle:
    """CIFAR-100 in data.root (python -m gunn.data download cifar100), with the paper's augmentation."""
    return _cifar(cfg, loading)


def _check_imagenet(cfg: DataConfig) -> None:
    from gunn.data.imagenet import check_tree

    if cfg.root is None:
        raise DataError("data.root is required for imagenet: the directory that holds train/ and val/")
    check_tree(Path(cfg.root).expanduser())  # class folders listed, no image decoded


# Counting ImageNet's training files costs minutes on a cluster's file system: its size is not known beforehand.
# Its classes are the paper's 1000 (a tree of fewer class folders trains on those), its crop gunn.data.imagenet.CROP.
@register_dataset("imagenet", in_chans=3, image_size=224, num_classes=1000, check=_check_imagenet)
def imagenet(cfg: DataConfig, loading: Loading) -> DataBundle:
    """ImageNet from a class-folder tree in data.root, decoded by DALI or torchvision (data.loader)."""
    from gunn.data.imagenet import build_imagenet

    return build_imagenet(
        Path(cfg.root).expanduser(), loader=cfg.loader, batch_size=loading.batch_size, rank=loading.rank,
        world_size=loading.world_size, seed=loading.seed, device=loading.device, workers=cfg.workers,
    )


@register_dataset("synthetic", in_chans=3, image_size=None, num_classes=None, train_images=lambda cfg: cfg.samples)
def synthetic(cfg: DataConfig, loading: Loading) -> DataBundle:
    """Random images and labels: data.samples of data.image_size pixels and data.classes (benchmarks, tests)."""
    from gunn.data.synthetic import Synthetic

    return map_style(
        Synthetic(cfg.samples, cfg.image_size, cfg.classes, seed=1),
        Synthetic(max(1, cfg.samples // 4), cfg.image_size, cfg.classes, seed=2),
        cfg.workers, loading,
    )
