"""What every data backend returns: per-rank batches, epoch by epoch, in a seeded order."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor]


class DataError(RuntimeError):
    """Data that is missing or unreadable; the message says which file or directory."""


class EpochLoader(Protocol):
    """Batches of one rank. ``len`` is the same on every rank for training loaders."""

    def __len__(self) -> int: ...

    def iterate(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from batch ``start`` on (``start > 0`` resumes mid-epoch)."""
        ...


@dataclass
class DataBundle:
    """The loaders of a run and what the model needs to know about the data."""

    train: EpochLoader
    eval: EpochLoader
    num_classes: int
    in_chans: int
    train_images: int  # in the whole training set, all ranks together
    eval_images: int
    image_size: int  # side in pixels of the square training images, as the training loader yields them


@dataclass(frozen=True)
class Loading:
    """What one rank's loaders are made for: its share of the batch (``batch_size`` is per rank), its rank among
    ``world_size``, the seed of order and augmentation, and the device it trains on."""

    batch_size: int
    rank: int
    world_size: int
    seed: int
    device: torch.device


def epoch_order(size: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """All sample indices in the order of ``epoch``: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def shard(
    size: int, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int, train: bool
) -> list[int]:
    """The sample indices that ``rank`` reads in ``epoch``, in order.

    Training: a seeded permutation dealt round-robin to the ranks and cut to whole batches,
    the same number on every rank (unequal counts would hang DDP). Evaluation: every sample
    exactly once over all ranks, in file order.
    """
    order = epoch_order(size, seed=seed, epoch=epoch, shuffle=train)[rank::world_size]
    if train:
        order = order[: train_batches(size, world_size, batch_size) * batch_size]
    return order


@dataclass(frozen=True)
class ShardPlan:
    """One rank's share of a data set, epoch by epoch, in whole batches (see ``shard``)."""

    size: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    train: bool

    def __len__(self) -> int:
        if self.train:
            return train_batches(self.size, self.world_size, self.batch_size)
        return eval_batches(self.size, self.rank, self.world_size, self.batch_size)

    def indices(self, epoch: int, start: int = 0) -> list[int]:
        """The sample indices this rank reads in ``epoch``, from batch ``start`` on."""
        return shard(self.size, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                     batch_size=self.batch_size, train=self.train)[start * self.batch_size:]


def train_batches(size: int, world_size: int, batch_size: int) -> int:
    """Whole batches per rank and epoch of a training set (the last partial batch is dropped)."""
    return size // (world_size * batch_size)


def eval_batches(size: int, rank: int, world_size: int, batch_size: int) -> int:
    """Batches that ``rank`` reads to evaluate every sample once (the last may be partial)."""
    return math.ceil(len(range(rank, size, world_size)) / batch_size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the random augmentation of one sample in one epoch, whichever worker reads it."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)
