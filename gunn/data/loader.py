"""Batches of a map-style data set for one rank, with reproducible order and augmentation."""

from __future__ import annotations

from typing import Iterator, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gunn.data.base import Batch, DataBundle, Loading, ShardPlan, sample_seed


class Samples(Protocol):
    """A data set that loads sample ``index``, augmented (training) or not (evaluation)."""

    def __len__(self) -> int: ...

    def load(self, index: int, augment: bool) -> tuple[Tensor, int]:
        """The image tensor (C, H, W, float, normalised) and the label of one sample."""
        ...


class _Keyed(Dataset):
    """Reads (index, seed) keys: the augmentation of a sample depends on its seed alone."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[Tensor, int]:
        index, seed = key
        if seed is None:
            return self.samples.load(index, augment=False)
        # Whichever worker reads the sample draws the same crop and flip, so a run resumed
        # mid-epoch, or read by a different number of workers, sees identical batches.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.samples.load(index, augment=True)


class ShardedLoader:
    """One rank's batches of ``samples``: a seeded shard per epoch, read by worker processes."""

    def __init__(
        self,
        samples: Samples,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        train: bool,
        workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.samples, self.batch_size, self.seed, self.train = samples, batch_size, seed, train
        self.workers, self.pin_memory = workers, pin_memory
        self.plan = ShardPlan(len(samples), batch_size, rank, world_size, seed, train)

    def __len__(self) -> int:
        return len(self.plan)

    def iterate(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from batch ``start`` on."""
        indices = self.plan.indices(epoch, start)
        keys = [(i, sample_seed(self.seed, epoch, i) if self.train else None) for i in indices]
        if not keys:
            return iter(())
        loader = DataLoader(
            _Keyed(self.samples), batch_size=self.batch_size, sampler=keys, num_workers=self.workers,
            pin_memory=self.pin_memory, persistent_workers=False,
        )
        return iter(loader)


def map_style(train: Samples, test: Samples, workers: int, loading: Loading) -> DataBundle:
    """The loaders of one rank over map-style training and test samples, read by ``workers`` processes."""
    common = dict(batch_size=loading.batch_size, rank=loading.rank, world_size=loading.world_size, seed=loading.seed,
                  workers=workers, pin_memory=loading.device.type == "cuda")
    return DataBundle(
        train=ShardedLoader(train, train=True, **common),
        eval=ShardedLoader(test, train=False, **common),
        num_classes=train.num_classes,
        in_chans=train.in_chans,
        train_images=len(train),
        eval_images=len(test),
        image_size=train.load(0, augment=False)[0].shape[-1],  # every image of a map-style set has one size
    )
