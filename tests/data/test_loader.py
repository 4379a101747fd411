"""Per-rank batches: seeded order, equal batch counts, exact coverage, reproducible augmentation."""

from __future__ import annotations

import pytest
import torch

from gunn.data.base import shard, train_batches
from gunn.data.digits import Digits
from gunn.data.loader import ShardedLoader
from gunn.data.synthetic import Synthetic


def test_training_shards_are_disjoint_whole_batches_of_equal_length():
    shards = [shard(103, seed=1, epoch=2, rank=r, world_size=3, batch_size=8, train=True) for r in range(3)]
    assert [len(s) for s in shards] == [train_batches(103, 3, 8) * 8] * 3 == [32, 32, 32]
    assert len(set().union(*shards)) == 96


def test_the_training_order_depends_on_seed_and_epoch_only():
    a = shard(50, seed=1, epoch=0, rank=0, world_size=1, batch_size=5, train=True)
    assert a == shard(50, seed=1, epoch=0, rank=0, world_size=1, batch_size=5, train=True)
    assert a != shard(50, seed=1, epoch=1, rank=0, world_size=1, batch_size=5, train=True)
    assert a != shard(50, seed=2, epoch=0, rank=0, world_size=1, batch_size=5, train=True)


def test_evaluation_shards_cover_every_sample_exactly_once():
    shards = [shard(101, seed=0, epoch=0, rank=r, world_size=4, batch_size=8, train=False) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(101))


def batches(loader: ShardedLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.iterate(epoch, start))


@pytest.mark.slow
def test_augmentation_is_the_same_whichever_worker_reads_a_sample():
    samples = Digits(train=True)
    inline = ShardedLoader(samples, batch_size=32, rank=0, world_size=1, seed=3, train=True, workers=0)
    workers = ShardedLoader(samples, batch_size=32, rank=0, world_size=1, seed=3, train=True, workers=2)
    for (x0, y0), (x1, y1) in zip(batches(inline, 1)[:5], batches(workers, 1)[:5]):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


@pytest.mark.slow
def test_starting_mid_epoch_gives_the_rest_of_the_epoch():
    loader = ShardedLoader(Digits(train=True), batch_size=64, rank=0, world_size=1, seed=0, train=True)
    full, rest = batches(loader, 2), batches(loader, 2, start=7)
    assert len(full) == len(loader) == 22 and len(rest) == 15
    for (x0, y0), (x1, y1) in zip(full[7:], rest):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_training_augments_and_evaluation_does_not():
    samples = Digits(train=True)
    plain, _ = samples.load(0, augment=False)
    shifted = [samples.load(0, augment=True)[0] for _ in range(8)]
    assert any(not torch.equal(plain, s) for s in shifted)
    assert torch.equal(plain, samples.load(0, augment=False)[0])


def test_digits_is_a_fixed_stratified_split_of_real_images():
    train, test = Digits(train=True), Digits(train=False)
    assert (len(train), len(test)) == (1438, 359)
    assert train.images.shape[1:] == (1, 32, 32)
    assert sorted(set(test.labels)) == list(range(10))
    assert torch.equal(Digits(train=False).images, test.images)
    assert abs(train.images.mean().item()) < 1e-4 and abs(train.images.std().item() - 1) < 1e-3


def test_synthetic_images_are_fixed_per_index():
    data = Synthetic(10, 16, 5)
    assert torch.equal(data.load(3, True)[0], data.load(3, False)[0])
    assert data.load(3, True)[0].shape == (3, 16, 16)
