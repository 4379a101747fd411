"""Images per second of the ImageNet training loaders, DALI on the CPU vs torchvision, on one tree."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from gunn.data.base import EpochLoader
from gunn.data.imagenet import DaliLoader, ImageFolderSamples, find_images
from gunn.data.loader import ShardedLoader


def loader_throughput(root: Path, *, batch_size: int, batches: int, workers: int) -> dict[str, float]:
    """Training images/s of the DALI CPU loader and of the torchvision loader, measured in one run."""
    files, labels, _ = find_images(Path(root), "train")
    common = dict(batch_size=batch_size, rank=0, world_size=1, seed=0, workers=workers)
    loaders: dict[str, EpochLoader] = {
        "dali_cpu": DaliLoader(files, labels, train=True, device=torch.device("cpu"), **common),
        "torchvision": ShardedLoader(ImageFolderSamples(Path(root), "train", train=True), train=True, **common),
    }
    return {name: images_per_s(loader, batches) for name, loader in loaders.items()}


def images_per_s(loader: EpochLoader, batches: int) -> float:
    """Images per second that ``loader`` delivers over ``batches`` batches, after one batch of warm-up."""
    if len(loader) == 0:
        raise ValueError("the training set holds less than one batch; use a larger tree or a smaller batch size")
    # Epochs follow each other as in training: a tree smaller than the run includes epoch starts.
    stream = (batch for epoch in itertools.count() for batch in loader.iterate(epoch))
    next(stream)  # warm-up: pipeline build or worker start, first decode
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(stream)[1])
    return images / (time.perf_counter() - start)
